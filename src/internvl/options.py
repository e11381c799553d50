"""Options as small dataclasses: a field `max_seq_length` is the flag `--max-seq-length` and the YAML key
`max_seq_length:`. Every CLI verb builds its parser from such classes (`add_options`); values read from a
file or a dict are coerced and checked against the field's type and choices (`coerce`).
"""

from __future__ import annotations

import argparse
import difflib
import typing
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any

from .errors import InternVLError


def option(default: Any, help: str, **meta: Any) -> Any:
    """A field with its flag's help. `meta`: choices, metavar, positional (True: optional, "one": required, or
    an nargs such as "*"), short ("-i"), append (a repeatable flag collecting a list), negatable (`--x/--no-x`
    for a bool), required (a flag that must be given)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def base_type(hint: Any) -> tuple[type, bool]:
    """(type, optional) of an annotation: `int | None` is (int, True), `list[str]` is (str, False)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return args[0], False
    if args:
        return base_type(args[0])[0], True
    return hint, False


def default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _recorded(action: type[argparse.Action]) -> type[argparse.Action]:
    """`action` that also notes its flag as given on the command line (so that a --config file yields to it)."""

    class Recorded(action):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            namespace.__dict__.setdefault("_given", set()).add(self.dest)

    return Recorded


_ACTIONS = {name: _recorded(cls) for name, cls in (("store", argparse._StoreAction),
            ("store_true", argparse._StoreTrueAction), ("append", argparse._AppendAction),
            ("negatable", argparse.BooleanOptionalAction))}  # fmt: skip


def add_options(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
    suppress: bool = False,
) -> None:
    """One argument per field of `cls`, with `defaults` replacing the class's for this verb.

    `suppress=True` leaves unset flags out of the namespace, so that a `--config` file can sit between the
    defaults and the flags (the training verbs); bools are then `--x/--no-x`. Otherwise every field is in the
    namespace with its default, and a bool is an on-switch unless its field says `negatable`.
    """
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, _ = base_type(hints[f.name])
        meta = f.metadata
        default = (defaults or {}).get(f.name, default_of(f))
        help_text = meta["help"]
        if default not in (None, False, []) and "(default" not in help_text:
            help_text += f" (default: {default})"
        value = argparse.SUPPRESS if suppress else default
        if meta.get("positional"):
            kind_of = meta["positional"]  # True: optional, "one": required, else an nargs
            nargs = {} if kind_of == "one" else {"nargs": "?" if kind_of is True else kind_of, "default": value}
            p.add_argument(f.name, metavar=meta.get("metavar", f.name.upper()), help=help_text, **nargs)
            continue
        flags = ([meta["short"]] if "short" in meta else []) + ["--" + f.name.replace("_", "-")]
        if meta.get("required"):
            p.add_argument(*flags, action=_ACTIONS["store"], required=True, type=kind, choices=meta.get("choices"),
                           metavar=meta.get("metavar"), help=help_text)  # fmt: skip
        elif kind is bool:
            action = "negatable" if suppress or meta.get("negatable") else "store_true"
            p.add_argument(*flags, action=_ACTIONS[action], default=value, help=help_text)
        elif meta.get("append"):
            p.add_argument(*flags, action=_ACTIONS["append"], type=kind, default=value, metavar=meta.get("metavar"),
                           help=help_text)  # fmt: skip
        else:
            choices = meta.get("choices")
            metavar = None if choices else meta.get("metavar", kind.__name__.upper() if suppress else None)
            p.add_argument(*flags, action=_ACTIONS["store"], type=kind, default=value, choices=choices,
                           metavar=metavar, help=help_text)  # fmt: skip


def add_config(p: argparse.ArgumentParser, *classes: type) -> None:
    """A `--config YAML` flag whose keys are the fields of `classes`: defaults <- the file <- the flags given
    (`apply_config` merges it once the command line is parsed)."""
    p.add_argument("--config", metavar="YAML", default=None,
                   help="YAML file whose keys are these options' names (max_new_tokens: 64); flags win")  # fmt: skip
    p.set_defaults(_option_classes=classes)


def apply_config(ns: argparse.Namespace, error: type[Exception] = InternVLError) -> None:
    """Values of the `--config` file into `ns`, checked, except those given as flags (or as a positional)."""
    path, classes = getattr(ns, "config", None), getattr(ns, "_option_classes", ())
    if not path or not classes:
        return
    values = read_yaml(path, error)
    owner = {f.name: c for c in classes for f in fields(c) if hasattr(ns, f.name)}  # not the verb's skipped
    for key in values:
        if key not in owner:
            close = difflib.get_close_matches(str(key), owner, n=1)
            raise error(f"{path}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    given = getattr(ns, "_given", set())
    for cls in classes:
        mine = {k: v for k, v in values.items() if owner[k] is cls}
        for key, value in coerce(cls, mine, str(path), error).items():
            positional = any(f.name == key and f.metadata.get("positional") for f in fields(cls))
            if key not in given and (not positional or getattr(ns, key, None) in (None, [])):
                setattr(ns, key, value)


def values_of(ns: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The namespace's values of the fields of `classes` (those it holds)."""
    names = {f.name for c in classes for f in fields(c)}
    return {k: v for k, v in vars(ns).items() if k in names}


def coerce(cls: type, values: dict[str, Any], source: str, error: type[Exception] = InternVLError) -> dict[str, Any]:
    """`values` (from YAML or a dict) checked against the fields' types and choices; ints become floats where
    a float is expected. A wrong value is one `error` naming `source` and the key."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        kind, optional = base_type(hints[f.name])
        if v is None and optional:
            out[f.name] = None
            continue
        if typing.get_origin(hints[f.name]) is list:
            if not isinstance(v, list) or not all(isinstance(x, (str, int, float)) for x in v):
                raise error(f"{source}: {f.name} must be a list of {kind.__name__}, got {v!r}")
            out[f.name] = [kind(x) for x in v]
            continue
        try:
            if kind is bool:
                if not isinstance(v, bool):
                    raise ValueError
            elif kind is int:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                v = int(v)
            elif kind is float:
                if isinstance(v, bool):
                    raise ValueError
                v = float(v)
            else:
                v = str(v)
        except (TypeError, ValueError):
            raise error(f"{source}: {f.name} must be {kind.__name__}, got {v!r}") from None
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            raise error(f"{source}: {f.name} must be one of {list(choices)}, got {v!r}")
        out[f.name] = v
    return out


def read_yaml(
    path: str | Path, error: type[Exception] = InternVLError, _seen: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """A YAML mapping of option names to values; a missing or malformed file is one `error`. A key `extends:
    FILE` (relative to this file) takes FILE's values first, then this file's over them."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of option names to values")
    if "extends" in data:
        base = data.pop("extends")
        if not isinstance(base, str):
            raise error(f"{path}: extends must name one config file, got {base!r}")
        base_path = (path.parent / base).resolve()
        if base_path in _seen or base_path == path.resolve():
            raise error(f"{path}: extends {base} again (a cycle)")
        data = {**read_yaml(base_path, error, (*_seen, path.resolve())), **data}
    return data
