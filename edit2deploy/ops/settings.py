"""Settings from a TOML file (`[edit]`, `[run]`), `--set key=value` and flags, validated field by field before
any work starts: types are never coerced (a string is not a number), numbers must be finite."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..formats import PROTECT_CHOICES
from ..methods import METHODS, EditConfig
from ..methods.chat import CHAT_CONTEXT_CHOICES, CHAT_KEY_CHOICES, CHAT_KIND_CHOICES
from ..methods.editor import UNCHOSEN
from ..methods.values import ValueHParams
from ..precision import WEIGHT_DTYPES


def parse_layers(text: str, where: str = "--layers") -> tuple[int, ...]:
    """ "4-8" or "4,5,6" or "4-6,9" → (4, 5, 6, 9)."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise UsageError(f"{where}: '{text}' is not a layer list (expected e.g. 4-8 or 4,5,6)") from None
    if not out:
        raise UsageError(f"{where}: empty layer list")
    return tuple(sorted(set(out)))


# A string field's allowed values, one entry per field of `EditConfig` / `ValueHParams`. A field is checked only
# where the dataclass has it, so an entry may name a field that is still to come.
STRING_CHOICES: dict[str, tuple[str, ...]] = {
    "method": tuple(METHODS),
    "dtype": ("auto", "float32", "bfloat16"),
    "chat_contexts": CHAT_CONTEXT_CHOICES,
    "chat_keys": CHAT_KEY_CHOICES,
    "chat_kinds": CHAT_KIND_CHOICES,
}
# Numbers that must be > 0, not only ≥ 0 like every other count and weight: 0 would make the edit a silent no-op.
POSITIVE_FIELDS = ("lr", "clamp")
# Fields whose None means the method's own choice (never in a TOML file, which has no null), each with a value of
# its type: what a method that makes no choice gets.
NULLABLE: dict[str, Any] = {"mpes": False, **UNCHOSEN}


def _typed(where: str, name: str, value: Any, default: Any) -> Any:
    """`value` checked against the type of the field's `default` (no coercion: a string is not a number)."""
    if name in NULLABLE:
        if value is None:
            return None
        default = NULLABLE[name]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: field '{name}': expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{where}: field '{name}': expected an integer, got {value!r}")
        low = 1 if name in POSITIVE_FIELDS else 0
        if value < low:
            raise UsageError(f"{where}: field '{name}': expected an integer ≥ {low}, got {value}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"{where}: field '{name}': expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UsageError(f"{where}: field '{name}': expected a finite number, got {value}")
        if name in POSITIVE_FIELDS and value <= 0:
            raise UsageError(f"{where}: field '{name}': expected a number > 0, got {value}")
        if value < 0:
            raise UsageError(f"{where}: field '{name}': expected a number ≥ 0, got {value}")
        return float(value)
    if isinstance(default, str):
        choices = STRING_CHOICES.get(name)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            expected = f"one of {', '.join(choices)}" if choices else "a string"
            raise UsageError(f"{where}: field '{name}': {value!r} (expected {expected})")
        return value
    return value  # a field without a checkable default (None): the dataclass takes it as given


def _layers(where: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, tuple) and not value:
        return ()  # the API's default: the architecture's layers
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
            raise UsageError(f"{where}: field 'layers': expected a list of layer numbers, got {value!r}")
        value = ",".join(map(str, value))
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise UsageError(f"{where}: field 'layers': expected e.g. [4, 5, 6] or \"4-8\", got {value!r}")
    return parse_layers(str(value), f"{where}: field 'layers'")


def edit_config_from(table: dict, where: str, base: EditConfig | None = None) -> EditConfig:
    """An `EditConfig` from a dict (a TOML [edit] table); unknown keys are errors."""
    if not isinstance(table, dict):
        raise UsageError(f"{where}: expected a table of fields, got {type(table).__name__}")
    base = base or EditConfig()
    top = {f.name: f for f in dataclasses.fields(EditConfig)}
    val = {f.name for f in dataclasses.fields(ValueHParams)}
    changes, vchanges = {}, {}
    for key, value in table.items():
        if key == "layers":
            changes[key] = _layers(where, value)
        elif key in top and key != "values":
            changes[key] = _typed(where, key, value, getattr(base, key))
        elif key in val:
            vchanges[key] = _typed(where, key, value, getattr(base.values, key))
        else:
            raise UsageError(
                f"{where}: unknown field '{key}' (expected one of: {', '.join(sorted((set(top) | val) - {'values'}))})"
            )
    return dataclasses.replace(base, **changes, values=dataclasses.replace(base.values, **vchanges))


def check_edit_config(cfg: Any, where: str = "cfg") -> EditConfig:
    """An `EditConfig` built in Python (the API's `cfg=`) checked field by field like a TOML [edit] table."""
    if not isinstance(cfg, EditConfig):
        raise UsageError(f"{where}: expected an EditConfig, got {type(cfg).__name__}")
    if not isinstance(cfg.values, ValueHParams):
        raise UsageError(f"{where}: field 'values': expected a ValueHParams, got {type(cfg.values).__name__}")
    table = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EditConfig) if f.name != "values"}
    table.update({f.name: getattr(cfg.values, f.name) for f in dataclasses.fields(ValueHParams)})
    return edit_config_from(table, where)


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {p}: file not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{p}: not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p}: not UTF-8 text") from exc


def parse_set(items: Sequence[str], where: str = "--set") -> dict[str, Any]:
    """`--set key=value` items → {key: value}. The value is read as a TOML value (`1e-3`, `true`, `[4, 5]`,
    `"text"`); a bare word that is not one (`memit`) is a string. Types are checked by `edit_config_from`."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not text.strip():
            raise UsageError(f"{where} {item}: expected KEY=VALUE (e.g. --set lr=0.25)")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[key] = value
    return out


def edit_config(
    config: str | Path | None = None,
    sets: Sequence[str] = (),
    base: EditConfig | None = None,
    **flags: Any,
) -> EditConfig:
    """The edit configuration: defaults, then the TOML file's [edit] table, then `--set` items, then the
    dedicated flags (`method`, `layers`, `retry_rounds`; None = not given). Every value is type-checked."""
    cfg = base or EditConfig()
    if config:
        data = load_toml(config)
        check_tables(data, config)
        cfg = edit_config_from(data.get("edit", {}), str(config), cfg)
    if sets:
        cfg = edit_config_from(parse_set(sets), "--set", cfg)
    given = {k: v for k, v in flags.items() if v is not None}
    if "layers" in given:
        given["layers"] = ",".join(map(str, parse_layers(given["layers"])))
    return edit_config_from(given, "command line", cfg) if given else cfg


TABLES = ("run", "edit")


def check_tables(data: dict, where: str | Path) -> None:
    """Only [run] and [edit], each a table."""
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise UsageError(f"{where}: unknown table(s) {unknown} (expected [run] and [edit])")
    for name in TABLES:
        if name in data and not isinstance(data[name], dict):
            raise UsageError(f"{where}: '{name}' must be a table ([{name}]), got {type(data[name]).__name__}")


# [run] field -> (expected, check): what `run` reads from a TOML file, each value type-checked (no coercion)
def _str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def gate_value_ok(v: Any) -> bool:
    """A gate in a table: a number, or 'off'/false/None (a quoted number is a string, not a threshold)."""
    if v is None or v is False or v == "off":
        return True
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _device(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"cpu|cuda(:\d+)?", v.strip()) is not None


RUN_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model": ("a model name or path (string)", _str),
    "edits": ("a file path (string)", _str),
    "targets": (
        "a string or a list of strings",
        lambda v: _str(v) or (isinstance(v, (list, tuple)) and all(map(_str, v))),
    ),
    "out": ("a directory path (string)", _str),
    "gates": (
        "a table of NAME = number/'off', or a list of 'NAME=VALUE' strings",
        lambda v: (
            (isinstance(v, dict) and all(map(gate_value_ok, v.values())))
            or (isinstance(v, (list, tuple)) and all(map(_str, v)))
            or _str(v)
        ),
    ),
    "batch_size": ("an integer ≥ 1", _count),
    "corpus": ("a file or directory path (string)", _str),
    "n_tokens": ("an integer ≥ 1", _count),
    "preserved": ("a file path (string)", _str),
    "preserved_n": ("an integer ≥ 1", _count),
    "heldout": ("a file path (string)", _str),
    "protect_edits": (
        "'none', 'q8_0' or 'f16'",
        lambda v: isinstance(v, str) and v.lower() in PROTECT_CHOICES,
    ),
    "baseline": ("true or false", lambda v: isinstance(v, bool)),
    "device": ("'cpu', 'cuda' or 'cuda:N'", _device),
    "dtype": (
        " or ".join(f"'{d}'" for d in WEIGHT_DTYPES),
        lambda v: isinstance(v, str) and v in WEIGHT_DTYPES,
    ),
    "device_map": ("'auto'", lambda v: v == "auto"),
    "max_memory": (
        "a string DEVICE=SIZE,... or a table of DEVICE = SIZE",
        lambda v: _str(v) or (isinstance(v, dict) and bool(v)),
    ),
    "harden": ("true or false", lambda v: isinstance(v, bool)),
    "generation": ("true or false", lambda v: isinstance(v, bool)),
}
PATH_FIELDS = ("edits", "out", "corpus", "preserved", "heldout")


def run_table(path: str | Path) -> dict[str, Any]:
    """The [run] table of a TOML file, type-checked, with paths resolved against the file's directory."""
    data = load_toml(path)
    check_tables(data, path)
    table = data.get("run", {})
    base = Path(path).resolve().parent
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in RUN_FIELDS:
            raise UsageError(
                f"{path}: [run]: unknown field '{key}' (expected one of: {', '.join(sorted(RUN_FIELDS))})"
            )
        expected, ok = RUN_FIELDS[key]
        if not ok(value):
            raise UsageError(f"{path}: [run] field '{key}': expected {expected}, got {value!r}")
        if key in PATH_FIELDS:
            value = _resolve(value, base)
        elif key == "model" and (base / value).exists():
            value = str(base / value)
        out[key] = value
    return out


def _resolve(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return value if p.is_absolute() else str(base / p)


def check_run_values(values: dict[str, Any], where: str) -> None:
    """Values given to `run`/`edit` in Python (paths may be `Path`s; None: not given), checked like the [run]
    table's fields, before any work starts."""
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        expected, ok = RUN_FIELDS[key]
        if not ok(value):
            raise UsageError(f"{where}: field '{key}': expected {expected}, got {value!r}")
