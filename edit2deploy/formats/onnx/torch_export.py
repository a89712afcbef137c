"""ONNX fallback for families the model builder lacks (GPT-2): `torch.onnx.export(dynamo=True)` + quantization.

The exported graph is a plain logits model: inputs `input_ids`, `attention_mask` (int64, batch x sequence),
output `logits` (batch x sequence x vocab); positions come from the mask inside the graph, so left and right
padding both score correctly. No KV cache: it is for scoring and simple deployments in a plain
`onnxruntime.InferenceSession`, not for onnxruntime-genai.

Rewrites before quantizing: GPT-2's Conv1D layers export as `Gemm`, which the 4-bit `MatMulNBits` quantizer
skips, so every constant-weight Gemm becomes `MatMul` (+ `Add` for the bias); a tied LM head
(`MatMul(x, Transpose(W))`) gets its own transposed initializer so it can be quantized; weight nodes are
renamed after their module (`/transformer/h.4/mlp/c_proj/MatMul`).

Quantization: int8 = `onnxruntime.quantization.quantize_dynamic` (int8 weights, dynamic uint8 activations,
MatMul only); int4 = `MatMulNBitsQuantizer` (block-wise 4-bit weights), with the LM head at 8 bits by default
(a second 8-bit MatMulNBits pass). Protected (edited) nodes are excluded from the pass that would put them
below the policy's floor.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edit2deploy.errors import UsageError

from .builder import QuantOptions
from .graph import fold_weight_transposes, gemm_to_matmul, rename_weight_nodes

TORCH_PRECISIONS = ("fp32", "int8", "int4")
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_PREFIX = "model."  # the wrapper's attribute: parameters export as "model.<HF name>"


def _wrapper(model):
    import torch

    class LogitsModel(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
            )
            return out.logits

    return LogitsModel(model).eval()


def export_logits_model(model_dir: Path, path: Path) -> None:
    """torch.onnx.export(dynamo=True) of the model's logits into `path` (+ external data)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager", use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"{model_dir}: cannot load the model for ONNX export ({exc})") from exc
    model.eval()
    wrapper = _wrapper(model)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.long)
    mask = torch.ones_like(ids)
    dyn = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            wrapper,
            (ids, mask),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes=(dyn, dyn),
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)


# The torch export is the slow step; several precisions of one model in one process (a target list, a paired
# baseline) reuse it. Keyed by the weights' and config's paths, sizes and mtimes; small models only.
_RAW_CACHE: dict[tuple, bytes] = {}
_RAW_CACHE_MAX = 256 * 2**20


def _source_key(model_dir: Path) -> tuple:
    files = sorted([*model_dir.glob("*.safetensors"), model_dir / "config.json"])
    return (str(model_dir.resolve()), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def _exported(model_dir: Path, scratch: Path):
    """The float ONNX graph of the model (weights loaded), from the in-process cache or a fresh export."""
    import onnx

    key = _source_key(model_dir)
    if key in _RAW_CACHE:
        return onnx.load_from_string(_RAW_CACHE[key])
    raw = scratch / "raw.onnx"
    export_logits_model(model_dir, raw)
    model = onnx.load(str(raw), load_external_data=True)
    blob = model.SerializeToString() if model.ByteSize() < _RAW_CACHE_MAX else None
    if blob is not None:
        _RAW_CACHE.clear()  # keep one model
        _RAW_CACHE[key] = blob
    return model


def _save(model, path: Path) -> None:
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
    )


def export_torch_onnx(
    model_dir: Path,
    out_dir: Path,
    precision: str,
    options: QuantOptions,
    protected: Sequence[str],
) -> dict[str, Any]:
    """Write `out_dir/model.onnx` (+ `.data`) and the tokenizer files. `protected`: HF tensor names to keep out
    of the quantization pass. Returns {"nodes": {HF weight name -> node name}, "notes": [...]}."""

    if precision not in TORCH_PRECISIONS:
        raise UsageError(
            f"ONNX {precision}: the torch fallback makes {', '.join(TORCH_PRECISIONS)} "
            "(fp16/bf16 need a family the model builder supports)"
        )
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edit2deploy-onnx-", dir=out_dir.parent) as scratch:
        model = _exported(model_dir, Path(scratch))
        n_gemm = gemm_to_matmul(model)
        n_tr = fold_weight_transposes(model)
        if n_gemm:
            notes.append(
                f"{n_gemm} Gemm weight node(s) rewritten as MatMul (Conv1D) so they can be quantized"
            )
        if n_tr:
            notes.append(f"{n_tr} transposed weight(s) folded into initializers (tied LM head)")
        names = rename_weight_nodes(model, strip_prefix=_PREFIX)
        excluded = [names[n] for n in protected if n in names]
        head = _lm_head_node(model, names)
        final = out_dir / MODEL_FILE
        if precision == "fp32":
            _save(model, final)
        elif precision == "int8":
            _quantize_int8(model, Path(scratch), final, excluded)
        else:
            _quantize_int4(model, final, options, excluded, head)
    _save_tokenizer(model_dir, out_dir)
    return {"nodes": names, "notes": notes, "lm_head_node": head}


def _lm_head_node(model, names: dict[str, str]) -> str | None:
    """The node producing `logits` through a MatMul (the LM head), if found."""
    for key in ("lm_head.weight", "transformer.wte.weight", "model.embed_tokens.weight"):
        node = names.get(key)
        if node and node.endswith("/MatMul"):
            return node
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get("logits")
    return node.name if node is not None and node.op_type == "MatMul" else None


def _quantize_int8(model, scratch: Path, final: Path, excluded: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = scratch / "fp32.onnx"
    _save(model, src)
    root = logging.getLogger()
    level = root.level
    root.setLevel(
        logging.ERROR
    )  # quantize_dynamic logs a "consider pre-processing" warning on the root logger
    try:
        quantize_dynamic(
            src,
            final,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded or None,
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)


def _quantize_int4(model, final: Path, options: QuantOptions, excluded: list[str], head: str | None) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    skip_head = head is not None and options.lm_head != "int4"
    q4 = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=options.block_size,
        is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level,
        nodes_to_exclude=list(excluded) + ([head] if skip_head else []),
        op_types_to_quantize=("MatMul",),
    )
    q4.process()
    model = q4.model.model
    if skip_head and options.lm_head == "int8" and head not in excluded:
        # nodes_to_include only adds to op_types_to_quantize: exclude every other MatMul instead
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head]
        q8 = MatMulNBitsQuantizer(
            model,
            bits=8,
            block_size=options.block_size,
            is_symmetric=options.symmetric,
            accuracy_level=options.accuracy_level,
            nodes_to_exclude=others,
            op_types_to_quantize=("MatMul",),
        )
        q8.process()
        model = q8.model.model
    _save(model, final)


def _save_tokenizer(model_dir: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{model_dir}: cannot load the tokenizer to ship with the ONNX model ({exc})"
        ) from exc
