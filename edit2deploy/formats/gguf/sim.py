"""GGUF quantization simulated in torch (`get_format("gguf").scheme(...)`).

Which type each tensor gets is read off a real export, never re-derived: for a full export the model is
exported at the target type with the same protection (llama.cpp's `llama_model_quantize` picks the K-quant
mix, including its fallbacks for rows that are not a multiple of 256) and the stored types are read back; in
patch mode the base file's types are used (raised to the protection floor for the edited tensors, as the patch
export does). Plans depend only on names, shapes, type and policy, so they are cached (a few KiB of JSON).

Activations: for a quantized weight, ggml-cpu quantizes the matmul's input rows to the weight type's
`vec_dot_type` (Q8_0 blocks of 32 for the legacy types, Q8_K blocks of 256 for K-quants, F16 for F16 weights)
and multiplies the integer rows; that rounding is simulated too (a forward pre-hook on each layer).

Each weight is then encoded with the exporter's own `encode` (the same bytes the export writes: gguf-py's numpy
kernels for the legacy types, llama.cpp's `ggml_quantize_chunk` for K-quants) and decoded with gguf-py's
`dequantize`. ggml quantizes every row on its own, so the Q/K row permutation of llama-family models commutes
with it and is not applied; GPT-2's transposed Conv1D weights are quantized along the stored rows.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from edit2deploy.atomic import atomic_file
from edit2deploy.errors import UsageError
from edit2deploy.models import cache_root
from edit2deploy.quantsim import TensorQuant

from ..base import ExportPolicy, edited_tensor_list, target_label
from .arch import ModelLayout, is_float_only
from .constants import protected_type, quant_spec, row_fits
from .patch import is_gguf, scan
from .quant import encode

PLAN_VERSION = 1


def fake_quant(rows: torch.Tensor, qtype: QT) -> torch.Tensor:
    """`rows` (float32, last axis = GGUF row) stored as `qtype` and read back, as llama.cpp sees it."""
    if qtype == QT.F32:
        return rows
    arr = np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=np.float32)
    back = gguf.quants.dequantize(encode(arr, qtype), qtype)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32).reshape(arr.shape))


def q8_0_rows(x: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0 activation rounding (blocks of 32: d = amax/127 kept as fp16, q = round(x/d))."""
    k = x.shape[-1]
    if k % 32:
        return x
    b = x.reshape(*x.shape[:-1], k // 32, 32)
    d = b.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv)
    return (q * d.to(torch.float16).to(x.dtype)).reshape(x.shape)


def q8_k_rows(x: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_K activation rounding (blocks of 256: iscale = −127/max with max the signed value of largest
    magnitude, q = min(127, round(iscale·x)), d = 1/iscale in float32)."""
    k = x.shape[-1]
    if k % 256:
        return x
    b = x.reshape(*x.shape[:-1], k // 256, 256)
    idx = b.abs().argmax(-1, keepdim=True)
    mx = b.gather(-1, idx)
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(b * iscale).clamp(max=127)
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(x.shape)


def f16_rows(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


def bf16_rows(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


# The type ggml-cpu converts a matmul's activations to for each weight type (its `vec_dot_type`): the dot
# product of the two quantized rows equals that of their dequantized values, so this is the whole effect.
_Q8_0_WEIGHTS = frozenset({QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0})  # Q8_1 rounds values like Q8_0
_Q8_K_WEIGHTS = frozenset({QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K})


def activation_fake(qtype: QT):
    """How llama.cpp's CPU backend rounds the input of a matmul with a `qtype` weight (None: float32)."""
    if qtype in _Q8_0_WEIGHTS:
        return q8_0_rows
    if qtype in _Q8_K_WEIGHTS:
        return q8_k_rows
    if qtype == QT.F16:
        return f16_rows
    if qtype == QT.BF16:
        return bf16_rows
    return None


def _tensor_fake(layout: ModelLayout, hf_name: str, qtype: QT, n_rows: int | None):
    transposed = layout.family.transpose_conv1d and hf_name.endswith(layout.family.conv1d_suffixes)

    def fake(w: torch.Tensor) -> torch.Tensor:
        rows = w.T if transposed else w
        out = rows.clone()
        n = rows.shape[0] if n_rows is None else min(n_rows, rows.shape[0])  # gemma3: vocab rows cut in GGUF
        out[:n] = fake_quant(rows[:n], qtype)
        return out.T if transposed else out

    return fake


def _plan_key(model_dir: Path, quant: str, protect: str, edited: Sequence[str], base: Path | None) -> str:
    config = (model_dir / "config.json").read_bytes()
    try:
        import llama_cpp

        lv = llama_cpp.__version__
    except ImportError:
        lv = "none"
    blob = json.dumps(
        [
            PLAN_VERSION,
            hashlib.sha256(config).hexdigest(),
            quant,
            protect,
            sorted(edited),
            lv,
            None if base is None else [str(base.resolve()), base.stat().st_size, base.stat().st_mtime_ns],
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def exported_types(
    model_dir: Path, quant: str, policy: ExportPolicy, edited: Sequence[str], cache: bool = True
) -> dict[str, str]:
    """GGUF tensor name -> stored type of a full export of `model_dir` at `quant` (cached)."""
    from .export import export, tensor_types

    key = _plan_key(model_dir, quant, policy.protect_edits, edited, None)
    store = cache_root() / "quantplans" / f"gguf-{key}.json"
    if cache and store.is_file():
        try:
            return dict(json.loads(store.read_text())["types"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable: recompute
    with tempfile.TemporaryDirectory(prefix="edit2deploy-plan-") as tmp:
        out = Path(tmp) / "plan.gguf"
        export(model_dir, out, quant, policy, edited_tensors=list(edited))
        types = tensor_types(out)
    if cache:
        store.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(store, "w") as fh:
            json.dump({"quant": quant, "protect_edits": policy.protect_edits, "types": types}, fh)
    return types


def patched_types(base: Path, policy: ExportPolicy, edited_gguf: Sequence[str]) -> dict[str, str]:
    """The types a patch export over `base` stores: the base's, edited tensors raised to the floor."""
    if not is_gguf(base):
        raise UsageError(f"{base}: patch base is not a GGUF file")
    out = {}
    edited = set(edited_gguf)
    for t in scan(base).tensors:
        qt = t.qtype
        if t.name in edited and not is_float_only(t.name, len(t.shape)):
            qt = protected_type(qt, policy.protect_edits)
            if not row_fits(qt, t.shape):
                qt = QT.F16
        out[t.name] = qt.name
    return out


@dataclass
class GGUFScheme:
    """The `QuantScheme` of one GGUF target for one model directory."""

    target: str
    layout: ModelLayout
    types: dict[str, str]  # GGUF name -> stored type
    shapes: dict[str, tuple[int, ...]]  # HF name -> shape of the weights to plan
    activations: bool = True  # also round each matmul's input as llama.cpp's CPU backend does

    def plan(self) -> dict[str, TensorQuant]:
        out: dict[str, TensorQuant] = {}
        for hf, shape in self.shapes.items():
            gname = self.layout.gguf_name(hf)
            if gname is None or gname not in self.types:
                continue
            qtype = QT[self.types[gname]]
            if qtype == QT.F32 or len(shape) < 2:
                out[hf] = TensorQuant(qtype.name, None)
                continue
            n_rows = None
            if self.layout.family.truncate_vocab and hf.endswith("embed_tokens.weight"):
                n_rows = self.layout.hparams.get("vocab_size")
            act = activation_fake(qtype) if self.activations else None
            out[hf] = TensorQuant(qtype.name, _tensor_fake(self.layout, hf, qtype, n_rows), act)
        return out


def _shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    from .writer import safetensors_index

    out = {}
    for name, path in safetensors_index(model_dir).items():
        with safe_open(path, "pt") as fh:
            out[name] = tuple(fh.get_slice(name).get_shape())
    return out


class GGUFSimulator:
    """`get_format("gguf").scheme(...)`: a `QuantScheme` for a GGUF target."""

    name = "gguf"

    def scheme(
        self,
        model_dir: Path | str,
        quant: str | None,
        policy: ExportPolicy | str | None = None,
        *,
        edited_tensors: Sequence[str] | None = None,
        patch_base: Path | str | None = None,
        **_: object,
    ) -> GGUFScheme:
        model_dir = Path(model_dir)
        policy = ExportPolicy.coerce(policy)
        layout = ModelLayout.open(model_dir)
        edited = edited_tensor_list(model_dir, edited_tensors)
        if patch_base is not None:
            edited_gguf = [g for g in (layout.gguf_name(h) for h in edited) if g is not None]
            types = patched_types(Path(patch_base), policy, edited_gguf)
            label = target_label("gguf", f"patch({Path(patch_base).name})", policy.protect_edits)
        else:
            if quant is None:
                raise UsageError("a GGUF prediction needs --quant (or --patch BASE.gguf)")
            quant = quant_spec(quant).name
            types = exported_types(model_dir, quant, policy, edited)
            label = target_label("gguf", quant, policy.protect_edits)
        return GGUFScheme(label, layout, types, _shapes(model_dir))


SIMULATOR = GGUFSimulator()
