"""Where does an edit derail the chat reply? The edited model's ΔW applied only at some positions of the chat.

Takes a run directory of `generation.py` (its patched model and report), picks the facts whose chat reply to the
edit prompt (fp32) did not give the new answer, and generates each reply again (torch, fp32, greedy) on the unedited
model with the edited layers' ΔW added at chosen positions only:

- `all`: everywhere (the edited model itself);
- `user subject`: the subject's tokens in the user turn;
- `user subject last`: its last token only (where the edit's key is read);
- `all but user subject`: everywhere except those tokens;
- `none`: the unedited model.

    cd benchmarks && python chat_derail.py --run out/generation-counterfact-0-100 --n 12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import COUNTERFACT
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from edit2deploy.models import resolve_model_dir

MASKS = ("all", "user subject", "user subject last", "all but user subject", "none")


def edited_deltas(base, patched: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW per linear whose weight the patched checkpoint changed, by module name."""
    out = {}
    for name, module in base.named_modules():
        key = f"{name}.weight"
        if isinstance(module, torch.nn.Linear) and key in patched:
            diff = patched[key].float() - module.weight.data
            if diff.abs().max() > 0:
                out[name] = diff
    return out


class PartialEdit:
    """Forward hooks adding ΔW·x to each edited linear's output at the positions `where(p)` says (absolute)."""

    def __init__(self, model, deltas: dict[str, torch.Tensor]):
        self.where = lambda p: True
        self.start = 0  # absolute position of the current forward's first token
        self.handles = [
            model.get_submodule(name).register_forward_hook(self._hook(d)) for name, d in deltas.items()
        ]

    def _hook(self, delta: torch.Tensor):
        def add(_m, inp, out):
            x = inp[0]
            mask = torch.tensor([float(self.where(self.start + t)) for t in range(x.shape[1])], dtype=x.dtype)
            return out + mask.view(1, -1, 1) * torch.nn.functional.linear(x, delta)

        return add


@torch.no_grad()
def chat_reply(
    model, ids: torch.Tensor, edit: PartialEdit, where, max_new_tokens: int, eos: int | None
) -> list[int]:
    edit.where, edit.start, cache, cur, out = where, 0, DynamicCache(), ids, []
    for _ in range(max_new_tokens):
        step = model(input_ids=cur, cache=cache, use_cache=True)
        cache = step.cache
        edit.start += cur.shape[1]
        nxt = int(step.logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        cur = torch.tensor([[nxt]])
    return out


def positions(span: set[int]) -> dict[str, object]:
    """Per mask, whether ΔW acts at absolute position p; `span`: the user turn's subject tokens."""
    last = max(span)
    return {
        "all": lambda p: True,
        "user subject": lambda p: p in span,
        "user subject last": lambda p: p == last,
        "all but user subject": lambda p: p not in span,
        "none": lambda p: False,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a generation.py run directory (model/ and report.json)")
    ap.add_argument(
        "--data", default=str(COUNTERFACT / "counterfact-val.json"), help="where subjects are looked up"
    )
    ap.add_argument("--n", type=int, default=12, help="failing facts to look at")
    ap.add_argument("--tokens", type=int, default=40)
    args = ap.parse_args()
    run = Path(args.run)
    src = resolve_model_dir("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    deltas = edited_deltas(base, load_file(str(run / "model" / "model.safetensors")))
    edit = PartialEdit(base, deltas)
    subjects = {str(r["case_id"]): r["subject"] for r in json.loads(Path(args.data).read_text())}
    report = json.loads((run / "report.json").read_text())
    facts = [
        f
        for f in report["targets"][0]["generation"]["facts"]
        if f["kind"] == "chat" and f["source"] == "prompt" and f["verdict_fp32"] != "new"
    ][: args.n]
    print(f"{len(deltas)} edited linears; {len(facts)} facts whose fp32 chat reply misses the new answer\n")
    for f in facts:
        subject = f.get("subject") or subjects[f["request_id"]]
        text = tok.apply_chat_template(
            [{"role": "user", "content": f["text"]}], add_generation_prompt=True, tokenize=False
        )
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        a = text.index(f["text"]) + f["text"].index(subject)
        span = {i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < a + len(subject) and e > a}
        where = positions(span)
        ids = torch.tensor([enc["input_ids"]])
        print(f"{f['text']!r} -> {f['expected']} (was {f['other']})")
        for name in MASKS:
            reply = tok.decode(chat_reply(base, ids, edit, where[name], args.tokens, tok.eos_token_id))
            print(f"  {name:21} {' '.join(reply.split())[:110]!r}")
        print()


if __name__ == "__main__":
    main()
