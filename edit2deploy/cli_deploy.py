"""CLI commands that touch deployment formats: `export` and `verify` (formats come from the registry)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import UsageError


def _exporters():
    from edit2deploy import exporters

    return exporters


# ---------------------------------------------------------------- export
def add_export(sub) -> Callable:
    p = sub.add_parser("export", help="export a (patched) model to a deployment format (gguf, onnx, bnb)")
    p.add_argument(
        "--model", required=True, help="HF directory (e.g. an `edit` output), .gguf, or built-in name"
    )
    p.add_argument("--format", required=True, help="gguf | onnx | bnb")
    p.add_argument(
        "--quant",
        default=None,
        help="target type, e.g. Q4_K_M, Q8_0, F16 (gguf); int4, int8, fp32 (onnx); nf4, int8 (bnb)",
    )
    p.add_argument("--out", required=True, help="output file (gguf) or directory (onnx, bnb)")
    p.add_argument(
        "--protect-edits", default="q8_0", help="none | q8_0 | f16: lowest precision for edited tensors"
    )
    p.add_argument(
        "--patch",
        default=None,
        help="gguf patch mode: a base .gguf whose other tensors are kept byte-identical "
        "('auto': the .gguf the base model was opened from)",
    )
    onnx = p.add_argument_group("onnx options")
    onnx.add_argument("--execution-provider", default=None, help="cpu (default) or cuda")
    onnx.add_argument(
        "--block-size", type=int, default=None, help="int4 block size (16, 32, 64, 128, 256; default 32)"
    )
    onnx.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy level 1-4")
    onnx.add_argument("--onnx-backend", default=None, help="auto | builder | torch (fallback for e.g. GPT-2)")
    onnx.add_argument("--onnx-embeddings", default=None, help="float | int4 (int4 embedding at int4 quant)")
    onnx.add_argument("--onnx-lm-head", default=None, help="int8 | float | int4")
    p.add_argument("--json", action="store_true")
    return cmd_export


def cmd_export(args: argparse.Namespace) -> int:
    from .ledger import read_edit_info
    from .models import resolve_model_dir, source_gguf

    ex = _exporters()
    exporter = ex.get_format(args.format)
    model_dir = resolve_model_dir(args.model)
    patch = args.patch
    if patch == "auto":
        base = read_edit_info(model_dir).base_model or args.model
        patch = source_gguf(base)
        if patch is None:
            raise UsageError(
                f"--patch auto: the base model '{base}' was not opened from a .gguf; name the file"
            )
    if patch is not None and not Path(patch).is_file():
        raise UsageError(f"--patch {patch}: file not found")
    if args.quant is None and patch is None:
        raise UsageError(f"--quant is required (one of: {', '.join(exporter.quants())})")
    kwargs = {"patch_base": patch} if patch is not None else {}
    onnx_opts = {
        "execution_provider": args.execution_provider,
        "block_size": args.block_size,
        "accuracy_level": args.accuracy_level,
        "backend": args.onnx_backend,
        "embeddings": args.onnx_embeddings,
        "lm_head": args.onnx_lm_head,
    }
    given = {k: v for k, v in onnx_opts.items() if v is not None}
    if given and exporter.name != "onnx":
        raise UsageError(f"--{next(iter(given)).replace('_', '-')} applies to --format onnx only")
    kwargs.update(given)
    art = exporter.export(model_dir, args.out, args.quant, args.protect_edits, **kwargs)
    if args.json:
        print(json.dumps(art.to_json(), indent=1))
        return 0
    print(
        f"wrote {art.path} ({art.format} {art.quant}, {art.mode}, {art.size_bytes / 2**20:.1f} MiB, {art.seconds:.1f} s)"
    )
    for name, t in art.edited_types.items():
        print(f"  edited tensor {name} -> {art.edited_names.get(name, name)} stored as {t}")
    return 0


# ---------------------------------------------------------------- verify
def add_verify(sub) -> Callable:
    p = sub.add_parser(
        "verify", help="check in the artifact's own runtime that edits took hold and nothing else moved"
    )
    p.add_argument(
        "--artifact", required=True, help="exported model (.gguf file, ONNX or bitsandbytes directory)"
    )
    p.add_argument("--model", required=True, help="the fp32 model it was exported from (the `edit` output)")
    p.add_argument(
        "--edits",
        default=None,
        help="edit file (edited facts, paraphrases, neighbourhood); default: the requests in the ledger",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N records of --edits")
    p.add_argument(
        "--preserved", default=None, help="extra facts that must not change (same formats as --edits)"
    )
    p.add_argument("--preserved-n", type=int, default=50, help="use at most this many preserved facts")
    p.add_argument(
        "--gate",
        action="append",
        default=[],
        help="NAME=VALUE (survival, specificity_drop, efficacy, relative_margin; 'off' disables)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the paired baseline export")
    p.add_argument("--report", default=None, help="also write the JSON report here")
    p.add_argument("--json", action="store_true")
    return cmd_verify


def baseline_path(artifact, base_fingerprint: str) -> Path:
    """Where the paired baseline of an artifact is cached (keyed by everything that shapes the export)."""
    from .models import cache_root

    key = json.dumps(
        {
            "base": base_fingerprint,
            "format": artifact.format,
            "quant": artifact.quant,
            "mode": artifact.mode,
            "protect": artifact.protect_edits,
            "edited": sorted(artifact.edited_names),
            "patch": None if artifact.base is None else [str(artifact.base), artifact.base.stat().st_size],
            "options": {k: artifact.extra.get(k) for k in ("options", "execution_provider", "backend")},
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "baselines" / f"{artifact.format}-{artifact.quant}-{digest}" / artifact.path.name


def cmd_verify(args: argparse.Namespace) -> int:
    from .ledger import Ledger
    from .models import open_model, resolve_model_dir
    from .requests import load_requests
    from .scoring import TorchScorer
    from .verify import Gates, verify

    ex = _exporters()
    requests = load_requests(args.edits, limit=args.limit) if args.edits else None
    preserved = load_requests(args.preserved, limit=args.preserved_n) if args.preserved else []
    if not Path(args.artifact).exists():
        raise UsageError(f"--artifact {args.artifact}: not found")
    fmt = ex.detect_format(args.artifact)
    if fmt is None:
        raise UsageError(
            f"--artifact {args.artifact}: not a recognised artifact (formats: {', '.join(ex.FORMATS)})"
        )
    exporter = ex.FORMATS[fmt]
    art = exporter.load(args.artifact)
    gates = Gates.parse(args.gate, getattr(exporter, "default_gates", lambda q: Gates())(art.quant))
    lm = open_model(args.model)
    decode = lm.tokenizer.decode
    reference = TorchScorer(lm.model, lm.tokenizer)
    artifact_scorer = exporter.scorer(art)
    ledger = Ledger.load(lm.model_dir)
    if requests is None:
        if ledger is None:
            raise UsageError(
                f"--edits is required: {args.model} has no edit ledger to take the requests from"
            )
        requests = ledger.active_requests()
    base_ref = baseline = None
    if ledger is not None:
        base_lm = open_model(ledger.state["base_model"])
        base_ref = TorchScorer(base_lm.model, base_lm.tokenizer)
        if not args.no_baseline:
            path = baseline_path(art, ledger.state["base_fingerprint"])
            base_art = exporter.load(path) if path.exists() else None
            if base_art is None:
                print(
                    f"exporting the paired baseline (unedited model, {art.format} {art.quant}) ...",
                    file=sys.stderr,
                )
                base_art = exporter.paired_baseline(art, resolve_model_dir(ledger.state["base_model"]), path)
            baseline = exporter.scorer(base_art)
    result = verify(requests, reference, artifact_scorer, base_ref, baseline, preserved, gates, decode)
    doc = {"artifact": art.to_json(), "model": str(args.model), **result.to_json()}
    if args.report:
        from .atomic import atomic_file

        with atomic_file(args.report, "w") as fh:
            json.dump(doc, fh, indent=1)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print_verification(art, result)
    return 0 if result.passed else 1


def print_verification(art, result) -> None:
    from .cli import print_table

    print(f"artifact: {art.path} ({art.format} {art.quant}, {art.mode})")
    kinds = [
        k
        for k in ("edit", "paraphrase", "neighborhood", "preserved")
        if result.rates["fp32"].get(k) is not None
    ]
    rows = []
    for scorer, rates in result.rates.items():
        rows.append([scorer] + [f"{rates[k]:.1f}" for k in kinds])
    print_table(["model", *kinds], rows)
    s = result.survival
    print(
        "\nsurvival (verdict in artifact == fp32): "
        + ", ".join(f"{k} {v * 100:.1f}%" for k, v in s.items() if v is not None)
    )
    if result.baseline_agreement is not None:
        print(
            f"paired baseline agreement with unedited fp32 (preserved probes): {result.baseline_agreement * 100:.1f}%"
        )
    print()
    for g in result.gates:
        print(f"[{'PASS' if g.passed else 'FAIL'}] {g.name}: {g.detail}")
        if not g.passed:
            for f in g.failing[:10]:
                print(f"        {f}")
            if len(g.failing) > 10:
                print(f"        ... and {len(g.failing) - 10} more")
