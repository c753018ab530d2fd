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
import math
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

T = TypeVar("T")


# ---------------------------------------------------------------- validation helpers
def require_range(name: str, value, lo=None, hi=None, *, lo_open: bool = False,
                  hi_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``lo <=/< value <=/< hi`` (NaN and
    infinities are never in range; a bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
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


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + repr(args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "none"
    if origin is tuple:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if dataclasses.is_dataclass(hint):
        return f"a table of {hint.__name__} fields"
    return getattr(hint, "__name__", str(hint))


def check_value(path: str, value, hint):
    """``value`` as a field of type ``hint`` wants it (ints widened to float, lists to tuples),
    or ``TypeError`` / ``ValueError`` naming ``path``, the value and the expected type.  A
    recipe gets exactly the checks the command line applies: no string for a bool, no float
    for an int, no scalar for a table."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise TypeError(f"{path} must be {_type_name(hint)}, got none")
        for arm in args:
            if arm is type(None):
                continue
            try:
                return check_value(path, value, arm)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{path} must be {_type_name(hint)}, got {type(value).__name__} "
                        f"{value!r}")
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ValueError(f"{path} must be one of {args}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{path} must be true or false, got {type(value).__name__} {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"{path} must be an integer, got {type(value).__name__} {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{path} must be a number, got {type(value).__name__} {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{path} must be a string, got {type(value).__name__} {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{path} must be {_type_name(hint)}, got {type(value).__name__} "
                            f"{value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ValueError(f"{path} must have {len(args)} entries, got {len(value)}")
        return tuple(check_value(f"{path}[{i}]", v, a) for i, (v, a) in
                     enumerate(zip(value, args))) if args else tuple(value)
    if dataclasses.is_dataclass(hint):
        raise TypeError(f"{path} must be {_type_name(hint)}, got {type(value).__name__} "
                        f"{value!r}")
    return value


def config_from_dict(cls: type[T], data: dict, *, base: T | None = None, _path: str = "") -> T:
    """Build ``cls`` from a (partial) nested dict on top of ``base`` (or the defaults).

    Every value is type-checked against the field's annotation (:func:`check_value`); unknown
    keys raise ``KeyError`` listing them with their dotted path; the dataclasses' own
    validation (``__post_init__``) then runs as for the command line.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    if not isinstance(data, dict):
        raise TypeError(f"{_path.rstrip('.') or cls.__name__} must be a table of {cls.__name__} "
                        f"fields, got {type(data).__name__} {data!r}")
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
        if dataclasses.is_dataclass(sub):
            if not isinstance(val, dict):
                raise TypeError(f"{_path}{name} must be a table of {sub.__name__} fields, got "
                                f"{type(val).__name__} {val!r}")
            kwargs[name] = config_from_dict(sub, val, base=cur, _path=f"{_path}{name}.")
        elif typing.get_origin(sub) in (typing.Union, types.UnionType) and isinstance(val, dict) \
                and any(dataclasses.is_dataclass(a) for a in typing.get_args(sub)):
            arm = next(a for a in typing.get_args(sub) if dataclasses.is_dataclass(a))
            kwargs[name] = config_from_dict(arm, val, base=cur if isinstance(cur, arm) else None,
                                            _path=f"{_path}{name}.")
        else:
            kwargs[name] = check_value(f"{_path}{name}", val, sub)
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
        try:
            base = config_from_dict(cls, load_recipe(recipe), base=base)
        except (TypeError, ValueError, KeyError, tomllib.TOMLDecodeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise SystemExit(f"error: --config {recipe}: {msg}") from None
    description = ((description or "") + "\n\nRecipes: --config FILE (TOML, or YAML with "
                   "PyYAML) sets fields by the same nesting before the flags below apply; "
                   "every value is type-checked.").strip()
    # Booleans take an explicit value (``--rl.filter_zero_variance True``), like every other field.
    return tyro.cli(cls, args=argv, default=base, prog=prog, description=description,
                    use_underscores=True, config=(tyro.conf.FlagConversionOff,))
