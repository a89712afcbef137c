"""ONNX weight-only quantization simulated in torch (`get_format("onnx").scheme(...)`), builder path.

Which weight the artifact stores how is read off a real export with the same options and protection (cached):
every `MatMulNBits` node gives bits, block size and whether it has zero points; float MatMuls stay as they are.
Each weight is then quantized with onnxruntime's own kernel (`quantize_matmul_4bits` / `quantize_matmul_8bits`,
what `MatMulNBitsQuantizer` runs for round-to-nearest) and dequantized as MatMulNBits does:
`w = (q − zp) · scale` per block of `block_size` along the input dimension of each output column. Fused nodes
(q/k/v → qkv_proj, gate/up) quantize each output column on its own, so every Hugging Face weight is simulated
separately. Not simulated: the torch
fallback's dynamic int8 (GPT-2). At accuracy level 4 (the CPU default) MatMulNBits also rounds its input to
int8 per block of `block_size` (MLAS's int8 compute); that is simulated with a pre-hook on the layer.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edit2deploy.atomic import atomic_file
from edit2deploy.errors import UsageError
from edit2deploy.models import cache_root
from edit2deploy.quantsim import TensorQuant

from ..base import ExportPolicy, edited_tensor_list, target_label

PLAN_VERSION = 2


@dataclass(frozen=True)
class NBits:
    bits: int
    block_size: int
    symmetric: bool

    @property
    def stored(self) -> str:
        return f"int{self.bits}/b{self.block_size}" + ("/sym" if self.symmetric else "")


def _kernels():
    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
    except ImportError as exc:
        raise UsageError("ONNX prediction needs onnxruntime: pip install 'edit2deploy[onnx]'") from exc
    return quantize_matmul_4bits, quantize_matmul_8bits


def matmul_nbits_fake(w: torch.Tensor, q: NBits) -> torch.Tensor:
    """An HF weight (out, in) as MatMulNBits stores it and multiplies with (quantize → dequantize)."""
    q4, q8 = _kernels()
    n, k = w.shape
    bs, bits = q.block_size, q.bits
    kpack = 8 // bits
    k_blocks = (k + bs - 1) // bs
    b = np.ascontiguousarray(w.detach().cpu().float().numpy().T)  # MatMul's B: (K, N)
    if k_blocks * bs != k:
        b = np.pad(b, ((0, k_blocks * bs - k), (0, 0)))
    packed = np.zeros((n, k_blocks, bs // kpack), dtype=np.uint8)
    zp = np.zeros(n * ((k_blocks + kpack - 1) // kpack), dtype=np.uint8)
    scales = np.zeros(n * k_blocks, dtype=np.float32)
    (q8 if bits == 8 else q4)(
        packed, b, scales, zp, bs, n, k, q.symmetric
    )  # as MatMulNBitsQuantizer calls it
    if bits == 4:
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k_blocks, bs)
        if q.symmetric:
            zero = np.full((n, k_blocks), 8, dtype=np.float32)
        else:
            zb = zp.reshape(n, -1)
            zero = np.stack([zb & 0x0F, zb >> 4], axis=-1).reshape(n, -1)[:, :k_blocks].astype(np.float32)
    else:
        values = packed.reshape(n, k_blocks, bs)
        zero = (
            np.full((n, k_blocks), 128, dtype=np.float32)
            if q.symmetric
            else zp.reshape(n, k_blocks).astype(np.float32)
        )
    deq = (values.astype(np.float32) - zero[..., None]) * scales.reshape(n, k_blocks)[..., None]
    return torch.from_numpy(deq.reshape(n, k_blocks * bs)[:, :k].copy()).to(w.dtype)


def int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """MLAS's int8 compute (accuracy level 4) rounding of a MatMulNBits input: symmetric int8 per block of
    `block_size` along K, scale = amax/127 (float32)."""
    k = x.shape[-1]
    pad = (-k) % block
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    b = xp.reshape(*x.shape[:-1], -1, block)
    scale = b.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    out = (torch.round(b * inv) * scale).reshape(*x.shape[:-1], -1)
    return out[..., :k]


def _graph_plan(onnx_path: Path) -> dict[str, dict[str, Any]]:
    """Node name -> {"op", "bits", "block_size", "symmetric"} for every weight node of an exported graph."""
    from onnx import helper

    from .graph import load_graph, weight_nodes

    graph = load_graph(onnx_path)
    by_name = {n.name: n for n in graph.graph.node}
    out = {}
    for name, wn in weight_nodes(graph).items():
        node = by_name[name]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        entry: dict[str, Any] = {"op": wn.op_type, "stored": wn.stored}
        if wn.op_type == "MatMulNBits":
            entry.update(
                bits=int(attrs.get("bits", 4)),
                block_size=int(attrs["block_size"]),
                symmetric=len(node.input) < 4 or not node.input[3],
                accuracy_level=int(attrs.get("accuracy_level", 0)),
            )
        elif wn.op_type == "GatherBlockQuantized":
            entry.update(
                bits=int(attrs.get("bits", 4)),
                block_size=int(attrs.get("block_size", 32)),
                symmetric=len(node.input) < 3 or not node.input[2],
            )
        out[name] = entry
    return out


def exported_plan(
    model_dir: Path, quant: str, policy: ExportPolicy, edited: Sequence[str], options: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The weight-node plan of a real export of `model_dir` with these settings (cached by config + settings)."""
    from .export import MODEL_FILE, export

    blob = json.dumps(
        [
            PLAN_VERSION,
            hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
            quant,
            policy.protect_edits,
            sorted(edited),
            options,
        ],
        sort_keys=True,
        default=str,
    )
    store = cache_root() / "quantplans" / f"onnx-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"
    if store.is_file():
        try:
            return dict(json.loads(store.read_text())["nodes"])
        except (OSError, ValueError, KeyError):
            pass
    with tempfile.TemporaryDirectory(prefix="edit2deploy-plan-") as tmp:
        out = Path(tmp) / "onnx"
        art = export(model_dir, out, quant, policy, options=options or None, edited_tensors=list(edited))
        if art.extra.get("backend") != "builder":
            raise UsageError(
                "ONNX prediction covers the model-builder path only (not the torch fallback, e.g. GPT-2)"
            )
        plan = _graph_plan(out / MODEL_FILE)
    store.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(store, "w") as fh:
        json.dump({"quant": quant, "nodes": plan}, fh)
    return plan


@dataclass
class ONNXScheme:
    target: str
    nodes: dict[str, dict[str, Any]]
    weights: list[str]  # HF names of the 2-D weights

    def plan(self) -> dict[str, TensorQuant]:
        from .builder import builder_node_candidates
        from .export import find_node
        from .graph import WeightNode

        nodes = {n: WeightNode(n, e["op"], "", e["stored"]) for n, e in self.nodes.items()}
        out: dict[str, TensorQuant] = {}
        for hf in self.weights:
            cands = builder_node_candidates(hf)
            if hf == "model.embed_tokens.weight":
                cands = cands[:1]  # the embedding's own node (the head is planned as lm_head.weight)
            found = next((find_node(nodes, c) for c in cands if find_node(nodes, c) is not None), None)
            if found is None:
                continue
            e = self.nodes[found.name]
            if "bits" not in e:
                out[hf] = TensorQuant(e["stored"], None)
                continue
            q = NBits(e["bits"], e["block_size"], e["symmetric"])
            act = None
            if e.get("accuracy_level") == 4 and e["op"] == "MatMulNBits":
                act = lambda x, bs=q.block_size: int8_blocks(x, bs)
            out[hf] = TensorQuant(q.stored, lambda w, q=q: matmul_nbits_fake(w, q), act)
        return out


def _weights(model_dir: Path) -> tuple[list[str], bool]:
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    names = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            names += [n for n in fh.keys() if n.endswith(".weight") and len(fh.get_slice(n).get_shape()) == 2]  # noqa: SIM118
    tied = bool(config.get("tie_word_embeddings", False))
    if tied and "lm_head.weight" not in names:
        names.append("lm_head.weight")  # one tensor in torch, two nodes in the graph
    return names, tied


class ONNXSimulator:
    name = "onnx"

    def scheme(
        self,
        model_dir: Path | str,
        quant: str | None,
        policy: ExportPolicy | str | None = None,
        *,
        edited_tensors: Sequence[str] | None = None,
        options: dict[str, Any] | None = None,
        **_: object,
    ) -> ONNXScheme:
        from .export import _norm_quant

        _kernels()
        model_dir = Path(model_dir)
        quant = _norm_quant(quant)
        policy = ExportPolicy.coerce(policy)
        edited = edited_tensor_list(model_dir, edited_tensors)
        nodes = exported_plan(model_dir, quant, policy, edited, dict(options or {}))
        names, _ = _weights(model_dir)
        label = target_label("onnx", quant, policy.protect_edits)
        return ONNXScheme(label, nodes, names)


SIMULATOR = ONNXSimulator()
