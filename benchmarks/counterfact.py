"""CounterFact quality of sequential editing on SmolLM2-135M.

    python benchmarks/counterfact.py --n 100 --batch-size 25 --methods memit,alphaedit,encore,default
    python benchmarks/counterfact.py --quick            # 20 edits, 2 batches, default method
    python benchmarks/counterfact.py --split edit --n 1000 --batch-size 100 --eval-every 2
    python benchmarks/counterfact.py --preserved-n 2000   # train cases 1000-2999 as preserved facts

Metrics (0-100): ES efficacy (p(new) > p(true) on the edit prompt), PS paraphrase, NS neighbourhood
(locality prompt keeps its true answer), S = harmonic mean of ES/PS/NS; fluency = n-gram entropy of
greedy generations from the edit prompts (H₂/3 + 2H₃/3, as ROME); perplexity on the tail of
WikiText-2 test (disjoint from the statistics corpus, which is read from the file's start);
‖W−W0‖_F per edited layer. Evaluated on all facts edited so far.

`--preserved-n N` passes N CounterFact train cases (from `--preserved-offset`, default 1000, so disjoint from
the train cases 0-999 these benchmarks evaluate) to the editor as preserved facts (`edit --preserved`). Any
whose subject occurs in an evaluated case's prompts is dropped, so no evaluated fact is protected directly.
The default method also preserves the statistics corpus's names (`preserve_names`); those that occur in an
evaluated prompt are left out the same way (`--set preserve_names=false` turns it off).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter

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

from edit2deploy.methods import METHODS
from edit2deploy.models import open_model
from edit2deploy.ops.edit import apply_requests, prepare_editor
from edit2deploy.requests import load_requests


def harmonic(*xs: float) -> float:
    return len(xs) / sum(1 / max(x, 1e-9) for x in xs)


def ngram_entropy(tokens: list[str], n: int) -> float:
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


@torch.no_grad()
def fluency(lm, prompts: list[str], max_new_tokens: int = 50) -> float:
    tok = lm.tokenizer
    device = next(lm.model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    scores = []
    for i in range(0, len(prompts), 32):
        enc = tok(prompts[i : i + 32], return_tensors="pt", padding=True, padding_side="left").to(device)
        out = lm.model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
        for row in out[:, enc["input_ids"].shape[1] :]:
            words = tok.decode(row, skip_special_tokens=True).split()
            scores.append(ngram_entropy(words, 2) / 3 + 2 * ngram_entropy(words, 3) / 3)
    return sum(scores) / len(scores)


def evaluate(lm, requests, ppl_ids, fluency_n) -> dict:
    q = rates_of(lm, requests)
    q["S"] = harmonic(q["ES"], q["PS"], q["NS"])
    q["ppl"] = perplexity(lm, ppl_ids)
    if fluency_n:
        q["fluency"] = fluency(lm, [r.text for r in requests[:fluency_n]])
    return q


def scored_texts(evaluated) -> list[str]:
    """Every prompt the benchmark scores: no fact preserved by name (train cases, corpus names) occurs in one."""
    return [t for r in evaluated for t in (r.text, *r.paraphrases, *(nb.prompt for nb in r.neighborhood))]


def preserved_facts(evaluated, n: int, offset: int) -> list:
    """`n` train cases from `offset`, less those whose subject occurs in an evaluated prompt."""
    if not n:
        return []
    seen = "\n".join(scored_texts(evaluated))
    facts = load_requests(COUNTERFACT / "counterfact-train.json", limit=n, offset=offset)
    return [f for f in facts if f.subject not in seen]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="val", choices=["val", "train", "edit"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--methods", default="default")
    ap.add_argument("--layers", default="4-8")
    ap.add_argument(
        "--n-tokens", type=int, default=100_000, help="statistics tokens (WikiText-2 test, from the start)"
    )
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate every K batches (0: only at the end)")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--fluency-n", type=int, default=50, help="prompts for the fluency metric (0: skip)")
    ap.add_argument(
        "--set", action="append", default=[], help="hyperparameter override key=value (e.g. alpha=20)"
    )
    ap.add_argument("--quick", action="store_true", help="20 edits in 2 batches, default method, small eval")
    ap.add_argument(
        "--preserved-n", type=int, default=0, help="train cases passed as preserved facts (0: none)"
    )
    ap.add_argument(
        "--preserved-offset", type=int, default=1000, help="first train case of the preserved facts"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.batch_size, args.methods, args.fluency_n, args.ppl_tokens = 20, 10, "default", 10, 2048
        args.n_tokens = min(args.n_tokens, 20_000)

    requests = load_requests(COUNTERFACT / f"counterfact-{args.split}.json", limit=args.n, offset=args.offset)
    print(
        f"machine: {machine()}\n{len(requests)} {args.split} cases, batch {args.batch_size}, layers {args.layers}"
    )
    from edit2deploy.ops.settings import edit_config_from

    preserved = preserved_facts(requests, args.preserved_n, args.preserved_offset)
    if preserved:
        print(f"preserved facts: {len(preserved)} train cases from {args.preserved_offset}")

    overrides = overrides_of(args.set)
    lm = open_model("smollm2-135m", device=args.device)
    ppl_ids = tail_ids(lm, args.ppl_tokens)
    unedited = evaluate(lm, requests, ppl_ids, args.fluency_n)
    rows = [
        [
            "unedited",
            "-",
            f"{unedited['ES']:.1f}",
            f"{unedited['PS']:.1f}",
            f"{unedited['NS']:.1f}",
            f"{unedited['S']:.1f}",
            f"{unedited.get('fluency', 0):.2f}",
            f"{unedited['ppl']:.2f}",
            "-",
            "-",
            "-",
        ]
    ]
    results = {"unedited": unedited, "methods": {}}
    for method in args.methods.split(","):
        cfg = edit_config_from({**overrides, "method": method, "layers": args.layers}, "--set")
        lm = open_model("smollm2-135m", device=args.device)
        editor, ledger, stats_s = prepare_editor(
            lm,
            cfg,
            corpus=WIKITEXT,
            n_tokens=args.n_tokens,
            quiet=True,
            preserved=preserved if METHODS[method].uses_projector else (),  # they shape the null space
            avoid=scored_texts(requests),  # the corpus names preserved leave out every scored subject
        )
        curve, retried = [], []
        t0 = time.perf_counter()
        edit_s = 0.0
        for b in range(0, len(requests), args.batch_size):
            t = time.perf_counter()
            run = apply_requests(
                editor, ledger, requests[b : b + args.batch_size], args.batch_size, quiet=True
            )
            edit_s += time.perf_counter() - t
            if run.failed:
                print(f"  {method}: batch failed: {run.failed['error']}")
                break
            retry = run.batches[-1].get("retry")
            if retry is not None:
                tried = [len(r["retried"]) for r in retry["rounds"]]
                retried.append(
                    {"batch": b // args.batch_size + 1, "retried": tried, "failed": len(retry["failed"])}
                )
                print(
                    f"  {method}: batch {retried[-1]['batch']}: retried {tried}, still failing {len(retry['failed'])}"
                )
            nb = b // args.batch_size + 1
            last = b + args.batch_size >= len(requests)
            if last or (args.eval_every and nb % args.eval_every == 0):
                done = requests[: b + args.batch_size]
                q = evaluate(lm, done, ppl_ids, args.fluency_n if last else 0)
                q["edits"] = len(done)
                q["norms"] = {r["layer"]: r["fro_from_original"] for r in run.batches[-1]["tensors"].values()}
                curve.append(q)
                print(
                    f"  {method} @ {len(done)} edits: ES {q['ES']:.1f} PS {q['PS']:.1f} NS {q['NS']:.1f} "
                    f"ppl {q['ppl']:.2f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        final = curve[-1]
        results["methods"][method] = {
            "curve": curve,
            "edit_seconds": edit_s,
            "stats_seconds": stats_s,
            "retry": retried,
        }
        norms = " ".join(f"{v:.1f}" for v in final["norms"].values())
        rows.append(
            [
                method,
                final["edits"],
                f"{final['ES']:.1f}",
                f"{final['PS']:.1f}",
                f"{final['NS']:.1f}",
                f"{final['S']:.1f}",
                f"{final.get('fluency', 0):.2f}",
                f"{final['ppl']:.2f}",
                f"{(final['ppl'] / unedited['ppl'] - 1) * 100:+.1f}%",
                f"{edit_s / final['edits']:.2f}",
                norms,
            ]
        )
    print()
    print_table(
        ["method", "edits", "ES", "PS", "NS", "S", "fluency", "ppl", "Δppl", "s/edit", "‖W−W0‖_F per layer"],
        rows,
    )
    write_json(args.json, {"args": vars(args), **results})


if __name__ == "__main__":
    main()
