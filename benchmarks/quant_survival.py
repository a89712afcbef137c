"""Quantization-aware editing on SmolLM2-135M: is the torch prediction right, and does hardening help?

    python benchmarks/quant_survival.py --n 100 --batch-size 25 \
        --predict gguf:Q8_0,gguf:Q4_K_M:none,onnx:int4,bnb:nf4 --harden gguf:Q4_K_M:none,gguf:Q3_K_M:none

1. Prediction: the N CounterFact val facts are edited (default method); for each target the fact suite (edit,
   paraphrase, neighbourhood probes) is scored on the torch model with the target's quantization simulated, the
   target is exported for real and scored in its runtime (llama.cpp / onnxruntime-genai / bitsandbytes), and the
   verdicts are compared probe by probe (agreement = predicted verdict == runtime verdict).
2. Hardening: the same facts are edited again with `--harden-for T` and exported at T without protection; the
   table gives edited-fact survival (runtime verdict == fp32 verdict) unprotected / protected (Q8_0 floor) /
   hardened, and neighbourhood in fp32, in the artifact and in the paired baseline.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from _common import COUNTERFACT, WIKITEXT, machine, print_table, write_json

from edit2deploy.formats import get_format
from edit2deploy.formats import parse_targets as parse_schemes
from edit2deploy.gates import Gates, verify
from edit2deploy.ledger import Ledger
from edit2deploy.methods.harden import HardenConfig
from edit2deploy.models import open_model, resolve_model_dir
from edit2deploy.ops.baseline import baseline_path
from edit2deploy.ops.edit import edit_model
from edit2deploy.ops.predict import build_scheme
from edit2deploy.probes import EDITED_KINDS, run_probes
from edit2deploy.quantsim import Simulation, predict, suite
from edit2deploy.requests import load_requests
from edit2deploy.scoring import TorchScorer


def _edit(requests, out: Path, batch_size: int, harden=None, cfg: HardenConfig | None = None) -> float:
    if out.exists():
        return 0.0
    t = time.perf_counter()
    factories = []
    for spec in harden or []:
        factories.append(
            lambda lm, edited, spec=spec: build_scheme(spec, lm.model_dir, edited_tensors=edited)
        )
    edit_model(
        "smollm2-135m",
        requests,
        out,
        corpus=WIKITEXT,
        n_tokens=100_000,
        batch_size=batch_size,
        quiet=True,
        harden_for=factories,
        harden=cfg,
    )
    return time.perf_counter() - t


def _export(spec, model_dir: Path, work: Path, tag: str):
    ex = get_format(spec.format)
    out = work / f"{tag}-{str(spec).replace(':', '-')}{'.gguf' if spec.format == 'gguf' else ''}"
    t = time.perf_counter()
    art = ex.load(out) if out.exists() else ex.export(model_dir, out, spec.quant, spec.protection)
    return ex, art, time.perf_counter() - t


def prediction_table(requests, model_dir: Path, specs, work: Path) -> list[dict]:
    lm = open_model(model_dir)
    probes = suite(requests)
    fp32 = run_probes(TorchScorer(lm.model, lm.tokenizer), probes)
    rows, out = [], []
    for spec in specs:
        t = time.perf_counter()
        pred = predict(Simulation(lm, build_scheme(spec, model_dir)), probes, fp32)
        pred_s = time.perf_counter() - t
        ex, art, export_s = _export(spec, model_dir, work, "edited")
        t = time.perf_counter()
        sc = ex.scorer(art)
        real = run_probes(sc, probes)
        close = getattr(sc, "close", None)
        if close:
            close()
        score_s = time.perf_counter() - t
        agree = [p.predicted.success == q.success for p, q in zip(pred.rows, real)]
        agree_e = [a for a, p in zip(agree, pred.rows) if p.probe.kind in EDITED_KINDS]
        surv_real = [p.fp32.success == q.success for p, q in zip(pred.rows, real)]
        flips_real = sum(not s for s in surv_real)
        flips_pred = sum(not p.survives for p in pred.rows)
        caught = sum(1 for p, s in zip(pred.rows, surv_real) if not s and not p.survives)
        errs = [
            abs(p.predicted.margin - q.margin)
            for p, q in zip(pred.rows, real)
            if math.isfinite(p.predicted.margin) and math.isfinite(q.margin)
        ]
        doc = {
            "target": str(spec),
            "probes": len(probes),
            "agreement": sum(agree) / len(agree),
            "agreement_edited": sum(agree_e) / len(agree_e),
            "survival_real": sum(surv_real) / len(surv_real),
            "survival_predicted": pred.survival(),
            "flips_real": flips_real,
            "flips_predicted": flips_pred,
            "flips_caught": caught,
            "margin_error_mean": sum(errs) / max(1, len(errs)),
            "margin_error_max": max(errs, default=0.0),
            "predict_seconds": pred_s,
            "export_seconds": export_s,
            "runtime_score_seconds": score_s,
        }
        out.append(doc)
        rows.append(
            [
                str(spec),
                len(probes),
                f"{100 * doc['agreement']:.1f}",
                f"{100 * doc['agreement_edited']:.1f}",
                f"{100 * doc['survival_predicted']:.1f}",
                f"{100 * doc['survival_real']:.1f}",
                f"{caught}/{flips_real}",
                flips_pred,
                f"{doc['margin_error_mean']:.3f} / {doc['margin_error_max']:.2f}",
                f"{pred_s:.1f}",
                f"{export_s + score_s:.1f}",
            ]
        )
        print(f"  {spec}: agreement {100 * doc['agreement']:.1f}%", flush=True)
    print("\nPrediction vs runtime (verdict per probe)")
    print_table(
        [
            "target",
            "probes",
            "agreement %",
            "agreement edited %",
            "predicted survival %",
            "runtime survival %",
            "runtime flips caught",
            "predicted flips",
            "|margin error| mean / max",
            "predict s",
            "export+score s",
        ],
        rows,
    )
    return out


def _verify(requests, model_dir: Path, spec, work: Path, tag: str) -> dict:
    ex, art, _ = _export(spec, model_dir, work, tag)
    ledger = Ledger.load(model_dir)
    lm, base = open_model(model_dir), open_model(ledger.state["base_model"])
    bpath = baseline_path(art, ledger.state["base_fingerprint"])
    bart = (
        ex.load(bpath)
        if bpath.exists()
        else ex.paired_baseline(art, resolve_model_dir("smollm2-135m"), bpath)
    )
    res = verify(
        requests,
        TorchScorer(lm.model, lm.tokenizer),
        ex.scorer(art),
        TorchScorer(base.model, base.tokenizer),
        ex.scorer(bart),
        gates=Gates(),
    )
    return {"survival": res.survival, "rates": res.rates, "baseline_agreement": res.baseline_agreement}


def hardening_table(
    requests, plain_dir: Path, specs, work: Path, batch_size: int, cfg: HardenConfig
) -> list[dict]:
    rows, out = [], []
    for spec in specs:
        from dataclasses import replace

        hard_dir = work / f"hardened-{str(spec).replace(':', '-')}"
        secs = _edit(requests, hard_dir, batch_size, [spec], cfg)
        unprot = _verify(requests, plain_dir, replace(spec, protect_edits="none"), work, "edited")
        prot = _verify(requests, plain_dir, replace(spec, protect_edits="q8_0"), work, "edited")
        hard = _verify(requests, hard_dir, replace(spec, protect_edits="none"), work, "hardened")
        ledger = Ledger.load(hard_dir)
        n_hard = sum(
            len(r["hardened"])
            for b in ledger.active_batches
            for r in ledger.batch_record(b).get("hardening", {}).get("rounds", [])
        )
        doc = {
            "target": str(spec),
            "unprotected": unprot,
            "protected": prot,
            "hardened": hard,
            "hardened_requests": n_hard,
            "hardened_edit_seconds": secs,
        }
        out.append(doc)

        def s(v):
            return f"{100 * v['survival']['edited']:.1f}"

        def ns(v, which):
            return f"{v['rates'][which]['neighborhood']:.0f}"

        rows.append(
            [
                spec.quant,
                s(unprot),
                s(prot),
                s(hard),
                n_hard,
                f"{ns(unprot, 'fp32')} / {ns(hard, 'fp32')}",
                f"{ns(unprot, 'artifact')} / {ns(hard, 'artifact')}",
                ns(hard, "baseline"),
                f"{100 * hard['baseline_agreement']:.1f}",
            ]
        )
        print(f"  {spec}: hardened survival {s(hard)}%", flush=True)
    print("\nHardening (edited-fact survival = runtime verdict == fp32 verdict, edit + paraphrase probes)")
    print_table(
        [
            "quant",
            "unprotected %",
            "protected (Q8_0) %",
            "hardened, unprotected %",
            "re-optimised",
            "NS fp32 plain / hardened",
            "NS artifact plain / hardened",
            "NS paired baseline",
            "baseline agreement %",
        ],
        rows,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--predict", default="gguf:Q8_0,gguf:Q4_K_M:none,onnx:int4,bnb:nf4")
    ap.add_argument("--harden", default="gguf:Q4_K_M:none,gguf:Q3_K_M:none")
    ap.add_argument("--margin", type=float, default=HardenConfig.margin)
    ap.add_argument("--rounds", type=int, default=HardenConfig.rounds)
    ap.add_argument("--risk", type=float, default=HardenConfig.risk)
    ap.add_argument("--work", default=None, help="working directory (reused between runs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="e2d-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\nwork: {work}")
    requests = load_requests(COUNTERFACT / "counterfact-val.json", limit=args.n)
    plain = work / "edited"
    secs = _edit(requests, plain, args.batch_size)
    if secs:
        print(f"edited {len(requests)} facts in {secs:.0f} s")
    doc: dict = {"n": args.n, "batch_size": args.batch_size}
    if args.predict:
        doc["prediction"] = prediction_table(requests, plain, parse_schemes(args.predict), work)
    if args.harden:
        cfg = HardenConfig(margin=args.margin, rounds=args.rounds, risk=args.risk)
        doc["hardening"] = hardening_table(
            requests, plain, parse_schemes(args.harden), work, args.batch_size, cfg
        )
    write_json(args.json, doc)


if __name__ == "__main__":
    main()
