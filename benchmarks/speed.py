"""Speed of the whole pipeline per phase, with peak memory: statistics, keys, z-optimisation, solve, save, export,
verify; batched vs one-request-at-a-time z-optimisation; MPES on/off.

    cd benchmarks && python speed.py          # SmolLM2-135M, 50 val cases in 2 batches of 25, layers 4-8,
                                              # variants batched,one-at-a-time,no-mpes, targets gguf:Q4_K_M,onnx:int8
    python speed.py --variants batched,no-mpes --targets gguf:Q8_0 --json /tmp/speed.json
    python speed.py --device cuda --model /path/to/hf-dir --targets none

- statistics: computed fresh (the cache is neither read nor written), all edited layers in one pass, once;
- keys / z / solve: per variant, each from a freshly loaded unedited model on the same facts (statistics excluded
  from edits/s, as in the reference measurement);
- save / export / verify: once, on the first variant's edited model (they do not depend on how δ was found).
  Verify scores the fact suite in the artifact's own runtime against the fp32 edited model; the paired-baseline
  export is left out (`baseline=False`);
- peak memory: this process's peak resident set during the phase (VmHWM, reset at the phase's start; it includes
  whatever earlier phases left resident, e.g. loaded models), and on CUDA `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import (
    COUNTERFACT,
    WIKITEXT,
    PeakMemory,
    machine,
    print_table,
    print_variants,
    speed_variants,
    variant_result,
    write_json,
)

from edit2deploy import api
from edit2deploy.methods import EditConfig
from edit2deploy.models import open_model
from edit2deploy.ops.edit import apply_requests, prepare_editor, write_model
from edit2deploy.ops.settings import parse_layers
from edit2deploy.requests import load_requests
from edit2deploy.stats import collect_key_stats, corpus_from_path, corpus_token_chunks


def _mem(m: PeakMemory) -> str:
    return f"{m.rss_mib:.0f}" + ("" if m.gpu_mib is None else f" / {m.gpu_mib:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory or .gguf")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--layers", default="4-8")
    ap.add_argument("--method", default="default")
    ap.add_argument("--n-tokens", type=int, default=100_000, help="statistics tokens (WikiText-2 test)")
    ap.add_argument("--variants", default="batched,one-at-a-time,no-mpes")
    ap.add_argument("--targets", default="gguf:Q4_K_M,onnx:int8", help="comma list of FORMAT:TYPE, or none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    base = EditConfig(method=args.method, layers=parse_layers(args.layers))
    variants = speed_variants(base)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected some of {', '.join(variants)}")
    targets = [] if args.targets == "none" else args.targets.split(",")
    requests = load_requests(COUNTERFACT / "counterfact-val.json", limit=args.n)
    print(f"machine: {machine()}\n{len(requests)} val cases, batch {args.batch_size}, layers {args.layers}")

    # ---- statistics: fresh, one pass for every edited layer
    lm = open_model(args.model, device=args.device)
    layers = list(base.layers)
    with PeakMemory(args.device) as stats_mem:
        chunks = corpus_token_chunks(lm, corpus_from_path(WIKITEXT), args.n_tokens, quiet=True)
        collect_key_stats(lm, layers, chunks, quiet=True)
    n_tok = sum(len(c) for c in chunks)
    print(f"  statistics: {stats_mem.seconds:.1f} s ({n_tok / stats_mem.seconds:.0f} tokens/s)", flush=True)
    phase_rows = [["statistics", f"{stats_mem.seconds:.1f}", f"{n_tok} tokens", _mem(stats_mem)]]

    results, first = [], None
    for name in names:
        lm = open_model(args.model, device=args.device)  # fresh, unedited
        editor, ledger, _ = prepare_editor(
            lm, variants[name], corpus=WIKITEXT, n_tokens=args.n_tokens, quiet=True
        )
        with PeakMemory(args.device) as mem:
            run = apply_requests(editor, ledger, requests, args.batch_size, quiet=True)
        if run.failed:
            raise SystemExit(f"{name}: batch {run.failed['batch']} failed: {run.failed['error']}")
        results.append(
            {
                **variant_result(name, run, mem.seconds, lm, requests),
                "peak_rss_mib": mem.rss_mib,
                "peak_gpu_mib": mem.gpu_mib,
                "memory": _mem(mem),
            }
        )
        print(f"  {name}: {mem.seconds:.1f} s", flush=True)
        if first is None:
            first = (lm, ledger, mem)
        else:
            del lm, editor
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()

    # ---- save, export, verify: once, on the first variant's edited model
    lm, ledger, edit_mem = first
    r0 = results[0]
    for k, label in (("keys", "keys"), ("z", "z-optimisation"), ("solve", "solve")):
        phase_rows.append(
            [f"{label} ({r0['variant']})", f"{r0['phases'][k]:.1f}", f"{len(requests)} edits", ""]
        )
    phase_rows[-3][3] = _mem(edit_mem)  # keys/z/solve share one peak: the edit
    exports = []
    with tempfile.TemporaryDirectory(prefix="e2d-speed-") as tmp:
        model_dir = Path(tmp) / "model"
        with PeakMemory(args.device) as m:
            write_model(lm, ledger, model_dir)
        phase_rows.append(["save (HF directory + ledger)", f"{m.seconds:.1f}", "", _mem(m)])
        del lm
        for target in targets:
            with PeakMemory(args.device) as ex:
                art = api.export(model_dir, Path(tmp) / target.replace(":", "-"), target)
            with PeakMemory(args.device) as ve:
                ver = api.verify(art, model_dir, baseline=False)
            survival = ver.survival["all"]
            exports.append(
                {
                    "target": target,
                    "export_s": ex.seconds,
                    "verify_s": ve.seconds,
                    "export_peak_rss_mib": ex.rss_mib,
                    "verify_peak_rss_mib": ve.rss_mib,
                    "survival": survival,
                    "probes": len(ver.rows),
                }
            )
            phase_rows.append([f"export {target}", f"{ex.seconds:.1f}", "", _mem(ex)])
            phase_rows.append(
                [
                    f"verify {target}",
                    f"{ve.seconds:.1f}",
                    f"{len(ver.rows)} probes, survival {survival:.1%}",
                    _mem(ve),
                ]
            )
            print(f"  {target}: export {ex.seconds:.1f} s, verify {ve.seconds:.1f} s", flush=True)

    mem_head = "peak RSS MiB" + (" / GPU MiB" if args.device.startswith("cuda") else "")
    print()
    print_table(["phase", "s", "work", mem_head], phase_rows)
    print()
    print_variants(results, mem_head)
    write_json(
        args.json,
        {
            "statistics": {"seconds": stats_mem.seconds, "tokens": n_tok, "peak_rss_mib": stats_mem.rss_mib},
            "results": results,
            "exports": exports,
            "n": args.n,
            "batch_size": args.batch_size,
            "layers": args.layers,
        },
    )


if __name__ == "__main__":
    main()
