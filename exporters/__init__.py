"""Deployment formats (installed as `edit2deploy.exporters`). One module per format, found via `FORMATS`.

Every format implements the `Exporter` protocol: `export(...)` writes an artifact (atomically) and returns an
`Artifact`; `scorer(artifact)` opens it in the format's own runtime as an `edit2deploy.scoring.Scorer`;
`detect(path)` tells whether a path holds this format. The core (`edit2deploy/`) never imports this package;
formats import the core.

Adding a format is one module with a module-level `EXPORTER` object and one line in `_FORMAT_MODULES`.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from edit2deploy.atomic import atomic_file
from edit2deploy.errors import UsageError

if TYPE_CHECKING:
    from edit2deploy.scoring import Scorer

PROTECT_CHOICES = ("none", "q8_0", "f16")
SIDECAR_SUFFIX = ".edit2deploy.json"


@dataclass(frozen=True)
class ExportPolicy:
    """How an export treats the edited tensors.

    `protect_edits`: the lowest precision an edited tensor may be stored at, whatever the target type
    (`"q8_0"` default, `"f16"`, or `"none"`: quantize the edited tensors like the rest).
    """

    protect_edits: str = "q8_0"

    def __post_init__(self) -> None:
        if self.protect_edits not in PROTECT_CHOICES:
            raise UsageError(
                f"--protect-edits: unknown value '{self.protect_edits}' (expected one of {', '.join(PROTECT_CHOICES)})"
            )

    @classmethod
    def coerce(cls, policy: ExportPolicy | str | Mapping[str, Any] | None) -> ExportPolicy:
        """Accept a policy, a `protect_edits` string, a dict of fields, or None (defaults)."""
        if policy is None:
            return cls()
        if isinstance(policy, ExportPolicy):
            return policy
        if isinstance(policy, str):
            return cls(protect_edits=policy.lower())
        if isinstance(policy, Mapping):
            return cls(**dict(policy))
        raise TypeError(f"expected an ExportPolicy, a string or a dict, got {type(policy).__name__}")


@dataclass
class Artifact:
    """One exported model file/directory and what was done to it."""

    path: Path
    format: str  # key in FORMATS
    quant: str  # target type as asked for (canonical spelling, e.g. "Q4_K_M")
    mode: str = "full"  # "full" (converted from the model dir) or "patch" (edited tensors replaced in `base`)
    model_dir: Path | None = None  # the Hugging Face directory it was exported from
    base: Path | None = None  # patch mode: the file whose other tensors were kept byte-identical
    protect_edits: str = "q8_0"
    # HF tensor name -> final stored type ("Q8_0", "Q4_K", ...) of every edited tensor
    edited_types: dict[str, str] = field(default_factory=dict)
    # HF tensor name -> the name inside the artifact ("blk.4.ffn_down.weight")
    edited_names: dict[str, str] = field(default_factory=dict)
    type_counts: dict[str, int] = field(default_factory=dict)  # stored type -> number of tensors
    size_bytes: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.model_dir = None if self.model_dir is None else Path(self.model_dir)
        self.base = None if self.base is None else Path(self.base)

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("path", "model_dir", "base"):
            d[k] = None if d[k] is None else str(d[k])
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Artifact:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def sidecar_path(path: Path | str) -> Path:
    """`<artifact>.edit2deploy.json`: the artifact record written next to an export."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(artifact: Artifact) -> Path:
    """Write the artifact record next to the artifact (atomically)."""
    with atomic_file(artifact.sidecar, "w") as fh:
        json.dump(artifact.to_json(), fh, indent=1)
        fh.write("\n")
    return artifact.sidecar


def read_sidecar(path: Path | str) -> Artifact | None:
    """The artifact record of `path`, or None when there is none (not exported by us)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    art = Artifact.from_json(json.loads(side.read_text()))
    art.path = Path(path)
    return art


@runtime_checkable
class Exporter(Protocol):
    """A deployment format: write artifacts, score them in their runtime, recognise them."""

    name: str

    def export(
        self,
        model_dir: Path | str,
        out: Path | str,
        quant: str,
        policy: ExportPolicy | str | None = None,
        **kwargs: Any,
    ) -> Artifact:
        """Write `model_dir` (a Hugging Face directory, possibly edited) to `out` at `quant`."""
        ...

    def scorer(self, artifact: Artifact | Path | str, **kwargs: Any) -> Scorer:
        """Open an artifact in the format's own runtime."""
        ...

    def detect(self, path: Path | str) -> bool:
        """Whether `path` holds an artifact of this format."""
        ...

    def quants(self) -> Sequence[str]:
        """The target types `export` accepts."""
        ...


# format name -> module (relative to this package) holding a module-level `EXPORTER`
_FORMAT_MODULES: dict[str, str] = {
    "gguf": ".gguf",
    "onnx": ".onnx",
    "bnb": ".bnb",
}


class _Formats(Mapping[str, Exporter]):
    """Format registry; a format's module is imported on first use (optional runtimes stay optional)."""

    def __init__(self, modules: dict[str, str], attr: str = "EXPORTER"):
        self._modules = modules
        self._attr = attr
        self._loaded: dict[str, Exporter] = {}

    def __getitem__(self, name: str) -> Exporter:
        if name not in self._modules:
            raise KeyError(name)
        if name not in self._loaded:
            module = importlib.import_module(self._modules[name], __name__)
            self._loaded[name] = getattr(module, self._attr)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __repr__(self) -> str:
        return f"FORMATS({', '.join(self._modules)})"


FORMATS: Mapping[str, Exporter] = _Formats(_FORMAT_MODULES)


# format name -> module holding a module-level `SIMULATOR`: its quantization simulated in torch
# (`SIMULATOR.scheme(model_dir, quant, policy, ...) -> edit2deploy.quantsim.QuantScheme`).
_SIM_MODULES: dict[str, str] = {
    "gguf": ".gguf_sim",
    "onnx": ".onnx_sim",
    "bnb": ".bnb_sim",
}

SIMULATORS: Mapping[str, Any] = _Formats(_SIM_MODULES, attr="SIMULATOR")


def scheme_label(fmt: str, quant: str, policy: ExportPolicy) -> str:
    """A simulated target's name: "gguf:Q4_K_M", with ":none"/":f16" when not the default protection."""
    return f"{fmt}:{quant}" + ("" if policy.protect_edits == "q8_0" else f":{policy.protect_edits}")


def edited_tensor_list(model_dir: Path | str, edited: Sequence[str] | None) -> list[str]:
    """`edited`, or the HF names of the tensors the model's edit ledger changed."""
    from edit2deploy.ledger import read_edit_info

    return list(read_edit_info(model_dir).edited_tensors if edited is None else edited)


def get_format(name: str) -> Exporter:
    """The exporter for a format name; a clear error listing the formats otherwise."""
    key = name.lower()
    if key not in FORMATS:
        raise UsageError(f"unknown export format '{name}' (expected one of {', '.join(FORMATS)})")
    return FORMATS[key]


def detect_format(path: Path | str) -> str | None:
    """The name of the format a path holds, or None."""
    p = Path(path)
    if not os.path.exists(p):
        return None
    for name in FORMATS:
        if FORMATS[name].detect(p):
            return name
    return None


__all__ = [
    "FORMATS",
    "PROTECT_CHOICES",
    "SIMULATORS",
    "Artifact",
    "ExportPolicy",
    "Exporter",
    "detect_format",
    "get_format",
    "read_sidecar",
    "sidecar_path",
    "write_sidecar",
]
