"""`edit2deploy export` and `edit2deploy verify`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .common import add_no_generation, positive, print_table

TARGET_HELP = (
    "FORMAT:TYPE[:PROTECTION], e.g. gguf:Q4_K_M, onnx:int4:none, bnb:nf4 (PROTECTION: q8_0, f16, none)"
)


# ---------------------------------------------------------------- export
def add_export(sub) -> Callable:
    p = sub.add_parser("export", help="export a (patched) model to a deployment format (gguf, onnx, bnb)")
    p.add_argument(
        "--model", required=True, help="HF directory (e.g. an `edit` output), .gguf, or built-in name"
    )
    p.add_argument("--target", default=None, help=TARGET_HELP)
    p.add_argument("--format", default=None, help="gguf | onnx | bnb (instead of --target)")
    p.add_argument(
        "--quant",
        default=None,
        help="with --format: the type, e.g. Q4_K_M, Q8_0, F16 (gguf); int4, int8, fp32 (onnx); nf4, int8 (bnb)",
    )
    p.add_argument("--out", required=True, help="output file (gguf) or directory (onnx, bnb)")
    p.add_argument(
        "--protect-edits",
        default=None,
        help="none | q8_0 | f16: lowest precision for edited tensors (default q8_0)",
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


ONNX_FLAGS = {  # option name -> its flag
    "execution_provider": "execution_provider",
    "block_size": "block_size",
    "accuracy_level": "accuracy_level",
    "backend": "onnx_backend",
    "embeddings": "onnx_embeddings",
    "lm_head": "onnx_lm_head",
}


def cmd_export(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..ops.export import export, resolve_target

    options = {
        name: getattr(args, flag) for name, flag in ONNX_FLAGS.items() if getattr(args, flag) is not None
    }
    fmt, _, _ = resolve_target(args.target, args.format, args.quant, args.protect_edits)
    if options and fmt.name != "onnx":
        raise UsageError(
            f"--{ONNX_FLAGS[next(iter(options))].replace('_', '-')} applies to onnx targets only"
        )
    art = export(
        args.model,
        args.out,
        args.target,
        format=args.format,
        quant=args.quant,
        protect_edits=args.protect_edits,
        patch=args.patch,
        options=options,
        progress=not getattr(args, "quiet", False),
    )
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
    p.add_argument("--limit", type=positive, default=None, help="only the first N records of --edits")
    p.add_argument(
        "--preserved", default=None, help="extra facts that must not change (same formats as --edits)"
    )
    p.add_argument("--preserved-n", type=positive, default=50, help="use at most this many preserved facts")
    p.add_argument(
        "--gate",
        action="append",
        default=[],
        help="NAME=VALUE (survival, specificity_drop, efficacy, relative_margin, perplexity_increase; "
        "'off' disables); repeatable",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the paired baseline export")
    add_no_generation(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 references)")
    p.add_argument("--report", default=None, help="also write the JSON report here")
    p.add_argument("--json", action="store_true")
    return cmd_verify


def _stderr(msg: str) -> None:
    print(f"edit2deploy: {msg}", file=sys.stderr, flush=True)


def cmd_verify(args: argparse.Namespace) -> int:
    from ..atomic import atomic_file
    from ..generation import DEFAULT_GENERATION
    from ..ops.verify import verify

    res = verify(
        args.artifact,
        args.model,
        args.edits,
        preserved=args.preserved,
        gates=args.gate,
        baseline=not args.no_baseline,
        limit=args.limit,
        preserved_n=args.preserved_n,
        device=args.device,
        log=_stderr,
        generation=None if args.no_generation else DEFAULT_GENERATION,
    )
    doc = {"model": str(args.model), **res.to_json()}
    if args.report:
        with atomic_file(args.report, "w") as fh:
            json.dump(doc, fh, indent=1)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print_verification(res.artifact, res.verification)
    return 0 if res.passed else 1


def print_verification(art, result) -> None:
    from ..probes import RATE_KINDS

    print(f"artifact: {art.path} ({art.format} {art.quant}, {art.mode})")
    kinds = [k for k in RATE_KINDS if result.rates["fp32"].get(k) is not None]
    rows = [[scorer] + [f"{rates[k]:.1f}" for k in kinds] for scorer, rates in result.rates.items()]
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
