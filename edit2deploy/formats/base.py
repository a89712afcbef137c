"""What every deployment format shares: the artifact record, the export policy, the target, and the `Format`
base class. The base class owns everything that is the same for every format (where the record lives and how it
is read and written, `load`, `detect`, option checking, default gates, the artifact's name in a run); a format
supplies its hooks (see `Format`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..atomic import atomic_file
from ..errors import UsageError

if TYPE_CHECKING:
    from ..gates import Gates
    from ..quantsim import QuantScheme
    from ..scoring import Scorer

SIDECAR_SUFFIX = ".edit2deploy.json"
RECORD_FILE = "edit2deploy.json"  # the record inside a directory artifact


class Protection(StrEnum):
    """The lowest precision an edited tensor may be stored at, whatever the target type."""

    NONE = "none"  # quantize the edited tensors like the rest
    Q8_0 = "q8_0"  # at least 8-bit (the default)
    F16 = "f16"  # at least 16-bit float

    @property
    def bits(self) -> int:
        """The fewest bits per weight an edited tensor keeps (0: no floor)."""
        return {"none": 0, "q8_0": 8, "f16": 16}[self.value]

    @classmethod
    def parse(cls, value: Protection | str, where: str = "--protect-edits") -> Protection:
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise UsageError(
                f"{where}: unknown value '{value}' (expected one of {', '.join(p.value for p in cls)})"
            ) from None


DEFAULT_PROTECTION = Protection.Q8_0
PROTECT_CHOICES = tuple(p.value for p in Protection)


@dataclass(frozen=True)
class ExportPolicy:
    """How an export treats the edited tensors (`protect_edits`: see `Protection`)."""

    protect_edits: Protection = DEFAULT_PROTECTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "protect_edits", Protection.parse(self.protect_edits))

    @classmethod
    def coerce(cls, policy: ExportPolicy | str | Mapping[str, Any] | None) -> ExportPolicy:
        """Accept a policy, a `Protection` (or its string), a dict of fields, or None (defaults)."""
        if policy is None:
            return cls()
        if isinstance(policy, ExportPolicy):
            return policy
        if isinstance(policy, str):
            return cls(protect_edits=policy)
        if isinstance(policy, Mapping):
            return cls(**dict(policy))
        raise TypeError(f"expected an ExportPolicy, a string or a dict, got {type(policy).__name__}")


@dataclass(frozen=True)
class Target:
    """One deployment target: a registered format, one of its types, the protection of the edited tensors, and
    format options (e.g. ONNX `block_size`). `str(target)` is its label, `parse_targets` its one parser."""

    format: str
    quant: str
    protection: Protection = DEFAULT_PROTECTION
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "protection", Protection.parse(self.protection))
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))

    def __str__(self) -> str:
        return target_label(self.format, self.quant, self.protection)

    @property
    def policy(self) -> ExportPolicy:
        return ExportPolicy(self.protection)

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)


def target_label(fmt: str, quant: str, protection: Protection | str = DEFAULT_PROTECTION) -> str:
    """ "gguf:Q4_K_M", with ":none"/":f16" when the protection is not the default."""
    p = Protection.parse(protection)
    return f"{fmt}:{quant}" + ("" if p == DEFAULT_PROTECTION else f":{p.value}")


@dataclass
class Artifact:
    """One exported model file/directory and what was done to it."""

    path: Path
    format: str  # key in FORMATS
    quant: str  # target type as asked for (canonical spelling, e.g. "Q4_K_M")
    mode: str = "full"  # "full" (converted from the model dir) or "patch" (edited tensors replaced in `base`)
    model_dir: Path | None = None  # the Hugging Face directory it was exported from
    base: Path | None = None  # patch mode: the file whose other tensors were kept byte-identical
    protect_edits: str = DEFAULT_PROTECTION.value
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
        self.protect_edits = str(Protection.parse(self.protect_edits).value)

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
    """`<artifact>.edit2deploy.json`: the record written next to a single-file artifact."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(artifact: Artifact) -> Path:
    """Write the artifact record next to the artifact (atomically)."""
    return _write_json(artifact.sidecar, artifact)


def read_sidecar(path: Path | str) -> Artifact | None:
    """The sidecar record of `path`, or None when there is none (not exported by us)."""
    return _read_json(sidecar_path(path), path)


def _write_json(where: Path, artifact: Artifact) -> Path:
    with atomic_file(where, "w") as fh:
        json.dump(artifact.to_json(), fh, indent=1)
        fh.write("\n")
    return where


def _read_json(where: Path, path: Path | str) -> Artifact | None:
    if not where.is_file():
        return None
    art = Artifact.from_json(json.loads(where.read_text()))
    art.path = Path(path)
    return art


def edited_tensor_list(model_dir: Path | str, edited: Sequence[str] | None) -> list[str]:
    """`edited`, or the HF names of the tensors the model's edit ledger changed."""
    from ..ledger import read_edit_info

    return list(read_edit_info(model_dir).edited_tensors if edited is None else edited)


class Format:
    """A deployment format. A subclass sets the class attributes; its package's `implementation` module holds the
    format-specific hooks as functions with these names:

    - `export(model_dir, out, quant, policy, **options) -> Artifact`: write the artifact atomically, with its
      record; every format takes `progress=` (draw a progress bar) and `edited_tensors=` besides its options;
    - `describe(path) -> Artifact`: an artifact we did not write (no record): what the file itself says;
    - `check(artifact) -> list[str]`: the post-export check, problems between the record and what is on disk;
    - `open_scorer(artifact, **kwargs) -> Scorer`: the artifact in the format's own runtime;
    - `export_baseline(artifact, base_model_dir, out) -> Artifact`: the unedited model exported exactly as
      `artifact` was (same type, policy, options, protected names).

    The module is imported on first use, so a format's runtime (llama.cpp, onnxruntime, bitsandbytes) loads only
    when that format is used. Everything else is shared and lives here."""

    name: ClassVar[str]
    quants: ClassVar[tuple[str, ...]]
    single_file: ClassVar[bool] = False  # a file (record in a sidecar) or a directory (record inside)
    options: ClassVar[tuple[str, ...]] = ()  # export options this format takes (keyword arguments)
    expected: ClassVar[str]  # what an artifact of this format is, for error messages ("a GGUF file")
    implementation: ClassVar[str] = ".export"  # the hooks' module, relative to the format's package
    simulator_module: ClassVar[str] = ".sim"  # module with `SIMULATOR`: its quantization simulated in torch

    def is_artifact(self, path: Path) -> bool:
        """Whether `path` holds an artifact of this format (record or not)."""
        raise NotImplementedError

    def _module(self, name: str) -> Any:
        return importlib.import_module(name, type(self).__module__)

    def export(
        self,
        model_dir: Path | str,
        out: Path | str,
        quant: str | None,
        policy: ExportPolicy | str | None = None,
        **kwargs: Any,
    ) -> Artifact:
        return self._module(self.implementation).export(model_dir, out, quant, policy, **kwargs)

    def describe(self, path: Path) -> Artifact:
        return self._module(self.implementation).describe(path)

    def check(self, artifact: Artifact) -> list[str]:
        return self._module(self.implementation).check(artifact)

    def open_scorer(self, artifact: Artifact, **kwargs: Any) -> Scorer:
        return self._module(self.implementation).open_scorer(artifact, **kwargs)

    def paired_baseline(self, artifact: Artifact, base_model_dir: Path | str, out: Path | str) -> Artifact:
        return self._module(self.implementation).export_baseline(artifact, base_model_dir, out)

    def after_export(self, artifact: Artifact, model_dir: Path) -> list[Path]:
        """Write the files a run puts next to a new artifact (e.g. an Ollama Modelfile); returns their paths."""
        return []

    def extra_files(self, artifact: Artifact) -> list[Path]:
        """The paths `after_export` writes for `artifact`."""
        return []

    def default_gates(self, quant: str) -> Gates:
        """The gates verification applies to this format's `quant` unless the user overrides them."""
        from ..gates import Gates  # scoring (torch) loads with verification, not with the CLI

        return Gates()

    # ------------------------------------------------------------ shared behaviour
    def record_path(self, path: Path | str) -> Path:
        """Where the record of an artifact at `path` lives."""
        path = Path(path)
        return sidecar_path(path) if self.single_file else path / RECORD_FILE

    def write_record(self, artifact: Artifact, at: Path | str | None = None) -> Path:
        """Write `artifact`'s record for an artifact that is (or will be renamed to) `artifact.path`; `at`: the
        path the artifact has now, when it is still under a temporary name (a directory keeps its record inside)."""
        where = Path(at) if at is not None else artifact.path
        if self.single_file:
            return _write_json(sidecar_path(artifact.path), artifact)
        return _write_json(where / RECORD_FILE, artifact)

    def read_record(self, path: Path | str) -> Artifact | None:
        return _read_json(self.record_path(path), path)

    def detect(self, path: Path | str) -> bool:
        p = Path(path)
        return p.exists() and self.is_artifact(p)

    def load(self, path: Path | str) -> Artifact:
        """The record of the artifact at `path`, or (not written by us) what the artifact itself says."""
        path = Path(path)
        if not self.is_artifact(path):
            raise UsageError(f"{path}: not {self.expected}")
        return self.read_record(path) or self.describe(path)

    def scorer(self, artifact: Artifact | Path | str, **kwargs: Any) -> Scorer:
        art = artifact if isinstance(artifact, Artifact) else self.load(artifact)
        return self.open_scorer(art, **kwargs)

    def check_options(self, options: Mapping[str, Any], where: str = "export") -> dict[str, Any]:
        """Only the options this format takes; an unknown one is a usage error naming it."""
        given = {k: v for k, v in options.items() if v is not None}
        bad = [k for k in given if k not in self.options]
        if bad:
            takes = f"it takes {', '.join(self.options)}" if self.options else "it takes none"
            raise UsageError(f"{where}: option '{bad[0]}' does not apply to {self.name} ({takes})")
        return given

    def artifact_name(self, target: Target) -> str:
        """The artifact's name under a run's `artifacts/`."""
        tail = "" if target.protection == DEFAULT_PROTECTION else f"-{target.protection.value}"
        return f"model-{self.name}-{target.quant}{tail}"

    def simulator(self) -> Any:
        """The format's quantization simulated in torch (`.scheme(model_dir, quant, policy, ...)`)."""
        return self._module(self.simulator_module).SIMULATOR

    def scheme(
        self, model_dir: Path | str, quant: str | None, policy: Any = None, **kwargs: Any
    ) -> QuantScheme:
        """A `QuantScheme` for `quant` of this format (see `edit2deploy.quantsim`)."""
        return self.simulator().scheme(model_dir, quant, policy, **kwargs)

    def __repr__(self) -> str:
        return f"<format {self.name}>"
