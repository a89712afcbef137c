"""Reading and rewriting ONNX graphs: which weight each node holds and at what precision.

`weight_nodes(path)` lists every weight-bearing node (MatMul / Gemm / Gather with a constant weight,
MatMulNBits, GatherBlockQuantized, MatMulInteger / DynamicQuantizeMatMul from dynamic int8) with the type its
weight is stored at: "float32"/"float16"/"bfloat16" for float weights, "int4"/"int8"/"uint8"... for quantized
ones. Only the graph is loaded (not the external weight data), so it is cheap on big models.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edit2deploy.errors import UsageError

if TYPE_CHECKING:
    import onnx

WEIGHT_OPS = ("MatMul", "Gemm", "Gather")
_PASS_THROUGH = ("Transpose", "Cast", "Reshape", "Identity", "DequantizeLinear")


@dataclass(frozen=True)
class WeightNode:
    name: str
    op_type: str
    weight: str  # the initializer holding the (possibly quantized) weight
    stored: str  # "float32", "int4", "int8", ...

    @property
    def quantized(self) -> bool:
        return not self.stored.startswith(("float", "bfloat"))


def require_onnx():
    """The `onnx` package (imported on use, so the format registry works without the onnx extra)."""
    try:
        import onnx
    except ImportError as exc:
        raise UsageError(
            "reading ONNX graphs needs onnx: pip install onnx (or the edit2deploy[onnx] extra)"
        ) from exc
    return onnx


def _dtype_name(data_type: int) -> str:
    """ONNX tensor type -> "float32", "float16", "bfloat16", "int8", "uint8", ..."""
    name = require_onnx().TensorProto.DataType.Name(data_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def load_graph(path: Path | str) -> onnx.ModelProto:
    """The model's graph without its external weight data."""
    return require_onnx().load(str(path), load_external_data=False)


def weight_nodes(model: onnx.ModelProto | Path | str) -> dict[str, WeightNode]:
    """Every node that carries a weight, by node name."""
    onnx = require_onnx()
    TensorProto, helper = onnx.TensorProto, onnx.helper
    if not isinstance(model, onnx.ModelProto):
        model = load_graph(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def source(name: str, depth: int = 0) -> TensorProto | None:
        if name in inits:
            return inits[name]
        node = producer.get(name)
        if node is None or depth > 4:
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return a.t
            return None
        if node.op_type in _PASS_THROUGH and node.input:
            return source(node.input[0], depth + 1)
        return None

    out: dict[str, WeightNode] = {}
    for node in graph.node:
        op = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op in ("MatMulNBits", "GatherBlockQuantized"):
            # stored as packed uint8 with scales (and zero points when asymmetric): report the bit width
            w = node.input[0 if op == "GatherBlockQuantized" else 1]
            out[node.name] = WeightNode(node.name, op, w, f"int{int(attrs.get('bits', 4))}")
        elif op in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            w = node.input[1]
            init = source(w)
            stored = _dtype_name(init.data_type) if init is not None else "int8"
            out[node.name] = WeightNode(node.name, op, w, stored)
        elif op in WEIGHT_OPS:
            cand = node.input[0] if op == "Gather" else node.input[1] if len(node.input) > 1 else ""
            init = source(cand) if cand else None
            if init is not None and len(init.dims) == 2:
                out[node.name] = WeightNode(node.name, op, init.name, _dtype_name(init.data_type))
    return out


def stored_type_counts(nodes: dict[str, WeightNode]) -> dict[str, int]:
    return dict(sorted(Counter(n.stored for n in nodes.values()).items()))


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite `Gemm(A, W[, C])` with a constant W (alpha = beta = 1, transA = 0) as `MatMul(A, W') [+ C]`.

    GPT-2's Conv1D layers export as Gemm, which the 4-bit MatMulNBits quantizer skips; as MatMul they quantize
    like any other projection. `transB = 1` weights are transposed in the initializer. Returns the count.
    Needs the weight data loaded (`onnx.load(..., load_external_data=True)`).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes = []
    count = 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (
            w is None
            or w not in inits
            or attrs.get("transA", 0) != 0
            or float(attrs.get("alpha", 1.0)) != 1.0
            or float(attrs.get("beta", 1.0)) != 1.0
        ):
            new_nodes.append(node)
            continue
        if attrs.get("transB", 0):
            arr = numpy_helper.to_array(inits[w]).T.copy()
            t = numpy_helper.from_array(arr, w + "_T")
            graph.initializer.append(t)
            inits[t.name] = t
            w = t.name
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w], [mm_out], name=node.name + "_MatMul"))
        if has_bias:
            new_nodes.append(
                helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_Add")
            )
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace `MatMul(A, Transpose(W))` with a constant W by `MatMul(A, Wᵀ)` (a new initializer), so the
    quantizers (which need a constant B) see it — e.g. a tied LM head. Returns the count."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: Counter[str] = Counter(i for n in graph.node for i in n.input)
    count = 0
    drop = set()
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        tr = producer.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        perm = [a for a in tr.attribute if a.name == "perm"]
        if perm and list(perm[0].ints) not in ([1, 0], []):
            continue
        arr = numpy_helper.to_array(inits[tr.input[0]]).T.copy()
        t = numpy_helper.from_array(arr, tr.input[0] + "_T")
        graph.initializer.append(t)
        inits[t.name] = t
        node.input[1] = t.name
        if users[tr.output[0]] == 1:
            drop.add(tr.name)
        count += 1
    if drop:
        keep = [n for n in graph.node if n.name not in drop]
        del graph.node[:]
        graph.node.extend(keep)
    return count


def rename_weight_nodes(model: onnx.ModelProto, strip_prefix: str = "") -> dict[str, str]:
    """Name every float MatMul/Gemm/Gather with a constant 2-D weight after its weight's module, builder-style:
    weight `transformer.h.0.mlp.c_proj.weight` -> node `/transformer/h.0/mlp/c_proj/MatMul`.
    Returns {weight tensor name (without `strip_prefix`, `_T` suffix) -> node name}."""
    mapping: dict[str, str] = {}
    taken = {n.name for n in model.graph.node}
    nodes = weight_nodes(model)
    by_name = {n.name: n for n in model.graph.node}
    for wn in nodes.values():
        node = by_name[wn.name]
        weight = wn.weight.removesuffix("_T")
        if strip_prefix and weight.startswith(strip_prefix):
            weight = weight[len(strip_prefix) :]
        module = weight.rsplit(".", 1)[0] if weight.endswith((".weight", ".bias")) else weight
        parts: list[str] = []
        for p in module.split("."):
            if p.isdigit() and parts:
                parts[-1] = f"{parts[-1]}.{p}"
            else:
                parts.append(p)
        new = "/" + "/".join(parts) + "/" + node.op_type
        if new in taken and new != node.name:
            continue  # a weight used twice (e.g. tied embedding): keep the first name
        taken.discard(node.name)
        taken.add(new)
        node.name = new
        mapping.setdefault(weight, new)
    return mapping
