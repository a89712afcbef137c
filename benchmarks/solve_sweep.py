"""Solve-side hyperparameters (τ, α, λ, method) on the same target values: how much each costs in ES/PS/NS.

    python benchmarks/solve_sweep.py --n 50 --set tau=0.02 --set tau=0.01 --set tau=0.005 --set alpha=30

The target values z (the expensive part of an edit) do not depend on the solve's hyperparameters, so they
are optimised once for the first N CounterFact val cases (one batch, default method; `--values F` keeps them
for the next sweep); then each variant solves, spreads and applies ΔW from the same unedited weights and is
scored, with perplexity on held-out WikiText-2 (the tail; statistics read the start). One batch by default;
`--batch-size B` solves the cases as sequential batches (previous keys join the method state as in a real run)
over the same frozen δ — a proxy, since a real run re-optimises each batch's δ on the edited model
(`counterfact.py` measures that).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from _common import (
    COUNTERFACT,
    WIKITEXT,
    machine,
    overrides_of,
    perplexity,
    print_table,
    rates_of,
    tail_ids,
    write_json,
)

from edit2deploy.methods.editor import Editor, check_layers
from edit2deploy.models import open_model
from edit2deploy.ops.edit import prepare_editor
from edit2deploy.ops.settings import edit_config_from, parse_layers
from edit2deploy.requests import load_requests
from edit2deploy.stats import corpus_from_path, corpus_names, key_stats


def target_values(
    editor: Editor, requests: list, args: argparse.Namespace, z_layer: int
) -> tuple[torch.Tensor, float]:
    """δ for every case, optimised on the unedited model in chunks of the batch size (memory), kept in
    `--values` after every chunk so an interrupted run resumes where it stopped."""
    key = {"split": args.split, "n": args.n, "offset": args.offset, "z_layer": z_layer}
    path = Path(args.values) if args.values else None
    kept = torch.load(path) if path and path.exists() else None
    parts, z_s = [], 0.0
    if kept and kept["key"] == key:
        parts, z_s = list(kept["parts"]), kept["seconds"]
        print(f"target values: {sum(p.shape[1] for p in parts)} read from {path} (optimised in {z_s:.0f} s)")
    chunk = args.batch_size or len(requests)
    done = sum(p.shape[1] for p in parts)
    for i in range(done, len(requests), chunk):
        t = time.perf_counter()
        values = editor.optimise(requests[i : i + chunk])
        z_s += time.perf_counter() - t
        parts.append(values.delta)
        steps = sum(values.steps) / len(values.steps)
        print(
            f"target values {i + len(values.steps)}/{len(requests)}: {z_s:.0f} s, mean steps {steps:.1f}",
            flush=True,
        )
        if path:
            torch.save({"key": key, "parts": parts, "seconds": z_s}, path)
    return torch.cat(parts, dim=1), z_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--split", default="val", choices=["val", "train", "edit"])
    ap.add_argument("--layers", default="4-8")
    ap.add_argument("--n-tokens", type=int, default=100_000)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="solve the N cases as sequential batches of this size over the same frozen δ (0: one batch)",
    )
    ap.add_argument("--set", action="append", default=[], help="one variant: key=value[,key=value...]")
    ap.add_argument(
        "--ppl-tokens", type=int, default=8192, help="held-out WikiText-2 tokens (0: skip perplexity)"
    )
    ap.add_argument(
        "--values", default=None, help="file keeping the optimised δ: reused when it matches, else written"
    )
    ap.add_argument("--skip-default", action="store_true", help="solve only the --set variants")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    requests = load_requests(COUNTERFACT / f"counterfact-{args.split}.json", limit=args.n, offset=args.offset)
    batches = f"batches of {args.batch_size}" if args.batch_size else "one batch"
    print(f"machine: {machine()}\n{len(requests)} {args.split} cases, {batches}, layers {args.layers}")
    lm = open_model("smollm2-135m")
    ppl_ids = tail_ids(lm, args.ppl_tokens) if args.ppl_tokens else []
    unedited = rates_of(lm, requests) | {"ppl": perplexity(lm, ppl_ids) if ppl_ids else float("nan")}
    print(
        "unedited: " + " ".join(f"{k} {v:.2f}" for k, v in unedited.items() if isinstance(v, float)),
        flush=True,
    )
    specs = args.set if args.skip_default and args.set else ["default", *args.set]
    overs = {spec: ({} if spec == "default" else overrides_of(spec.split(","))) for spec in specs}
    layer_sets = {
        spec: check_layers(parse_layers(str(o.get("layers", args.layers))), lm.num_layers)
        for spec, o in overs.items()
    }
    z_layer = layer_sets[specs[0]][-1]
    if any(ls[-1] != z_layer for ls in layer_sets.values()):
        raise SystemExit("every variant's layers must end at the same layer (the δ are optimised there)")
    union = sorted({li for ls in layer_sets.values() for li in ls})
    base = edit_config_from({"layers": ",".join(map(str, union))}, "--set")
    editor, ledger, _ = prepare_editor(lm, base, corpus=WIKITEXT, n_tokens=args.n_tokens, quiet=True)
    delta, z_s = target_values(editor, requests, args, z_layer)
    # every variant's statistics (the default editor keeps C only where its solve reads it); cached by now
    stats = {
        li: s.C
        for li, s in key_stats(
            lm, union, ledger.state["base_fingerprint"], corpus_from_path(WIKITEXT), args.n_tokens, quiet=True
        ).items()
    }
    w0 = editor.weights()
    ppl0 = unedited["ppl"]

    def names(cfg) -> list[str]:  # the corpus's names, as a real run keeps them in its ledger
        if not cfg.neighbour_weight:
            return []
        return corpus_names(lm, ledger.state["base_fingerprint"], corpus_from_path(WIKITEXT), args.n_tokens)

    rows = [["unedited", "-", *(f"{unedited[m]:.0f}" for m in ("ES", "PS", "NS")), f"{ppl0:.2f}", "-", "-"]]
    results = []
    for spec in specs:
        over = overs[spec]
        cfg = edit_config_from({"layers": args.layers, **over}, "--set")
        ed = Editor(lm, cfg, stats, ledger.state["prefixes"], quiet=True, names=names(cfg))
        timings: dict[str, float] = {}
        size = args.batch_size or len(requests)
        for i in range(0, len(requests), size):
            # δ was optimised on the unedited model: later batches' targets are not re-optimised (a proxy)
            _, keys = ed.solve(requests[i : i + size], delta[:, i : i + size], timings)
            ed.add_previous_keys(keys)
        now = ed.weights()
        deltas = {li: now[li] - w0[li] for li in ed.layers}
        q = rates_of(lm, requests) | {"ppl": perplexity(lm, ppl_ids) if ppl_ids else float("nan")}
        editor.restore(w0)
        norms = " / ".join(f"{float(d.double().norm()):.1f}" for d in deltas.values())
        results.append({"variant": spec, "config": dataclasses.asdict(cfg), **q, "delta_fro": norms})
        dppl = f"{(q['ppl'] / ppl0 - 1) * 100:+.1f}%"
        row = [spec, cfg.method, *(f"{q[m]:.0f}" for m in ("ES", "PS", "NS")), f"{q['ppl']:.2f}", dppl, norms]
        rows.append(row)
        print(
            f"  {spec}: ES {q['ES']:.1f} PS {q['PS']:.1f} NS {q['NS']:.1f} ppl {q['ppl']:.2f} ({dppl}) ‖ΔW‖ {norms}",
            flush=True,
        )
    print()
    print_table(["variant", "method", "ES", "PS", "NS", "ppl", "Δppl", "‖ΔW‖_F per layer"], rows)
    write_json(args.json, {"args": vars(args), "unedited": unedited, "z_seconds": z_s, "results": results})


if __name__ == "__main__":
    main()
