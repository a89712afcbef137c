"""GGUF target types: what each `--quant` name means, who quantizes it, and the edit-protection order."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from edit2deploy.errors import UsageError


@dataclass(frozen=True)
class QuantSpec:
    """One target type of a GGUF export."""

    name: str  # canonical spelling, e.g. "Q4_K_M"
    file_type: FT  # general.file_type / llama_ftype
    tensor_type: QT | None  # the type of the quantized 2-D weights when we write them ourselves
    backend: str  # "numpy" (gguf.quants, written by us) or "llama.cpp" (llama_model_quantize)


_SPECS = (
    QuantSpec("F32", FT.ALL_F32, QT.F32, "numpy"),
    QuantSpec("F16", FT.MOSTLY_F16, QT.F16, "numpy"),
    QuantSpec("BF16", FT.MOSTLY_BF16, QT.BF16, "numpy"),
    QuantSpec("Q8_0", FT.MOSTLY_Q8_0, QT.Q8_0, "numpy"),
    QuantSpec("Q4_0", FT.MOSTLY_Q4_0, QT.Q4_0, "numpy"),
    QuantSpec("Q4_1", FT.MOSTLY_Q4_1, QT.Q4_1, "numpy"),
    QuantSpec("Q5_0", FT.MOSTLY_Q5_0, QT.Q5_0, "numpy"),
    QuantSpec("Q5_1", FT.MOSTLY_Q5_1, QT.Q5_1, "numpy"),
    QuantSpec("Q2_K", FT.MOSTLY_Q2_K, None, "llama.cpp"),
    QuantSpec("Q3_K_S", FT.MOSTLY_Q3_K_S, None, "llama.cpp"),
    QuantSpec("Q3_K_M", FT.MOSTLY_Q3_K_M, None, "llama.cpp"),
    QuantSpec("Q3_K_L", FT.MOSTLY_Q3_K_L, None, "llama.cpp"),
    QuantSpec("Q4_K_S", FT.MOSTLY_Q4_K_S, None, "llama.cpp"),
    QuantSpec("Q4_K_M", FT.MOSTLY_Q4_K_M, None, "llama.cpp"),
    QuantSpec("Q5_K_S", FT.MOSTLY_Q5_K_S, None, "llama.cpp"),
    QuantSpec("Q5_K_M", FT.MOSTLY_Q5_K_M, None, "llama.cpp"),
    QuantSpec("Q6_K", FT.MOSTLY_Q6_K, None, "llama.cpp"),
)
QUANTS: dict[str, QuantSpec] = {s.name: s for s in _SPECS}

# --protect-edits value -> the lowest type an edited tensor may end up with
PROTECT_TYPES: dict[str, QT | None] = {"none": None, "q8_0": QT.Q8_0, "f16": QT.F16}


def quant_spec(name: str) -> QuantSpec:
    """The spec of a target type name (case-insensitive, "q4_k_m" == "Q4_K_M")."""
    key = name.strip().upper()
    if key not in QUANTS:
        raise UsageError(f"--quant: unknown GGUF type '{name}' (expected one of {', '.join(QUANTS)})")
    return QUANTS[key]


def bits_per_weight(qtype: QT) -> float:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return 8.0 * type_size / block


def protected_type(current: QT, protect: str) -> QT:
    """The type an edited tensor is stored at: `current`, raised to the protection floor if below it."""
    floor = PROTECT_TYPES[protect]
    if floor is None or bits_per_weight(current) >= bits_per_weight(floor):
        return current
    return floor


def row_fits(qtype: QT, shape: tuple[int, ...]) -> bool:
    """Whether rows of this (numpy, row-major) shape can be stored at `qtype` (row length % block size)."""
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return len(shape) >= 1 and shape[-1] % block == 0


def n_bytes(qtype: QT, shape: tuple[int, ...]) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= int(d)
    return n // block * type_size
