"""`edit2deploy predict`: per-fact survival of a deployment target, predicted in torch before exporting."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError


@dataclass(frozen=True)
class SchemeSpec:
    """A target to simulate: format, type, protection (e.g. gguf:Q4_K_M:none)."""

    format: str
    quant: str
    protect_edits: str

    def __str__(self) -> str:
        return f"{self.format}:{self.quant}" + (
            "" if self.protect_edits == "q8_0" else f":{self.protect_edits}"
        )


def parse_schemes(spec: str | Sequence[str], protect_edits: str = "q8_0") -> list[SchemeSpec]:
    """`"Q4_K_M,onnx:int4,bnb:nf4:none"` → schemes. A bare type names the one format that has it; a third
    field overrides the protection (`none`, `q8_0`, `f16`)."""
    from edit2deploy import exporters as ex

    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not parts:
        raise UsageError("--quant: empty (expected e.g. Q4_K_M, onnx:int4, bnb:nf4)")
    formats = [f for f in ex.SIMULATORS if f in ex.FORMATS]
    quants = {f: {q.lower(): q for q in ex.FORMATS[f].quants()} for f in formats}
    out = []
    for part in parts:
        fields = part.split(":")
        protect = protect_edits
        if len(fields) == 3:
            protect = fields[2].strip().lower()
            fields = fields[:2]
        elif (
            len(fields) == 2
            and fields[0].strip().lower() not in formats
            and fields[1].strip().lower() in ("none", "q8_0", "f16")
        ):
            protect = fields[1].strip().lower()  # TYPE:PROTECTION
            fields = fields[:1]
        if len(fields) == 1:
            q = fields[0].strip().lower()
            owners = [f for f in formats if q in quants[f]]
            if not owners:
                raise UsageError(
                    f"--quant {part}: no format has this type ("
                    + "; ".join(f"{f}: {', '.join(quants[f].values())}" for f in formats)
                    + ")"
                )
            if len(owners) > 1:
                raise UsageError(
                    f"--quant {part}: ambiguous, write one of {', '.join(f'{f}:{part}' for f in owners)}"
                )
            fmt = owners[0]
        elif len(fields) == 2:
            fmt, q = fields[0].strip().lower(), fields[1].strip().lower()
            if fmt not in formats:
                raise UsageError(
                    f"--quant {part}: format '{fmt}' cannot be simulated here (available: {', '.join(formats)})"
                )
            if q not in quants[fmt]:
                raise UsageError(
                    f"--quant {part}: {fmt} has no type '{fields[1]}' (expected one of: "
                    f"{', '.join(quants[fmt].values())})"
                )
        else:
            raise UsageError(f"--quant {part}: expected TYPE, FORMAT:TYPE or FORMAT:TYPE:PROTECTION")
        from edit2deploy.exporters import ExportPolicy

        ExportPolicy.coerce(protect)  # validates
        out.append(SchemeSpec(fmt, quants[fmt][q], protect))
    return out


def build_scheme(spec: SchemeSpec, model_dir: Path, patch_base: Path | None = None, **kw):
    """The `QuantScheme` of a target for a model directory (from the format's simulator)."""
    from edit2deploy.exporters import SIMULATORS

    if patch_base is not None:
        kw["patch_base"] = patch_base
    return SIMULATORS[spec.format].scheme(model_dir, spec.quant, spec.protect_edits, **kw)


def ledger_requests(model_dir: Path):
    """The requests of the active batches of an edited model (None when it has no ledger)."""
    from .ledger import Ledger

    ledger = Ledger.load(model_dir)
    return None if ledger is None else ledger.active_requests()


# ---------------------------------------------------------------- CLI
def add_predict(sub) -> Callable:
    p = sub.add_parser(
        "predict",
        help="predict, in torch, which fact verdicts survive a quantized deployment (before exporting)",
        description="Simulate a target's quantization of every weight (its exact block math) in torch and score "
        "the fact suite on it: per-fact predicted verdicts vs full precision.",
    )
    p.add_argument(
        "--model", required=True, help="an edited HF directory (its ledger gives the facts), or any model"
    )
    p.add_argument(
        "--quant",
        required=True,
        help="comma list of targets: Q4_K_M, gguf:Q8_0, onnx:int4, bnb:nf4; FORMAT:TYPE:none overrides "
        "--protect-edits for one target",
    )
    p.add_argument("--protect-edits", default="q8_0", help="none | q8_0 | f16 (as for export)")
    p.add_argument("--patch", default=None, help="gguf: predict a patch export over this base .gguf")
    p.add_argument("--edits", default=None, help="facts to check (default: the model's ledger)")
    p.add_argument("--preserved", default=None, help="extra unedited facts that must keep their answer")
    p.add_argument("--preserved-n", type=int, default=None, help="only the first N preserved facts")
    p.add_argument("--limit", type=int, default=None, help="only the first N edit records")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--all", action="store_true", help="list every fact (default: only predicted flips)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return cmd_predict


def cmd_predict(args: argparse.Namespace) -> int:
    from .checks import run_probes
    from .models import open_model
    from .quantsim import Simulation, predict, suite
    from .requests import load_requests
    from .scoring import TorchScorer

    schemes = parse_schemes(args.quant, args.protect_edits.lower())
    patch = Path(args.patch) if args.patch else None
    if patch is not None and not patch.is_file():
        raise UsageError(f"--patch {patch}: file not found")
    preserved = load_requests(args.preserved, limit=args.preserved_n) if args.preserved else []
    lm = open_model(args.model, device=args.device)
    requests = load_requests(args.edits, limit=args.limit) if args.edits else ledger_requests(lm.model_dir)
    if requests is None:
        raise UsageError(f"--edits is required: {args.model} has no edit ledger to take the facts from")
    probes = suite(requests, preserved)
    reference = run_probes(TorchScorer(lm.model, lm.tokenizer), probes, lm.tokenizer.decode)
    docs = []
    for spec in schemes:
        t = time.perf_counter()
        scheme = build_scheme(spec, lm.model_dir, patch if spec.format == "gguf" else None)
        pred = predict(Simulation(lm, scheme), probes, reference)
        doc = pred.to_json()
        doc["seconds"] = round(time.perf_counter() - t, 2)
        docs.append(doc)
        if not args.json:
            print_prediction(pred, show_all=args.all, seconds=doc["seconds"])
    if args.json:
        json.dump({"model": str(args.model), "predictions": docs}, sys.stdout, indent=1)
        print()
    return 0


def print_prediction(pred, show_all: bool = False, seconds: float | None = None) -> None:
    from .cli import print_table

    def m(x: float) -> str:
        return f"{x:+.2f}" if math.isfinite(x) else "-"

    rows = []
    for r in pred.rows:
        if not show_all and r.survives:
            continue
        rows.append(
            [
                r.probe.kind,
                r.probe.request_id,
                r.probe.prompt[:60],
                r.probe.expected,
                m(r.fp32.margin),
                m(r.predicted.margin),
                "ok" if r.fp32.success else "fail",
                "ok" if r.predicted.success else "fail",
                "" if r.survives else "FLIPS",
            ]
        )
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    print(f"\n== {pred.target}: predicted in torch{took}")
    if rows:
        print_table(
            ["kind", "id", "prompt", "expected", "margin fp32", "margin pred", "fp32", "pred", ""], rows
        )
    else:
        print("no fact is predicted to flip")
    surv = {
        k: pred.survival(kinds)
        for k, kinds in (
            ("all", None),
            ("edited", ("edit", "paraphrase")),
            ("preserved", ("neighborhood", "preserved")),
        )
    }
    print(
        "predicted survival: "
        + ", ".join(f"{k} {v * 100:.1f}%" for k, v in surv.items() if v is not None)
        + f"   ({len(pred.rows)} probes; margins in nats/token, expected − other)"
    )
