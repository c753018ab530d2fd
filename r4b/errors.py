"""The one base class of errors whose message says everything.

An entry point (:func:`r4b.runtime.run_entry`) logs a :class:`JobError` as one line, without a
traceback: a busy run directory, a bad data item, an unloadable checkpoint, a silent peer.  The
modules that raise them subclass it here, so the runtime names no module above it.
"""


class JobError(Exception):
    """An error that names its cause (what, where, what was expected)."""
