"""Deployment formats, one subpackage each (`gguf`, `onnx`, `bnb`), each registering itself with
`register_format`. Orchestration (`edit2deploy.ops`) names no format: it goes through `FORMATS`, `get_format`,
`detect_format` and `parse_targets`.

Adding a format is one subpackage: a `Format` subclass decorated with `@register_format`, and its name in
`BUILTIN` so it is imported with this package. A format's heavy runtime (llama.cpp, onnxruntime,
bitsandbytes) is imported only when it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from ..errors import UsageError
from .base import (
    DEFAULT_PROTECTION,
    PROTECT_CHOICES,
    Artifact,
    ExportPolicy,
    Format,
    Protection,
    Target,
    edited_tensor_list,
    read_sidecar,
    sidecar_path,
    target_label,
    write_sidecar,
)

FORMATS: dict[str, Format] = {}
BUILTIN = ("gguf", "onnx", "bnb")


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator: register one instance of a `Format` subclass under its `name`."""
    if cls.name in FORMATS:
        raise ValueError(f"format '{cls.name}' is registered twice")
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str) -> Format:
    """The format registered as `name`; a clear error listing the formats otherwise."""
    key = str(name).lower()
    if key not in FORMATS:
        raise UsageError(f"unknown export format '{name}' (expected one of {', '.join(FORMATS)})")
    return FORMATS[key]


def detect_format(path: Path | str) -> str | None:
    """The name of the format a path holds, or None."""
    for name, fmt in FORMATS.items():
        if fmt.detect(path):
            return name
    return None


def parse_targets(
    spec: str | Target | Sequence[str | Target],
    protection: Protection | str = DEFAULT_PROTECTION,
    where: str = "--targets",
) -> list[Target]:
    """The one target grammar: a comma list of `FORMAT:TYPE[:PROTECTION]`, or a bare `TYPE[:PROTECTION]` that
    only one format has (`Q4_K_M` is gguf's). `protection` is the default for items that name none.

    `"gguf:Q4_K_M,onnx:int4:none,bnb:nf4"` → three targets. Unknown formats and types are one `UsageError`
    that lists what is available; duplicates are dropped.
    """
    default = Protection.parse(protection)
    items = [spec] if isinstance(spec, (str, Target)) else list(spec)
    out: list[Target] = []
    for item in items:
        parts = [item] if isinstance(item, Target) else [p.strip() for p in str(item).split(",") if p.strip()]
        for part in parts:
            t = part if isinstance(part, Target) else _parse_one(part, default, where)
            if t not in out:
                out.append(t)
    if not out:
        raise UsageError(f"{where}: empty (expected e.g. gguf:Q4_K_M,onnx:int4,bnb:nf4)")
    return out


def _parse_one(part: str, default: Protection, where: str) -> Target:
    fields = [f.strip() for f in part.split(":")]
    types = {name: {q.lower(): q for q in fmt.quants} for name, fmt in FORMATS.items()}
    available = "; ".join(f"{f}: {', '.join(q.values())}" for f, q in types.items())
    protection = default
    if len(fields) == 3 or (
        len(fields) == 2 and fields[0].lower() not in FORMATS and fields[1].lower() in PROTECT_CHOICES
    ):
        protection = Protection.parse(fields[-1], f"{where} {part}")
        fields = fields[:-1]
    if len(fields) == 1:
        q = fields[0].lower()
        owners = [f for f in FORMATS if q in types[f]]
        if not owners:
            raise UsageError(f"{where}: '{part}': no format has type '{fields[0]}' ({available})")
        if len(owners) > 1:
            raise UsageError(
                f"{where}: '{part}' is ambiguous, write one of {', '.join(f'{f}:{part}' for f in owners)}"
            )
        fmt = owners[0]
    elif len(fields) == 2 and all(fields):
        fmt, q = fields[0].lower(), fields[1].lower()
        if fmt not in FORMATS:
            raise UsageError(
                f"{where}: '{part}': format '{fields[0]}' not available (available formats: {', '.join(FORMATS)})"
            )
        if q not in types[fmt]:
            raise UsageError(
                f"{where}: '{part}': {fmt} has no type '{fields[1]}' (expected one of: {', '.join(types[fmt].values())})"
            )
    else:
        raise UsageError(
            f"{where}: '{part}' is not FORMAT:TYPE[:PROTECTION] (e.g. gguf:Q4_K_M, onnx:int4:none)"
        )
    return Target(fmt, types[fmt][q], protection)


for _name in BUILTIN:
    importlib.import_module(f".{_name}", __name__)

__all__ = [
    "BUILTIN",
    "DEFAULT_PROTECTION",
    "FORMATS",
    "PROTECT_CHOICES",
    "Artifact",
    "ExportPolicy",
    "Format",
    "Protection",
    "Target",
    "detect_format",
    "edited_tensor_list",
    "get_format",
    "parse_targets",
    "read_sidecar",
    "register_format",
    "sidecar_path",
    "target_label",
    "write_sidecar",
]
