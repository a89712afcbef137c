"""Do edits survive export? SmolLM2-135M, N CounterFact val edits, several GGUF / ONNX variants.

    python benchmarks/export_survival.py --n 25
    python benchmarks/export_survival.py --n 25 --variants gguf:F16,gguf:Q8_0,gguf:Q4_K_M,gguf:Q4_K_M:none,gguf:patch,onnx:int8,onnx:int4,onnx:int4:none

Each variant is exported from the edited model and verified in its own runtime against the fp32 edited
model, with the paired baseline (the unedited model exported the same way). Survival = share of fact
verdicts (edit, paraphrase, neighbourhood) equal to fp32's; baseline agreement = the paired baseline's
agreement with the unedited fp32 model on the preserved (neighbourhood) probes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import COUNTERFACT, WIKITEXT, machine, print_table, write_json

from edit2deploy.formats import get_format
from edit2deploy.gates import Gates, verify
from edit2deploy.ledger import Ledger
from edit2deploy.models import open_model, resolve_model_dir, source_gguf
from edit2deploy.ops.baseline import baseline_path
from edit2deploy.ops.edit import edit_model
from edit2deploy.requests import load_requests
from edit2deploy.scoring import TorchScorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--variants", default="gguf:F16,gguf:Q8_0,gguf:Q4_K_M,gguf:Q4_K_M:none,gguf:patch")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="e2d-survival-"))
    requests = load_requests(COUNTERFACT / "counterfact-val.json", limit=args.n)
    model_dir = work / "edited"
    if not model_dir.exists():
        t = time.perf_counter()
        edit_model("smollm2-135m", requests, model_dir, corpus=WIKITEXT, n_tokens=100_000, quiet=True)
        print(f"edited {len(requests)} facts in {time.perf_counter() - t:.0f} s")
    print(f"machine: {machine()}")
    lm = open_model(model_dir)
    ledger = Ledger.load(model_dir)
    base = open_model(ledger.state["base_model"])
    ref, base_ref = TorchScorer(lm.model, lm.tokenizer), TorchScorer(base.model, base.tokenizer)
    rows, results = [], []
    for variant in args.variants.split(","):
        fmt, _, rest = variant.partition(":")
        quant, _, protect = rest.partition(":")
        protect = protect or "q8_0"
        ex = get_format(fmt)
        kwargs = {}
        if quant == "patch":
            kwargs["patch_base"] = source_gguf("smollm2-135m")
            quant = None
        out = work / (variant.replace(":", "-") + (".gguf" if fmt == "gguf" else ""))
        t = time.perf_counter()
        art = ex.export(model_dir, out, quant, protect, **kwargs)
        export_s = time.perf_counter() - t
        bpath = baseline_path(art, ledger.state["base_fingerprint"])
        barts = (
            ex.load(bpath)
            if bpath.exists()
            else ex.paired_baseline(art, resolve_model_dir("smollm2-135m"), bpath)
        )
        res = verify(requests, ref, ex.scorer(art), base_ref, ex.scorer(barts), gates=Gates())
        r = res.rates
        results.append(
            {
                "variant": variant,
                "export_seconds": export_s,
                "size_bytes": art.size_bytes,
                "edited_types": art.edited_types,
                **res.to_json(),
            }
        )
        rows.append(
            [
                variant,
                f"{export_s:.1f}",
                f"{art.size_bytes / 2**20:.0f}",
                ",".join(sorted(set(art.edited_types.values()))) or "-",
                f"{100 * res.survival['all']:.1f}",
                f"{100 * res.survival['edited']:.1f}",
                f"{r['artifact']['edit']:.0f}/{r['artifact']['paraphrase']:.0f}/{r['artifact']['neighborhood']:.0f}",
                f"{r['baseline']['neighborhood']:.0f}",
                f"{100 * res.baseline_agreement:.1f}",
                "pass" if res.passed else "FAIL",
            ]
        )
        print(f"  {variant}: survival {100 * res.survival['all']:.1f}%", flush=True)
    fp = results[0]["rates"]["fp32"] if results else {}
    print(
        f"\nfp32 edited: ES/PS/NS {fp.get('edit', 0):.0f}/{fp.get('paraphrase', 0):.0f}/{fp.get('neighborhood', 0):.0f}"
    )
    print_table(
        [
            "variant",
            "export s",
            "MiB",
            "edited types",
            "survival %",
            "edited surv %",
            "ES/PS/NS artifact",
            "NS paired baseline",
            "baseline agreement %",
            "gates",
        ],
        rows,
    )
    write_json(args.json, {"n": args.n, "results": results})


if __name__ == "__main__":
    main()
