"""ONNX export (onnxruntime-genai model builder, or a torch fallback), the record's checks, the scorer choice.

    onnx = edit2deploy.formats.get_format("onnx")
    art = onnx.export(model_dir, "out/model-int4", "int4")              # builder for llama/mistral/qwen/gemma...
    art = onnx.export(model_dir, "out/m", "int4", block_size=128, accuracy_level=4)
    art = onnx.export(model_dir, "out/m", "int4", execution_provider="cuda")
    scorer = onnx.scorer(art)                                            # edit2deploy.scoring.Scorer

Two paths (`backend=`):
- "builder" (default for the families `builder.BUILDER_ARCHITECTURES` lists): onnxruntime-genai's model
  builder, run on the local Hugging Face directory (never the hub), at fp32/int8/int4 for CPU (fp16/bf16 too for
  CUDA). The output is an onnxruntime-genai directory (`genai_config.json`, `model.onnx`, `model.onnx.data`,
  tokenizer) scored with `og.Generator` (`GenAIScorer`).
- "torch" (everything else, e.g. GPT-2): `torch.onnx.export(dynamo=True)` of a logits model + onnxruntime's
  quantizers (`torch_export`), scored in a plain `onnxruntime.InferenceSession` (`OrtScorer`).

Quantization settings (`QuantOptions`, or the same names as keywords): block size, accuracy level, embedding
and LM-head precision, algorithm, mixed layers. Defaults keep the token embedding float and the LM head 8-bit at
int4 (see `builder.QuantOptions`).

Edited-tensor protection (`ExportPolicy.protect_edits`, default "q8_0"): the ledger's edited tensors
(`read_edit_info(model_dir).edited_tensors`, e.g. `model.layers.4.mlp.down_proj.weight`) are kept out of 4-bit
quantization (`nodes_to_exclude`: `/model/layers.4/mlp/down_proj/MatMul` stays a float `MatMul`); with "f16"
they are kept out of 8-bit too; "none" quantizes them like the rest. After the build the graph is read back and
each edited tensor's node and stored type are recorded; an export that broke the floor is not published.

The record (an `Artifact`) is written inside the output directory as `edit2deploy.json`; the directory is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edit2deploy.atomic import atomic_dir, remove_stale_temps
from edit2deploy.errors import UsageError
from edit2deploy.ledger import read_edit_info

from ..base import RECORD_FILE, Artifact, ExportPolicy
from . import MODEL_FILE, QUANTS
from .builder import (
    BUILDER_ARCHITECTURES,
    QuantOptions,
    builder_extra_options,
    builder_node_candidates,
    builder_version,
    hf_architecture,
    run_builder,
)
from .graph import WeightNode, stored_type_counts, weight_nodes
from .scorer import GENAI_CONFIG, GenAIScorer, OrtScorer

FORMAT = "onnx"
BACKENDS = ("auto", "builder", "torch")
RUNTIMES = ("auto", "genai", "ort")
_QUANT_SUFFIXES = ("_Q4", "_Q8", "_quant")  # what the quantizers append to a node's name
_FLOAT_TYPES = ("float32", "float16", "bfloat16", "float64")


def _norm_quant(quant: str | None) -> str:
    q = (quant or "").strip().lower()
    aliases = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "q8": "int8", "q4": "int4"}
    q = aliases.get(q, q)
    if q not in QUANTS:
        raise UsageError(f"--quant {quant}: the ONNX format takes one of {', '.join(QUANTS)}")
    return q


def _protect_floor(policy: ExportPolicy, quant: str) -> int | None:
    """The fewest bits an edited weight may keep (None: no protection needed at this precision)."""
    floor = policy.protect_edits.bits
    if not floor:
        return None
    bits = {"int4": 4, "int8": 8}.get(quant)
    return floor if bits is not None and bits < floor else None


def _bits(stored: str) -> int:
    if stored in _FLOAT_TYPES:
        return 32 if stored in ("float32", "float64") else 16
    digits = "".join(ch for ch in stored if ch.isdigit())
    return int(digits) if digits else 0


def find_node(nodes: dict[str, WeightNode], base: str) -> WeightNode | None:
    """The weight node named `base`, or `base` plus a quantizer's suffix (`_Q4`, `_Q8`, `_quant`)."""
    if base in nodes:
        return nodes[base]
    for suffix in _QUANT_SUFFIXES:
        if base + suffix in nodes:
            return nodes[base + suffix]
    return None


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check_out(model_dir: Path, out: Path) -> None:
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise UsageError(f"{out}: the ONNX output must not be inside the input model directory")
    if out.is_file():
        raise UsageError(f"{out}: is a file (expected a directory to write the ONNX model into)")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD_FILE).is_file():
        raise UsageError(f"{out}: exists and is not an edit2deploy ONNX export; refusing to replace it")


def _tied(model_dir: Path, config: dict) -> bool:
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    from transformers import AutoConfig  # the family's default (e.g. Gemma ties, Llama does not)

    return bool(getattr(AutoConfig.from_pretrained(model_dir), "tie_word_embeddings", False))


def resolve_backend(model_dir: Path, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise UsageError(f"ONNX backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    arch, _ = hf_architecture(model_dir)
    if backend == "auto":
        return "builder" if arch in BUILDER_ARCHITECTURES else "torch"
    if backend == "builder" and arch not in BUILDER_ARCHITECTURES:
        raise UsageError(
            f"{model_dir}: onnxruntime-genai's model builder does not support '{arch or '?'}' "
            f"(it supports {', '.join(sorted(BUILDER_ARCHITECTURES))}); use the torch backend"
        )
    return backend


def export(
    model_dir: Path | str,
    out: Path | str,
    quant: str | None = "int8",
    policy: ExportPolicy | str | None = None,
    *,
    options: QuantOptions | dict | None = None,
    execution_provider: str = "cpu",
    backend: str = "auto",
    edited_tensors: Sequence[str] | None = None,
    progress: bool = False,
    **option_kw: Any,
) -> Artifact:
    """Export a Hugging Face directory to an ONNX directory `out` (atomically) with its `edit2deploy.json` record.

    `quant`: fp32, int8, int4 (fp16/bf16: CUDA builder only). `options` / keywords (`block_size`,
    `accuracy_level`, `embeddings`, `lm_head`, `algo`, `mixed_layers`, `symmetric`, `extra`): see `QuantOptions`.
    `edited_tensors`: HF names to protect instead of the ledger's (the paired unedited baseline uses the same).
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    out = Path(out)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    quant = _norm_quant(quant)
    policy = ExportPolicy.coerce(policy)
    if option_kw:
        base = QuantOptions.coerce(options).to_json()
        unknown = sorted(set(option_kw) - set(base))
        if unknown:
            raise TypeError(f"ONNX export: unknown option(s) {', '.join(unknown)}")
        options = {**base, **option_kw}
    opts = QuantOptions.coerce(options)
    backend = resolve_backend(model_dir, backend)
    if backend == "torch" and execution_provider != "cpu":
        raise UsageError("the torch ONNX fallback exports for CPU only (its graph runs on any provider)")
    _check_out(model_dir, out)
    edited = list(read_edit_info(model_dir).edited_tensors if edited_tensors is None else edited_tensors)
    floor = _protect_floor(policy, quant)
    remove_stale_temps(out)
    extra: dict[str, Any] = {
        "backend": backend,
        "execution_provider": execution_provider,
        "options": opts.to_json(),
    }
    with atomic_dir(out, replace=True) as tmp:
        if backend == "builder":
            candidates = {hf: builder_node_candidates(hf) for hf in edited}
            unplaced = [hf for hf, c in candidates.items() if not c]
            if unplaced and floor is not None:
                raise UsageError(
                    f"edited tensor(s) {', '.join(unplaced)} have no known node in the model builder's graph: "
                    "cannot protect them (use --protect-edits none to quantize them like the rest)"
                )
            exclude = [n for c in candidates.values() for n in c] if floor is not None else []
            _, config = hf_architecture(model_dir)
            kv = builder_extra_options(quant, opts, _tied(model_dir, config), exclude)
            run_builder(model_dir, tmp, quant, execution_provider, kv, progress=progress)
            extra.update(builder_version=builder_version(), builder_extra_options=kv, excluded_nodes=exclude)
            extra["tokenizer"] = tokenizer_report(model_dir, tmp)
            names = dict(candidates)
        else:
            from .torch_export import export_torch_onnx

            info = export_torch_onnx(model_dir, tmp, quant, opts, edited if floor is not None else [])
            names = {hf: ((info["nodes"][hf],) if hf in info["nodes"] else ()) for hf in edited}
            extra.update(notes=info["notes"], lm_head_node=info["lm_head_node"])
            extra["excluded_nodes"] = [n for c in names.values() for n in c] if floor is not None else []
        nodes = weight_nodes(tmp / MODEL_FILE)
        edited_names, edited_types = _record_edited(names, nodes, floor)
        art = Artifact(
            path=out,
            format=FORMAT,
            quant=quant,
            mode="full",
            model_dir=model_dir,
            protect_edits=policy.protect_edits,
            edited_types=edited_types,
            edited_names=edited_names,
            type_counts=stored_type_counts(nodes),
            extra=extra,
        )
        art.size_bytes = _dir_size(tmp)
        art.seconds = round(time.perf_counter() - t0, 3)
        (tmp / RECORD_FILE).write_text(json.dumps(art.to_json(), indent=1) + "\n")
    return art


_TOKENIZER_SAMPLES = ("Hello world", "The capital of France is", " Paris", "Eiffel Tower\n")


def tokenizer_report(model_dir: Path, onnx_dir: Path) -> dict[str, Any]:
    """Compare onnxruntime-genai's tokenizer in `onnx_dir` with the Hugging Face tokenizer of `model_dir`.

    onnxruntime-genai 0.18's `Tokenizer.encode` did not prepend BOS for a tokenizer whose BOS comes from
    tokenizer.json's post-processor (as transformers 5 saves them), not even with `add_bos_token` set in
    tokenizer_config.json, so for BOS-prepending families it lacks the BOS the model was trained with. The record says so (`genai_matches_hf`) and gives the ids HF puts before every prompt
    (`hf_prefix`), which `GenAIScorer` prepends when they are missing (and which an app must prepend too)."""
    from transformers import AutoTokenizer

    from .scorer import require_genai

    og = require_genai()
    hf = AutoTokenizer.from_pretrained(model_dir)
    genai = og.Tokenizer(og.Config(str(onnx_dir)))
    full = list(hf(_TOKENIZER_SAMPLES[0], add_special_tokens=True)["input_ids"])
    bare = list(hf(_TOKENIZER_SAMPLES[0], add_special_tokens=False)["input_ids"])
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), 0)
    prefix, suffix = full[:start], full[start + len(bare) :]
    hf_ids = {t: list(hf(t, add_special_tokens=True)["input_ids"]) for t in _TOKENIZER_SAMPLES}
    og_ids = {t: [int(x) for x in genai.encode(t)] for t in _TOKENIZER_SAMPLES}
    mismatched = [t for t in _TOKENIZER_SAMPLES if hf_ids[t] != og_ids[t]]
    fixable = all(prefix + og_ids[t] == hf_ids[t] for t in mismatched)
    report: dict[str, Any] = {
        "hf_prefix": prefix,
        "hf_suffix": suffix,
        "genai_matches_hf": not mismatched,
        "genai_needs_prefix": bool(mismatched) and fixable and bool(prefix),
    }
    if report["genai_needs_prefix"]:
        report["note"] = (
            f"onnxruntime-genai's tokenizer does not add {prefix} (BOS) before prompts as the Hugging Face "
            "tokenizer does; the scorer prepends it, and applications must too"
        )
    elif mismatched:
        report["note"] = f"onnxruntime-genai tokenizes differently from Hugging Face on {mismatched!r}"
    return report


def _record_edited(
    names: dict[str, tuple[str, ...]], nodes: dict[str, WeightNode], floor: int | None
) -> tuple[dict[str, str], dict[str, str]]:
    """HF name -> node name and -> stored type for each edited tensor; raises if protection did not hold."""
    edited_names: dict[str, str] = {}
    edited_types: dict[str, str] = {}
    problems = []
    for hf, candidates in names.items():
        found = [(c, n) for c in candidates if (n := find_node(nodes, c)) is not None]
        if not found:
            if floor is not None:
                problems.append(f"{hf}: none of {list(candidates) or ['(no known node)']} is in the graph")
            edited_names[hf], edited_types[hf] = "", "unknown"
            continue
        node = found[0][1]
        edited_names[hf], edited_types[hf] = node.name, node.stored
        if floor is not None and node.quantized and _bits(node.stored) < floor:
            problems.append(f"{hf}: node {node.name} is stored as {node.stored}, below the protection floor")
    if problems:
        raise RuntimeError(
            "ONNX export did not protect the edited weights; report this:\n" + "\n".join(problems)
        )
    return edited_names, edited_types


def is_onnx_dir(path: Path | str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MODEL_FILE).is_file()


def describe(path: Path) -> Artifact:
    """The `Artifact` of an ONNX directory we did not write: what the graph says."""
    nodes = weight_nodes(path / MODEL_FILE)
    return Artifact(
        path=path,
        format=FORMAT,
        quant="unknown",
        mode="unknown",
        protect_edits="none",
        type_counts=stored_type_counts(nodes),
        size_bytes=_dir_size(path),
        extra={"backend": "builder" if (path / GENAI_CONFIG).is_file() else "unknown"},
    )


def check(artifact: Artifact) -> list[str]:
    """Problems between an artifact record and the graph on disk (empty list: consistent)."""
    problems: list[str] = []
    nodes = weight_nodes(Path(artifact.path) / MODEL_FILE)
    floor = _protect_floor(ExportPolicy(protect_edits=artifact.protect_edits), artifact.quant)
    for hf, name in artifact.edited_names.items():
        node = nodes.get(name)
        if node is None:
            problems.append(f"{name or '(no node)'} ({hf}) is missing from {artifact.path}")
            continue
        if node.stored != artifact.edited_types.get(hf):
            problems.append(
                f"{name} is stored as {node.stored}, the record says {artifact.edited_types.get(hf)}"
            )
        if floor is not None and node.quantized and _bits(node.stored) < floor:
            problems.append(f"{name} is stored as {node.stored}, below the protection floor ({floor} bits)")
    return problems


def open_scorer(
    artifact: Artifact,
    runtime: str = "auto",
    provider: str | None = None,
    threads: int | None = None,
    **kwargs: Any,
) -> GenAIScorer | OrtScorer:
    """A `Scorer` on an ONNX directory: onnxruntime-genai for builder output, plain onnxruntime otherwise
    (`runtime="ort"` forces the plain session, e.g. to cross-check a builder model)."""
    if runtime not in RUNTIMES:
        raise UsageError(f"ONNX runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    art = artifact
    path = Path(art.path)
    provider = provider or str(art.extra.get("execution_provider", "cpu"))
    genai = (path / GENAI_CONFIG).is_file()
    if runtime == "genai" and not genai:
        raise UsageError(f"{path}: no {GENAI_CONFIG}; onnxruntime-genai cannot run it (use runtime 'ort')")
    if genai and runtime != "ort":
        tok = art.extra.get("tokenizer") or {}
        prefix = tok.get("hf_prefix") if tok.get("genai_needs_prefix") else None
        return GenAIScorer(path, provider=provider, threads=threads, prompt_prefix=prefix)
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is None and art.model_dir is not None and not _has_hf_tokenizer(path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(art.model_dir)
    return OrtScorer(path, provider=provider, threads=threads, tokenizer=tokenizer, **kwargs)


def _has_hf_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


# Run in a fresh interpreter: torch and transformers are made unimportable before anything else is imported, so
# the check proves the directory needs nothing but onnxruntime-genai (and numpy) at deployment time.
_STANDALONE = r"""
import importlib.abc, json, sys
BLOCKED = ("torch", "transformers")
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the ONNX directory must run without it")
        return None
sys.meta_path.insert(0, _Block())
import numpy as np
import onnxruntime_genai as og
model_dir, prompt, n, provider = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = og.Config(model_dir)
cfg.clear_providers()
if provider != "cpu":
    cfg.append_provider(provider)
model = og.Model(cfg)
tok = og.Tokenizer(model)
prompt_ids = tok.encode(prompt)
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt_ids) + n, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(prompt_ids)
ids = []
while len(ids) < n and not gen.is_done():
    gen.generate_next_token()
    ids.append(int(gen.get_next_tokens()[0]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"prompt_ids": [int(x) for x in prompt_ids], "ids": ids,
                  "text": tok.decode(np.asarray(ids, dtype=np.int32)), "blocked_loaded": loaded}))
"""


def standalone_generate(
    path: Path | str, prompt: str = "The capital of France is", max_new_tokens: int = 5, provider: str = "cpu"
) -> dict[str, Any]:
    """Greedy-generate with onnxruntime-genai alone, in a subprocess where importing torch or transformers fails.

    Returns {"prompt_ids", "ids", "text", "blocked_loaded"}; raises RuntimeError with the subprocess's output if
    the directory cannot run that way (e.g. it needs a torch-backed tokenizer)."""
    import subprocess
    import sys

    path = Path(path)
    if not (path / GENAI_CONFIG).is_file():
        raise UsageError(f"{path}: no {GENAI_CONFIG}; onnxruntime-genai cannot run it")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _STANDALONE, str(path), prompt, str(max_new_tokens), provider],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{path} does not run with onnxruntime-genai alone (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_baseline(artifact: Artifact, base_model_dir: Path | str, out: Path | str, **kw: Any) -> Artifact:
    """Export the unedited model exactly as `artifact` was exported (same precision, options, provider, backend,
    policy and protected tensor names), so a comparison isolates the edit from the export."""
    extra = artifact.extra
    return export(
        base_model_dir,
        out,
        artifact.quant,
        ExportPolicy(protect_edits=artifact.protect_edits),
        options=QuantOptions.coerce(extra.get("options")),
        execution_provider=str(extra.get("execution_provider", "cpu")),
        backend=str(extra.get("backend", "auto")),
        edited_tensors=list(artifact.edited_names),
        **kw,
    )
