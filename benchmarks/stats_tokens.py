"""How many corpus tokens do the key statistics need? The same edits made with statistics of the first N tokens
of one generated corpus, for several N (issue 30, part 5: a first edit waits for the model to write its corpus).

SmolLM2-135M samples its own corpus once (`stats.generated_token_chunks`, the offline default) and the rows are
written to `<out>/corpus.jsonl`; each N then reads that file's first N tokens, so the smaller corpora are prefixes
of the larger. For each N the same CounterFact cases are edited (default method, sequential batches) and scored in
fp32: ES / PS / NS teacher-forced, completion and chat (prompt as the user message) giving the new answer, and how
far the edited projections are from those made with the largest N (relative Frobenius norm of the difference of
the weight changes).

    cd benchmarks && python stats_tokens.py --n 50 --tokens 10000,20000,30000,50000,100000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import COUNTERFACT, machine, print_table, rates_of, write_json

import edit2deploy
from edit2deploy.generation import DEFAULT_GENERATION, generate, generation_probes
from edit2deploy.models import open_model
from edit2deploy.requests import load_requests
from edit2deploy.scoring import TorchScorer
from edit2deploy.stats import generated_token_chunks

MODEL = "smollm2-135m"


def corpus_file(out: Path, n_tokens: int) -> Path:
    """The model's own corpus of `n_tokens` tokens as JSON lines (one sampled row each), made once."""
    path = out / f"corpus-{n_tokens}.jsonl"
    if not path.exists():
        lm = open_model(MODEL)
        t = time.perf_counter()
        chunks = generated_token_chunks(lm, n_tokens)
        seconds = time.perf_counter() - t
        print(f"sampled {sum(map(len, chunks))} tokens in {seconds:.0f} s")
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for ids in chunks:
                fh.write(json.dumps({"text": lm.tokenizer.decode(ids)}) + "\n")
        tmp.replace(path)
    return path


def generated_rates(lm, requests) -> dict:
    """fp32 torch, greedy: completion of the prompt and chat reply to the prompt giving the new answer (%)."""
    probes = [
        p
        for p in generation_probes(requests)
        if p.kind == "completion" or (p.kind == "chat" and p.source == "prompt")
    ]
    got = generate(TorchScorer(lm.model, lm.tokenizer), probes, DEFAULT_GENERATION)
    out = {}
    for kind in ("completion", "chat"):
        verdicts = [g.verdict for p, g in zip(probes, got, strict=True) if p.kind == kind]
        out[f"{kind}_new"] = 100 * sum(v == "new" for v in verdicts) / max(1, len(verdicts))
    return out


def deltas(lm, base) -> dict[int, torch.Tensor]:
    """The weight change of every edited projection (edited float32 − unedited)."""
    out = {}
    for li in range(lm.num_layers):
        w, w0 = lm.arch.get_weight(lm.model, li), base.arch.get_weight(base.model, li)
        d = w.detach().float() - w0.detach().float()
        if d.abs().max() > 0:
            out[li] = d
    return out


def relative_difference(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in b)
    den = sum(float(b[k].norm() ** 2) for k in b)
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="val", choices=["val", "train", "edit"])
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--tokens", default="10000,20000,30000,50000,100000")
    ap.add_argument("--out", default="out/stats_tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = sorted(int(n) for n in args.tokens.split(","))
    out = Path(args.out)
    corpus = corpus_file(out, sizes[-1])
    requests = load_requests(COUNTERFACT / f"counterfact-{args.split}.json", limit=args.n, offset=args.offset)
    base = open_model(MODEL)
    unedited = {**rates_of(base, requests), **generated_rates(base, requests)}
    results = {}
    for n in reversed(sizes):  # the largest first: the others are compared with it
        t = time.perf_counter()
        edit2deploy.edit(MODEL, requests, out / f"edit-{n}", corpus=corpus, n_tokens=n,
                         batch_size=args.batch_size, force=True, quiet=True)  # fmt: skip
        seconds = time.perf_counter() - t
        lm = open_model(out / f"edit-{n}")
        results[n] = {
            **rates_of(lm, requests),
            **generated_rates(lm, requests),
            "edit_seconds": seconds,
            "delta": deltas(lm, base),
        }
        ref = results[sizes[-1]]["delta"]
        results[n]["relative_difference"] = relative_difference(results[n]["delta"], ref)
        print(f"N={n}: " + ", ".join(f"{k} {v:.3g}" for k, v in results[n].items() if k != "delta"))
    keys = ("ES", "PS", "NS", "completion_new", "chat_new")
    rows = [["unedited", "", *(f"{unedited[k]:.0f}" for k in keys), ""]]
    for n in sizes:
        r = results[n]
        rows.append([f"{n:,}", f"{r['relative_difference']:.3f}", *(f"{r[k]:.0f}" for k in keys),
                     f"{r['edit_seconds']:.0f}"])  # fmt: skip
    print(f"\n{len(requests)} CounterFact {args.split} edits, batches of {args.batch_size}, statistics of the "
          f"first N tokens of SmolLM2's own corpus; {machine()}")  # fmt: skip
    print_table(["N tokens", "‖ΔW − ΔW_max‖/‖ΔW_max‖", "ES", "PS", "NS", "completion new", "chat new", "edit s"],
                rows)  # fmt: skip
    write_json(args.json, {"machine": machine(), "n": len(requests), "unedited": unedited,
                           "runs": {n: {k: v for k, v in r.items() if k != "delta"} for n, r in results.items()}})  # fmt: skip


if __name__ == "__main__":
    main()
