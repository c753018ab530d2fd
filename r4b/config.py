"""Typed configuration: nested ``@dataclass(kw_only=True)`` configs owned by components.

Each component owns its config dataclass (``r4b.models.ModelConfig``, ``r4b.rl.BPOConfig``,
...), with a docstring per field and validation in ``__post_init__`` through the helpers
below, so that errors name the field, the value and the allowed range.  Entry points compose
them into one top-level dataclass and call :func:`parse_cli`, which

1. starts from the dataclass defaults (or a preset instance passed as ``default``),
2. layers a recipe file given with ``--config FILE`` (TOML; YAML when PyYAML is installed),
3. applies command-line overrides by dotted path with the field names as written:
   ``--rl.eps_high 0.28`` (parsing and ``--help`` by `tyro`, a maintained library).
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
import typing
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

T = TypeVar("T")


# ---------------------------------------------------------------- validation helpers
def require_range(name: str, value, lo=None, hi=None, *, lo_open: bool = False,
                  hi_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``lo <=/< value <=/< hi``."""
    ok = True
    if lo is not None:
        ok &= value > lo if lo_open else value >= lo
    if hi is not None:
        ok &= value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise ValueError(f"{name} must be in {left}{lo_s}, {hi_s}{right}, got {value!r}")


def require_choice(name: str, value, choices: Iterable) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------- dict round trip
def config_to_dict(cfg) -> dict:
    """Nested plain dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type[T], data: dict, *, base: T | None = None, _path: str = "") -> T:
    """Build ``cls`` from a (partial) nested dict on top of ``base`` (or the defaults).

    Unknown keys raise ``KeyError`` listing them with their dotted path.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    base = base if base is not None else cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise KeyError(f"unknown config keys {[_path + k for k in unknown]} for {cls.__name__}; "
                       f"known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        cur = getattr(base, name)
        if name not in data:
            kwargs[name] = cur
            continue
        val = data[name]
        sub = hints.get(name)
        if dataclasses.is_dataclass(sub) and isinstance(val, dict):
            kwargs[name] = config_from_dict(sub, val, base=cur, _path=f"{_path}{name}.")
        elif isinstance(cur, tuple) and isinstance(val, list):
            kwargs[name] = tuple(val)
        else:
            kwargs[name] = val
    return cls(**kwargs)


def load_recipe(path: str | Path) -> dict:
    """Read a TOML (or YAML, if PyYAML is installed) recipe file into a nested dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--config: recipe file {str(path)!r} does not exist")
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError("YAML recipes need PyYAML (pip install pyyaml); TOML needs nothing") from e
        return yaml.safe_load(path.read_text()) or {}
    raise ValueError(f"--config: recipe file must end in .toml, .yaml or .yml, got {str(path)!r}")


# ---------------------------------------------------------------- command line
def parse_cli(cls: type[T], argv: Sequence[str] | None = None, *, default: T | None = None,
              prog: str | None = None, description: str | None = None) -> T:
    """Parse ``argv`` into ``cls``: defaults, then ``--config FILE``, then dotted overrides."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = None
    for i, a in enumerate(argv):
        if a == "--config":
            if i + 1 >= len(argv):
                raise SystemExit("--config needs a file path")
            recipe = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--config="):
            recipe = a.split("=", 1)[1]
            del argv[i]
            break
    base = default if default is not None else cls()
    if recipe is not None:
        base = config_from_dict(cls, load_recipe(recipe), base=base)
    # Booleans take an explicit value (``--rl.filter_zero_variance True``), like every other field.
    return tyro.cli(cls, args=argv, default=base, prog=prog, description=description,
                    use_underscores=True, config=(tyro.conf.FlagConversionOff,))
