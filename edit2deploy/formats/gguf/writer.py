"""Full conversion of a Hugging Face directory into a GGUF, streaming one tensor at a time.

The tensor-info table is planned from safetensors headers (shapes only), the header, metadata and tensor
infos are written, then each tensor is read (`safe_open`), transformed (Q/K permutation, ...), encoded and
appended. Peak memory is one tensor, not the model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT
from safetensors import safe_open

from edit2deploy.errors import UsageError

from .arch import ModelLayout, is_float_only, is_output_like
from .constants import n_bytes, protected_type, row_fits
from .quant import encode
from .vocab import VocabInfo, add_vocab

_LEGACY_LOW_BIT = frozenset({QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1})


def safetensors_index(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the .safetensors file holding it (never a pickle)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir}: no *.safetensors weights (GGUF export reads safetensors only)")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(f, "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                out[k] = f
    return out


def tensor_meta(index: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, safetensors dtype), from the file headers only (each file opened once)."""
    by_file: dict[Path, list[str]] = {}
    for name, f in index.items():
        by_file.setdefault(f, []).append(name)
    out = {}
    for f, names in by_file.items():
        with safe_open(f, "pt") as fh:
            for name in names:
                sl = fh.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def intermediate_type(model_dir: Path) -> tuple[QT, FT]:
    """The smallest lossless GGUF type for the weights (the input handed to llama_model_quantize)."""
    dtypes = {dtype for shape, dtype in tensor_meta(safetensors_index(model_dir)).values() if len(shape) >= 2}
    if dtypes == {"BF16"}:
        return QT.BF16, FT.MOSTLY_BF16
    if dtypes == {"F16"}:
        return QT.F16, FT.MOSTLY_F16
    return QT.F32, FT.ALL_F32


@dataclass
class TensorPlan:
    """One tensor of the output: where it comes from, its GGUF name, shape and type."""

    gguf_name: str
    shape: tuple[int, ...]  # numpy order
    qtype: QT
    hf_name: str | None = None
    source: Path | None = None
    generated: torch.Tensor | None = None

    @property
    def n_bytes(self) -> int:
        return n_bytes(self.qtype, self.shape)


@dataclass
class WriteResult:
    types: dict[str, QT]  # GGUF name -> type written
    names: dict[str, str]  # HF name -> GGUF name (every written HF tensor)
    vocab: VocabInfo
    plan: list[TensorPlan] = field(default_factory=list)


def choose_type(
    gguf_name: str, shape: tuple[int, ...], target: QT, tied: bool, edited: bool, protect: str
) -> QT:
    """The stored type of one tensor for a numpy-path target (see `constants` for the protection floor).

    Norms, biases and 1-D tensors stay F32. For the 4/5-bit legacy types the output projection (or the token
    embedding doubling as it) is kept at Q8_0, as in the reference SmolLM2 Q4_1 file (llama-quantize would use
    Q6_K there). Rows that do not fit a block type fall back to F16, as llama.cpp's converter does.
    """
    if is_float_only(gguf_name, len(shape)):
        return QT.F32
    qtype = target
    if target in _LEGACY_LOW_BIT and is_output_like(gguf_name, tied):
        qtype = QT.Q8_0
    if edited:
        qtype = protected_type(qtype, protect)
    if not row_fits(qtype, shape):
        qtype = QT.F16
    return qtype


def plan_tensors(
    layout: ModelLayout,
    index: dict[str, Path],
    vocab_n: int | None,
    target: QT,
    edited: Iterable[str] = (),
    protect: str = "none",
) -> list[TensorPlan]:
    edited = set(edited)
    plans: list[TensorPlan] = []
    for gname, t in layout.extra_tensors():
        plans.append(TensorPlan(gname, tuple(t.shape), QT.F32, generated=t))
    meta = tensor_meta(index)
    for hf_name, source in index.items():
        gname = layout.gguf_name(hf_name)
        if gname is None:
            continue
        shape = layout.out_shape(hf_name, meta[hf_name][0], vocab_n)
        qtype = choose_type(gname, shape, target, layout.tied, hf_name in edited, protect)
        plans.append(TensorPlan(gname, shape, qtype, hf_name=hf_name, source=source))
    names = [p.gguf_name for p in plans]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"{layout.model_dir}: several tensors map to {', '.join(sorted(dup))}")
    missing = sorted(set(edited) - {p.hf_name for p in plans})
    if missing:
        raise UsageError(
            f"{layout.model_dir}: edited tensor(s) {', '.join(missing)} not found in the weights"
        )
    # llama.cpp's converter order: generated tensors, then HF names as sorted strings (blk.10 before blk.2).
    # llama-quantize's per-layer type mix counts tensors in file order, so this keeps K-quant mixes identical.
    plans.sort(key=lambda p: (p.hf_name is not None, p.hf_name or p.gguf_name))
    return plans


def _model_name(layout: ModelLayout) -> str:
    h = layout.hparams
    for key in ("_model_name_or_path", "_name_or_path"):
        v = h.get(key)
        if isinstance(v, str) and v and "/" not in v.strip("/") and not Path(v).is_absolute():
            return v
    return layout.model_dir.name


def load_tensor(layout: ModelLayout, plan: TensorPlan, vocab_n: int | None, handles: dict) -> np.ndarray:
    """The float32 data of one planned tensor, transformed as llama.cpp stores it."""
    if plan.generated is not None:
        return plan.generated.numpy()
    assert plan.source is not None and plan.hf_name is not None
    fh = handles.get(plan.source)
    if fh is None:
        raise RuntimeError(f"{plan.source} not open")
    t = layout.transform(plan.hf_name, fh.get_tensor(plan.hf_name), vocab_n)
    return t.numpy()


def write_gguf(
    model_dir: Path,
    out: Path,
    target: QT,
    file_type: FT,
    edited: Iterable[str] = (),
    protect: str = "none",
    progress: bool = False,
    tokenizer_pre: str | None = None,
) -> WriteResult:
    """Convert `model_dir` into the GGUF file `out` (written in place: the caller picks a temporary name)."""
    layout = ModelLayout.open(model_dir)
    index = safetensors_index(model_dir)
    writer = gguf.GGUFWriter(path=None, arch=layout.arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_model_name(layout))
    layout.write_hparams(writer)
    vocab = add_vocab(
        writer,
        model_dir,
        layout.hparams.get("vocab_size"),
        truncate=layout.family.truncate_vocab,
        pre_override=tokenizer_pre,
    )
    vocab_n = vocab.n_tokens
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    plans = plan_tensors(layout, index, vocab_n, target, edited, protect)
    for p in plans:
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.n_bytes, raw_dtype=p.qtype)
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    from tqdm import tqdm

    try:
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(f, "pt")) for f in sorted(set(index.values()))}
            bar = tqdm(plans, desc=f"GGUF {out.name}", unit="tensor", disable=not progress, leave=False)
            for p in bar:
                data = load_tensor(layout, p, vocab_n, handles)
                writer.write_tensor_data(encode(data, p.qtype))
    finally:
        writer.close()
    return WriteResult(
        types={p.gguf_name: p.qtype for p in plans},
        names={p.hf_name: p.gguf_name for p in plans if p.hf_name is not None},
        vocab=vocab,
        plan=plans,
    )
