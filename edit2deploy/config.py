"""Edit configuration from a TOML file and command-line overrides, validated field by field."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from .errors import UsageError
from .methods import METHODS, EditConfig
from .methods.values import ValueHParams


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


def _typed(where: str, name: str, value, default):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: field '{name}': expected true or false")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{where}: field '{name}': expected an integer")
        if value < 0:  # every count and weight of an edit config is non-negative
            raise UsageError(f"{where}: field '{name}': expected an integer ≥ 0, got {value}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"{where}: field '{name}': expected a number")
        if value < 0:
            raise UsageError(f"{where}: field '{name}': expected a number ≥ 0, got {value}")
        return float(value)
    return value


def edit_config_from(table: dict, where: str, base: EditConfig | None = None) -> EditConfig:
    """An `EditConfig` from a dict (a TOML [edit] table); unknown keys are errors."""
    base = base or EditConfig()
    top = {f.name: f for f in dataclasses.fields(EditConfig)}
    val = {f.name for f in dataclasses.fields(ValueHParams)}
    changes, vchanges = {}, {}
    for key, value in table.items():
        if key == "method":
            if value not in METHODS:
                raise UsageError(f"{where}: field 'method': '{value}' (expected one of {', '.join(METHODS)})")
            changes[key] = value
        elif key == "layers":
            changes[key] = parse_layers(
                ",".join(map(str, value)) if isinstance(value, list) else value, where
            )
        elif key in top and key != "values":
            changes[key] = _typed(where, key, value, getattr(base, key))
        elif key == "mpes":
            if not isinstance(value, bool):
                raise UsageError(f"{where}: field 'mpes': expected true or false")
            vchanges[key] = value
        elif key in val:
            vchanges[key] = _typed(where, key, value, getattr(base.values, key))
        else:
            raise UsageError(
                f"{where}: unknown field '{key}' (expected one of: {', '.join(sorted((set(top) | val) - {'values'}))})"
            )
    return dataclasses.replace(base, **changes, values=dataclasses.replace(base.values, **vchanges))


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
