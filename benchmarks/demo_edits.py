"""The demo's four edits in fp32 with any [edit] settings: teacher-forced margins and generated replies (torch).

A one-minute look at what a setting does to the demo's facts and neighbours before a full `edit2deploy demo`:

    cd benchmarks && python demo_edits.py --out out/demo-own --set chat_contexts=auto --set chat_keys=own
"""

from __future__ import annotations

import argparse
import time

import edit2deploy
from edit2deploy.generation import DEFAULT_GENERATION, generate, generation_probes
from edit2deploy.models import open_model
from edit2deploy.ops.demo import DEMO_N_TOKENS, demo_edits_path
from edit2deploy.ops.settings import edit_config
from edit2deploy.probes import probes_for, run_probes
from edit2deploy.requests import load_requests
from edit2deploy.scoring import TorchScorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo-edits")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an [edit] setting")
    args = ap.parse_args()
    requests = load_requests(demo_edits_path())
    t = time.perf_counter()
    edit2deploy.edit(
        "smollm2-135m", requests, args.out, cfg=edit_config(sets=args.set), n_tokens=DEMO_N_TOKENS, force=True
    )
    print(f"edit: {time.perf_counter() - t:.0f} s")
    lm = open_model(args.out)
    scorer = TorchScorer(lm.model, lm.tokenizer)
    for r in run_probes(scorer, probes_for(requests)):
        print(f"{r.probe.kind:13} {r.probe.request_id:9} {r.margin:+7.2f}  {r.probe.prompt}")
    probes = generation_probes(requests)
    for p, g in zip(probes, generate(scorer, probes, DEFAULT_GENERATION)):
        text = " ".join((g.text or "").split())[:90]
        print(f"{p.kind:13} {p.source:10} {p.request_id:9} {g.verdict or '-':8} {text}")


if __name__ == "__main__":
    main()
