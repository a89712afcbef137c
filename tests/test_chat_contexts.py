"""Chat contexts of editing (methods/chat.py): the prompt as the user's message in the model's own chat template,
the answer as the assistant's first word or after a restatement; δ at every subject occurrence (exact under the
prefix cache); a second key column per fact; `chat_contexts` resolved and recorded."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edit2deploy.arch import head_logits
from edit2deploy.errors import UsageError
from edit2deploy.methods import EditConfig, Editor
from edit2deploy.methods.chat import chat_contexts_wanted, chat_kinds, chat_templates
from edit2deploy.methods.keys import (
    KeyPasses,
    answer_follows_prompt,
    context_templates,
    key_columns,
    locate_in_template,
)
from edit2deploy.methods.values import ValueHParams, _Batch, build_rows, kl_divergence, optimise_values
from edit2deploy.models import open_model
from edit2deploy.requests import EditRequest

REQUESTS = [
    EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", id="a"),
    EditRequest(
        prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English", id="b"
    ),
]


def test_smollm2_chat_templates_put_the_prompt_in_the_user_turn(smollm2):
    tok = smollm2.tokenizer
    reply, restated = chat_templates(tok)
    assert reply.count("{}") == 1 and restated.count("{}") == 2
    assert reply.endswith("<|im_start|>assistant\n") and restated == reply + "{}"
    # the same text the generation probes send (the model's template, its default system prompt)
    r = REQUESTS[0]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": r.text}], add_generation_prompt=True, tokenize=False
    )
    assert reply.replace("{}", r.text) == rendered
    assert not answer_follows_prompt(reply) and answer_follows_prompt(restated)
    assert answer_follows_prompt("{}") and answer_follows_prompt("The weather. {}")


def test_chat_rows_locate_every_subject_and_open_the_reply_with_the_answer(smollm2):
    tok = smollm2.tokenizer
    reply, restated = chat_templates(tok)
    r = REQUESTS[0]
    loc = locate_in_template(tok, restated, r)
    assert len(loc.occurrences) == 2 and loc.subject_last == loc.occurrences[1]
    for pos in loc.occurrences:
        assert tok.decode(loc.ids[pos]).strip() == "Tower"
    rows = build_rows(smollm2, [r], ["{}", reply, restated])
    bare, rep, res, kl = rows
    assert tok.decode(rep.target_ids) == "Rome"  # the reply's first word: no leading space
    assert tok.decode(res.target_ids) == " Rome"  # after the restated prompt: a continuation
    assert tok.decode(rep.ids[rep.target_cols[0]]) == "\n"  # predicted right after the assistant header
    assert res.delta_cols == loc.occurrences and rep.delta_cols == (rep.subject_last,)
    assert kl.is_kl and bare.is_bare
    # the restated reply's positions before its answer: they predict the restated prompt, then the answer follows
    assert tok.decode([res.ids[c + 1] for c in res.reply_cols]) == r.text
    assert res.reply_cols[-1] + 1 == res.target_cols[0]
    assert bare.reply_cols == rep.reply_cols == kl.reply_cols == ()


def test_chat_contexts_setting():
    assert chat_contexts_wanted("auto", True) and not chat_contexts_wanted("auto", False)
    assert chat_contexts_wanted("on", False) and not chat_contexts_wanted("off", True)
    with pytest.raises(ValueError):
        chat_contexts_wanted("yes", True)
    assert chat_kinds("both") == ("reply", "restated") and chat_kinds("restated") == ("restated",)
    with pytest.raises(ValueError):
        chat_kinds("all")


@pytest.mark.parametrize("kinds", ["reply", "restated"])
def test_editor_reads_only_the_chat_kinds_asked_for(tiny_model_dir, kinds):
    lm = open_model(tiny_model_dir("llama"))
    cfg = EditConfig(method="memit", layers=(0, 1), chat_contexts="on", chat_kinds=kinds)
    editor = Editor(lm, cfg, _identity_stats(lm, (0, 1)), prefixes=[], quiet=True)
    assert editor.templates[1:] == chat_templates(lm.tokenizer, (kinds,))
    assert editor.templates[1].count("{}") == (1 if kinds == "reply" else 2)


def test_key_columns_separate_chat_keys():
    k = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(
        2, 4, 3
    )  # 2 facts, contexts: bare, 1 text, 2 chat
    shared = key_columns(k)
    assert torch.allclose(shared, 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1))
    sep = key_columns(k, chat_from=2)
    assert sep.shape == (4, 3)
    assert torch.allclose(sep[:2], 0.5 * k[:, 0] + 0.5 * k[:, 1])
    assert torch.allclose(sep[2:], k[:, 2:].mean(1))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gpt2"])
def test_prefix_cache_is_exact_with_two_subject_occurrences(tiny_model_dir, family):
    """δ goes to both subjects of the restated context; steps from the first subject on (the prefix cache)
    equal whole-row steps."""
    lm = open_model(tiny_model_dir(family, layers=4))
    templates = context_templates(["The weather"]) + chat_templates(lm.tokenizer)
    hp = ValueHParams(lr=0.05, max_steps=4, mpes=True, dtype="float32")
    cached = optimise_values(lm, REQUESTS, templates, 2, hp, quiet=True)
    whole = optimise_values(
        lm, REQUESTS, templates, 2, dataclasses.replace(hp, prefix_cache=False), quiet=True
    )
    assert cached.steps == whole.steps and cached.converged == whole.converged
    assert cached.delta.abs().max() > 1e-3
    assert torch.allclose(cached.z, whole.z, atol=1e-5, rtol=1e-5)


def _reply_kl(lm, rows, templates, delta):
    """Mean KL(with δ ‖ without) over the restated rows' reply positions, δ (n, d) at every subject."""
    batch = _Batch(lm, rows, 2)
    batch.prepare(torch.zeros(len(REQUESTS), delta.shape[1]))
    sel = [i for i, r in enumerate(rows) if r.reply_cols]
    with torch.no_grad():
        out = []
        for d in (delta, torch.zeros_like(delta)):
            hidden = batch.forward(sel, d)
            at = [(j, batch.suffix_col(i, c)) for j, i in enumerate(sel) for c in rows[i].reply_cols]
            logits = head_logits(lm.model, hidden[[a[0] for a in at], [a[1] for a in at]])
            out.append(torch.log_softmax(logits.float(), -1))
    return kl_divergence(out[0], out[1]).mean().item()


def test_reply_kl_holds_the_restated_reply(tiny_model_dir):
    """`reply_kl` makes z-optimisation pay for a δ that changes how the restated reply goes before its answer:
    the same steps end with less change there."""
    lm = open_model(tiny_model_dir("llama", layers=4))
    templates = ["{}"] + chat_templates(lm.tokenizer, ("restated",))
    rows = build_rows(lm, REQUESTS, templates)
    hp = ValueHParams(lr=0.2, max_steps=8, mpes=False, loss_stop=0.0, dtype="float32", clamp=4.0)
    free = optimise_values(lm, REQUESTS, templates, 2, hp, quiet=True)
    held = optimise_values(lm, REQUESTS, templates, 2, dataclasses.replace(hp, reply_kl=50.0), quiet=True)
    kl_free = _reply_kl(lm, rows, templates, free.delta.T.float())
    kl_held = _reply_kl(lm, rows, templates, held.delta.T.float())
    assert kl_free > 1e-4 and kl_held < 0.5 * kl_free


def _identity_stats(lm, layers):
    d_in = lm.arch.to_out_in(lm.arch.get_weight(lm.model, 0)).shape[1]
    return {li: torch.eye(d_in, dtype=torch.float64) for li in layers}


@pytest.mark.parametrize("chat_keys, columns", [("separate", 4), ("shared", 2), ("own", 4)])
def test_editor_with_chat_contexts(tiny_model_dir, chat_keys, columns):
    """The editor adds the chat contexts to z-optimisation and records chat_contexts resolved to "on". With
    separate (or own) keys each fact has two key columns: the text column is the bare prompt's key here (no
    prefixes), so after the last layer's solve (MEMIT with a vanishing λ_p interpolates) the z layer's output at
    the bare prompt's subject is z (with `own`: the text contexts' z)."""
    lm = open_model(tiny_model_dir("llama"))
    layers = (0, 1)
    hp = ValueHParams(max_steps=2, mpes=False, loss_stop=0.0, dtype="float32")
    cfg = EditConfig(
        method="memit",
        layers=layers,
        lambda_p=1e-8,
        values=hp,
        chat_contexts="auto",
        chat_keys=chat_keys,
        chat_kinds="both",
    )
    editor = Editor(lm, cfg, _identity_stats(lm, layers), prefixes=[], quiet=True)
    assert editor.cfg.chat_contexts == "on" and len(editor.templates) == 3
    values = editor.optimise(REQUESTS)
    assert values.z.shape[1] == (4 if chat_keys == "own" else 2)  # `own`: the chat contexts' δ too
    z = values.z[:, :2]
    chat_passes = KeyPasses(lm, REQUESTS, editor.templates, 1, chat_from=editor.chat_from, chat_outputs=True)
    if chat_keys == "own":  # before the edit: h (the chat contexts' mean) + δ_chat
        chat_target = chat_passes(1)[1][:, 2:] + values.delta[:, 2:]
    report = editor.apply_batch(REQUESTS)
    for li in layers:
        assert report.keys[li].shape[1] == columns
    _, h_after = KeyPasses(lm, REQUESTS, ["{}"], 1)(1)
    reached = torch.allclose(h_after, z, atol=1e-3 * z.abs().max())
    assert reached == (chat_keys != "shared")  # one averaged key: the bare prompt gets only part of z
    if chat_keys == "own":  # the chat contexts' mean output at the subject moves by their own δ
        _, h_chat = KeyPasses(
            lm, REQUESTS, editor.templates, 1, chat_from=editor.chat_from, chat_outputs=True
        )(1)
        assert torch.allclose(h_chat[:, 2:], chat_target, atol=1e-3 * chat_target.abs().max())


def test_editor_chat_contexts_off_and_on_without_a_template(tiny_model_dir, tmp_path):
    lm = open_model(tiny_model_dir("llama"))
    off = Editor(
        lm, EditConfig(layers=(0, 1), chat_contexts="off"), _identity_stats(lm, (0, 1)), [], quiet=True
    )
    assert off.cfg.chat_contexts == "off" and off.templates == ["{}"] and off.chat_from is None
    lm.tokenizer.chat_template = None
    auto = Editor(
        lm, EditConfig(layers=(0, 1), chat_contexts="auto"), _identity_stats(lm, (0, 1)), [], quiet=True
    )
    assert auto.cfg.chat_contexts == "off"
    with pytest.raises(UsageError, match="chat template"):
        Editor(lm, EditConfig(layers=(0, 1), chat_contexts="on"), _identity_stats(lm, (0, 1)), [], quiet=True)


def test_retry_chat_counts_an_edit_whose_chat_reply_misses_as_failed(tiny_model_dir):
    """`retry_chat`: an edit whose teacher-forced check passes still counts as failed (and so is retried) while the
    model's greedy chat reply to its prompt does not give the new answer; a reply that gives it does not count;
    a model without a chat template counts only the teacher-forced check."""
    from edit2deploy.methods.retry import failed_edits, generated_misses
    from edit2deploy.scoring import TorchScorer
    from edit2deploy.verdicts import Verdict, verdict

    lm = open_model(tiny_model_dir("llama"))
    scorer = TorchScorer(lm.model, lm.tokenizer)
    text = REQUESTS[0].text

    def first_word(reply: str) -> str:
        return next(w for w in reply.split() if w.isalpha())

    # the greedy continuation's first token: the teacher-forced check (no true answer: greedy-decoded) passes
    said = scorer.complete(text, 1).strip()
    reply = scorer.chat([{"role": "user", "content": text}], 48)
    in_chat = first_word(reply)
    assert verdict(reply, in_chat) == Verdict.NEW
    passes = dataclasses.replace(REQUESTS[0], target_new=said, id="tf")
    assert verdict(reply, said) != Verdict.NEW  # precondition: the chat reply does not give it
    answered = dataclasses.replace(REQUESTS[0], target_new=in_chat, id="chat")
    requests = [passes, answered]
    assert generated_misses(scorer, requests, ["chat"]) == [0]
    layers = (0, 1)
    base = EditConfig(method="memit", layers=layers)
    for on, want in ((False, []), (True, [0])):
        editor = Editor(
            lm, dataclasses.replace(base, retry_chat=on), _identity_stats(lm, layers), [], quiet=True
        )
        assert failed_edits(editor, [passes]) == want
    # `retry_completion`: the plain continuation's own first word is given there, the chat reply's word is not
    continuation = scorer.complete(text, 24)
    assert verdict(continuation, in_chat) != Verdict.NEW  # precondition
    completed = dataclasses.replace(
        REQUESTS[0], target_new=first_word(continuation), target_true=None, id="completion"
    )
    assert generated_misses(scorer, [completed, answered], ["completion"]) == [1]
    assert generated_misses(scorer, [completed, answered], ["chat", "completion"]) == [0, 1]
    done = dataclasses.replace(base, retry_completion=True)
    assert failed_edits(Editor(lm, done, _identity_stats(lm, layers), [], quiet=True), [answered]) == [0]
    lm.tokenizer.chat_template = None
    assert generated_misses(scorer, requests, ["chat"]) == []


def test_retry_chat_checks_the_reply_in_each_hardening_simulation(tiny_model_dir):
    """With hardening targets, `retry_chat` also counts an edit as failed while its chat reply misses in a target's
    simulated quantization (here a scheme that zeroes the final norm: every reply loses its answer), and the
    model's weights are its own again afterwards."""
    from edit2deploy.methods.retry import failed_edits, generated_misses
    from edit2deploy.probes import probes_for, run_probes
    from edit2deploy.quantsim import Simulation, TensorQuant
    from edit2deploy.scoring import TorchScorer

    lm = open_model(tiny_model_dir("llama"))
    scorer = TorchScorer(lm.model, lm.tokenizer)
    text = REQUESTS[0].text
    reply = scorer.chat([{"role": "user", "content": text}], 48)
    # a word of the fp32 chat reply that the teacher-forced check also gives (it beats an unlikely old answer)
    candidates = [
        dataclasses.replace(REQUESTS[0], target_new=w, target_true="quartz xylophone", id="chat")
        for w in dict.fromkeys(w for w in reply.split() if w.isalpha())
    ]
    results = run_probes(scorer, probes_for(candidates, ("edit",)))
    answered = next(r for r, res in zip(candidates, results) if res.success)
    assert generated_misses(scorer, [answered], ["chat"]) == [], reply

    class Silencing:
        target = "test:silent"

        def plan(self):
            return {"model.norm.weight": TensorQuant("zero", fake=torch.zeros_like)}

    sim = Simulation(lm, Silencing())
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    layers = (0, 1)
    cfg = EditConfig(method="memit", layers=layers, retry_chat=True)
    editor = Editor(lm, cfg, _identity_stats(lm, layers), [], quiet=True)
    assert failed_edits(editor, [answered]) == []
    assert failed_edits(editor, [answered], [sim]) == [0]
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    editor = Editor(
        lm, dataclasses.replace(cfg, retry_chat=False), _identity_stats(lm, layers), [], quiet=True
    )
    assert failed_edits(editor, [answered], [sim]) == []
