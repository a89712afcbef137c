"""Teacher-forced against generated: do the edits show up where users look?

Edits CounterFact or zsRE cases into SmolLM2-135M with the default method (sequential batches), exports one target
(default GGUF Q4_K_M), and verifies it with `edit2deploy.run`, which scores every fact teacher-forced and in
generated text (the prompt's greedy completion; the prompt, paraphrases and questions as chat messages through the
model's own template; neighbourhood completions) in four places: fp32 edited, the artifact in its runtime, fp32
unedited, and the paired baseline. Prints both side by side.

    cd benchmarks && python generation.py --data counterfact --split val --n 100 --batch-size 25
    cd benchmarks && python generation.py --data zsre --n 100 --batch-size 25
    cd benchmarks && python generation.py --data zsre --distinct-subjects --n 100 --batch-size 25 --set chat_contexts=auto
    cd benchmarks && python generation.py --n 100 --set chat_contexts=off   # text contexts only
    cd benchmarks && python generation.py --n 100 --set chat_contexts=auto --set chat_keys=own --harden

Statistics: WikiText-2 (100,000 tokens), as in counterfact.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import COUNTERFACT, DATA, WIKITEXT, machine, print_table, write_json

import edit2deploy
from edit2deploy.ops.settings import edit_config
from edit2deploy.requests import load_requests

ZSRE = DATA / "zsre" / "zsre-eval-head.json"
PLACES = ("fp32", "artifact", "base_fp32", "baseline")


def _share(flags: list[bool]) -> float | None:
    return None if not flags else 100.0 * sum(flags) / len(flags)


def by_source(gen, place: str) -> dict[str, float | None]:
    """Chat replies giving the new answer, per what was asked (prompt, paraphrase, question)."""
    out = {}
    for source in ("prompt", "paraphrase", "question"):
        got = [r.by[place].verdict for r in gen.rows if r.probe.kind == "chat" and r.probe.source == source]
        out[f"chat_{source}_new"] = _share([v == "new" for v in got if v is not None])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["counterfact", "zsre"], default="counterfact")
    ap.add_argument("--split", default="val", choices=["val", "train", "edit"], help="CounterFact split")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--target", default="gguf:Q4_K_M")
    ap.add_argument("--n-tokens", type=int, default=100_000)
    ap.add_argument("--out", default=None, help="run directory (default: out/generation-<data>-<offset>-<n>)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an [edit] setting")
    ap.add_argument(
        "--distinct-subjects",
        action="store_true",
        help="only the first record of each subject (zsRE's head gives one subject several contradicting targets)",
    )
    ap.add_argument(
        "--harden",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="harden each batch against --target (default: as `run`, on)",
    )
    args = ap.parse_args()
    source = ZSRE if args.data == "zsre" else COUNTERFACT / f"counterfact-{args.split}.json"
    if args.distinct_subjects:
        first: dict[str, object] = {}
        for r in load_requests(source):
            first.setdefault(r.subject.strip().lower(), r)
        requests = list(first.values())[args.offset : args.offset + args.n]
    else:
        requests = load_requests(source, limit=args.n, offset=args.offset)
    tag = "-distinct" if args.distinct_subjects else ""
    out = Path(args.out or f"out/generation-{args.data}{tag}-{args.offset}-{args.n}")
    t = time.perf_counter()
    res = edit2deploy.run(
        "smollm2-135m",
        requests,
        args.target,
        out,
        corpus=WIKITEXT,
        n_tokens=args.n_tokens,
        batch_size=args.batch_size,
        cfg=edit_config(sets=args.set),
        gates={"survival": None, "specificity_drop": None},
        harden=args.harden,
    )
    seconds = time.perf_counter() - t
    (tr,) = res.targets
    ver, gen = tr.verification, tr.verification.generation
    rows, doc = (
        [],
        {"machine": machine(), "data": str(source), "n": len(requests), "seconds": seconds, "places": {}},
    )
    for place in PLACES:
        tf = ver.rates.get(place)
        if tf is None:
            continue
        g = {**gen.rates[place], **by_source(gen, place)}
        doc["places"][place] = {"teacher_forced": tf, "generated": g}
        rows.append(
            [place]
            + [
                f"{tf[k]:.1f}" if tf.get(k) is not None else "-"
                for k in ("edit", "paraphrase", "neighborhood")
            ]
            + [
                f"{g[k]:.1f}" if g.get(k) is not None else "-"
                for k in (
                    "completion_new",
                    "chat_prompt_new",
                    "chat_paraphrase_new",
                    "chat_question_new",
                    "chat_old",
                    "neighborhood_kept",
                    "neighborhood_chat_kept",
                )
            ]
        )
    print(
        f"\n{len(requests)} {args.data} edits, {args.target}, batches of {args.batch_size}: {seconds:.0f} s"
    )
    print_table(
        ["place", "ES (TF)", "PS (TF)", "NS (TF)", "completion new", "chat prompt new", "chat paraphrase new",
         "chat question new", "chat old", "neighbourhood kept", "neighbourhood (chat) kept"],
        rows,
    )  # fmt: skip
    doc["generation_survival"] = gen.survival
    doc["neighborhood_chat_agreement"] = gen.neighborhood_chat_agreement
    if gen.neighborhood_chat_agreement is not None:
        print(f"neighbourhood questions in chat, artifact agrees with the paired baseline: "
              f"{gen.neighborhood_chat_agreement:.1f}%")  # fmt: skip
    doc["perplexity"] = {k: v.value for k, v in res.perplexity.items()}
    print(f"generation survival (artifact verdict == fp32): {gen.survival:.3f}; {'; '.join(gen.notes) or ''}")
    write_json(args.json, doc)


if __name__ == "__main__":
    main()
