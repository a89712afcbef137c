"""The torch Scorer: teacher-forced log-probs equal a hand computation; padding never changes a score;
BOS handling; greedy ids; and the fact probes/rates built on the Scorer protocol."""

from __future__ import annotations

import math

import pytest
import torch

from edit2deploy.models import open_model
from edit2deploy.probes import Probe, ProbeResult, continuation, probes_for, rates, run_probes
from edit2deploy.requests import EditRequest, Neighbor
from edit2deploy.scoring import Scored, Scorer, TorchScorer, document_start, hf_tokenize, pad_batch

PAIRS = [
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("The Python programming language was created by", " Guido van Rossum"),
    ("Hi", " there, how are you doing today?"),
    ("The mother tongue of Danielle Darrieux is", " French"),
    (
        (
            "A much longer prompt, written so that it is clearly longer than the sliding window of the tiny "
            "Gemma model, ends with the word"
        ),
        " window and a few more tokens",
    ),
]


def hand_scores(model, tokenizer, pairs):
    """Log-probs and argmax ids computed the obvious way: one unpadded sequence at a time."""
    out = []
    for prompt, cont in pairs:
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        pos = [len(p_ids) - 1 + j for j in range(len(c_ids))]
        lps = [float(logp[q, t]) for q, t in zip(pos, c_ids)]
        greedy = [int(logits[q].argmax()) for q in pos]
        out.append((p_ids, c_ids, lps, greedy))
    return out


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return open_model(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def tiny_bos_gemma(tiny_model_dir):
    return open_model(tiny_model_dir("gemma3_text", add_bos=True))


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_model_dir):
    return open_model(tiny_model_dir("gpt2"))


def _models(request, name):
    return request.getfixturevalue(name)


# float32 noise: batched vs unbatched kernels differ in summation order; 30 layers (SmolLM2) add up to ~2e-5
# on AMX Intel cores and up to ~5e-5 per token on AVX2-only AMD cores
TOL = {"tiny_llama": 1e-5, "tiny_bos_gemma": 1e-5, "tiny_gpt2": 1e-5, "smollm2": 1e-4}


SCORING_MODELS = [
    "tiny_llama",
    "tiny_bos_gemma",
    "tiny_gpt2",
    pytest.param("smollm2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model_name", SCORING_MODELS)
def test_logprobs_and_greedy_equal_hand_computation(request, model_name):
    lm = _models(request, model_name)
    scorer = TorchScorer(lm.model, lm.tokenizer)
    got = scorer.score(PAIRS)
    want = hand_scores(lm.model, lm.tokenizer, PAIRS)
    assert len(got) == len(PAIRS)
    for s, (p_ids, c_ids, lps, greedy) in zip(got, want):
        assert list(s.prompt_ids) == p_ids and list(s.target_ids) == c_ids
        assert len(s.logprobs) == len(c_ids) >= 1
        assert s.logprobs == pytest.approx(lps, abs=TOL[model_name])
        assert list(s.greedy_ids) == greedy
        # the total adds one per-token error per token (each within TOL)
        assert s.total == pytest.approx(sum(lps), abs=TOL[model_name] * len(lps))
        assert s.mean == pytest.approx(sum(lps) / len(lps), abs=TOL[model_name])
    assert any(len(s.target_ids) >= 4 for s in got)  # multi-token continuations were exercised


@pytest.mark.parametrize("model_name", SCORING_MODELS)
def test_right_left_and_single_padding_agree(request, model_name):
    lm = _models(request, model_name)
    right = TorchScorer(lm.model, lm.tokenizer, padding_side="right").score(PAIRS)
    left = TorchScorer(lm.model, lm.tokenizer, padding_side="left").score(PAIRS)
    single = [TorchScorer(lm.model, lm.tokenizer).score([pair])[0] for pair in PAIRS]
    small = TorchScorer(lm.model, lm.tokenizer, batch_size=2, padding_side="left").score(PAIRS)
    for r, le, si, sm in zip(right, left, single, small):
        assert r.target_ids == le.target_ids == si.target_ids == sm.target_ids
        for other in (le, si, sm):
            assert other.logprobs == pytest.approx(r.logprobs, abs=TOL[model_name])
            assert other.greedy_ids == r.greedy_ids


def test_padding_check_is_sensitive_to_positions(tiny_gpt2):
    """If positions ignored the mask, left padding would change GPT-2's scores (absolute position
    embeddings; RoPE models are shift-invariant): the agreement test above can fail."""
    lm = tiny_gpt2
    seqs = [lm.tokenizer(p + c)["input_ids"] for p, c in PAIRS[:3]]
    ids, mask, pos, offsets = pad_batch(seqs, 0, "left")
    with torch.no_grad():
        good = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        naive = lm.model(input_ids=ids, attention_mask=mask).logits  # positions count the padding
    row = 2  # the shortest sequence has the most padding
    n = len(seqs[row])
    assert offsets[row] > 0
    alone = lm.model(input_ids=torch.tensor([seqs[row]])).logits[0]
    assert torch.allclose(good[row, offsets[row] :], alone, atol=1e-5)
    assert (naive[row, offsets[row] :] - alone).abs().max() > 1e-3
    assert pos[row, offsets[row] :].tolist() == list(range(n))


def test_pad_batch_layout():
    ids, mask, pos, offsets = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert offsets == [0, 2]
    ids, mask, pos, offsets = pad_batch([[5, 6, 7], [8]], pad_id=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert offsets == [0, 0]
    with pytest.raises(ValueError, match="padding side"):
        pad_batch([[1]], 0, side="middle")


def test_bos_in_prompt_not_in_continuation(tiny_bos_gemma, tiny_llama):
    tok = tiny_bos_gemma.tokenizer
    bos = tok.bos_token_id
    assert bos is not None
    p_ids, c_ids = hf_tokenize(tok, "The Eiffel Tower is in", " Paris")
    assert p_ids[0] == bos and p_ids.count(bos) == 1
    assert bos not in c_ids
    (scored,) = TorchScorer(tiny_bos_gemma.model, tok).score([("The Eiffel Tower is in", " Paris")])
    assert scored.prompt_ids[0] == bos and bos not in scored.target_ids
    # the same text without BOS (SmolLM2's tokenizer adds none): same tokens minus the BOS
    plain_p, plain_c = hf_tokenize(tiny_llama.tokenizer, "The Eiffel Tower is in", " Paris")
    assert plain_p == p_ids[1:] and plain_c == c_ids
    assert bos not in plain_p


def test_document_start_is_the_separator_unless_the_tokenizer_adds_a_bos(tiny_llama, tiny_bos_gemma):
    tok = tiny_llama.tokenizer  # SmolLM2's: no BOS, documents joined by <|endoftext|>
    assert document_start(tok) == [tok.convert_tokens_to_ids("<|endoftext|>")]
    assert tok.convert_tokens_to_ids("<|endoftext|>") != tok.bos_token_id  # not the chat's <|im_start|>
    assert document_start(tiny_bos_gemma.tokenizer) == []  # its own BOS already starts every text


def test_bos_changes_the_score(tiny_model_dir):
    """The BOS really is fed to the model: the same weights score differently with and without it."""
    with_bos = open_model(tiny_model_dir("llama", add_bos=True))
    without = open_model(tiny_model_dir("llama"))
    pair = [("The Eiffel Tower is in", " Paris")]
    a = TorchScorer(with_bos.model, with_bos.tokenizer).score(pair)[0]
    b = TorchScorer(without.model, without.tokenizer).score(pair)[0]
    assert a.target_ids == b.target_ids and len(a.prompt_ids) == len(b.prompt_ids) + 1
    assert abs(a.logprobs[0] - b.logprobs[0]) > 1e-4


def test_tokenize_rejects_empty_pieces(tiny_llama, tiny_bos_gemma):
    with pytest.raises(ValueError, match="continuation"):
        hf_tokenize(tiny_llama.tokenizer, "The capital of France is", "")
    with pytest.raises(ValueError, match="prompt"):
        hf_tokenize(tiny_llama.tokenizer, "", " Paris")
    p_ids, _ = hf_tokenize(tiny_bos_gemma.tokenizer, "", " Paris")  # BOS alone is a valid context
    assert p_ids == [tiny_bos_gemma.tokenizer.bos_token_id]
    with pytest.raises(ValueError, match="padding_side"):
        TorchScorer(tiny_llama.model, tiny_llama.tokenizer, padding_side="up")


def test_scorer_protocol_and_scored_properties(tiny_llama):
    scorer = TorchScorer(tiny_llama.model, tiny_llama.tokenizer)
    assert isinstance(scorer, Scorer)
    assert scorer.score([]) == []
    s = Scored(prompt_ids=(1,), target_ids=(5, 6), logprobs=(-1.0, -3.0), greedy_ids=(5, 6))
    assert s.total == -4.0 and s.mean == -2.0 and s.greedy_matches
    assert not Scored((1,), (5, 6), (-1.0, -3.0), (5, 7)).greedy_matches


# ---------------------------------------------------------------- probes and rates
class FakeScorer:
    """A Scorer whose log-prob per token is given by a table keyed on (prompt, continuation)."""

    name = "fake"

    def __init__(self, table: dict[tuple[str, str], tuple[list[float], list[int], list[int]]]):
        self.table = table
        self.calls: list[list[tuple[str, str]]] = []

    def tokenize(self, prompt, continuation):
        return [0], self.table[(prompt, continuation)][1]

    def score(self, pairs):
        self.calls.append(list(pairs))
        out = []
        for p, c in pairs:
            lps, ids, greedy = self.table[(p, c)]
            out.append(Scored((0,), tuple(ids), tuple(lps), tuple(greedy)))
        return out


def test_run_probes_and_rates_with_a_fake_scorer():
    req = EditRequest(
        prompt="{} is in",
        subject="The tower",
        target_new="Rome",
        target_true="Paris",
        paraphrases=("Where is the tower? In",),
        neighborhood=(Neighbor("The Louvre is in", "Paris"),),
        id="t",
    )
    probes = probes_for([req])
    assert [(p.kind, p.prompt, p.expected, p.other) for p in probes] == [
        ("edit", "The tower is in", "Rome", "Paris"),
        ("paraphrase", "Where is the tower? In", "Rome", "Paris"),
        ("neighborhood", "The Louvre is in", "Paris", "Rome"),
    ]
    table = {
        ("The tower is in", " Rome"): ([-1.0, -3.0], [11, 12], [11, 12]),  # mean -2
        ("The tower is in", " Paris"): ([-2.5], [13], [11]),  # mean -2.5 -> edit succeeds
        ("Where is the tower? In", " Rome"): ([-4.0, -4.0], [11, 12], [13, 12]),
        ("Where is the tower? In", " Paris"): ([-1.0], [13], [13]),  # paraphrase fails
        ("The Louvre is in", " Paris"): ([-0.5], [13], [13]),
        ("The Louvre is in", " Rome"): ([-0.25, -5.0], [11, 12], [13, 12]),  # mean -2.625: kept
    }
    scorer = FakeScorer(table)
    results = run_probes(scorer, probes, decode=lambda ids: f"<{ids[0]}>")
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 6  # one batched call
    edit, para, neigh = results
    assert edit.margin == pytest.approx(0.5) and edit.success and edit.greedy_expected
    assert edit.top1_id == 11 and edit.top1 == "<11>"
    assert para.margin == pytest.approx(-3.0) and not para.success and para.top1 == "<13>"
    assert neigh.margin == pytest.approx(2.125) and neigh.success
    assert rates(results) == {"edit": 100.0, "paraphrase": 0.0, "neighborhood": 100.0}
    assert rates(results[:1]) == {"edit": 100.0, "paraphrase": None, "neighborhood": None}
    j = edit.to_json()
    assert j["p_expected"] == pytest.approx(math.exp(-2.0)) and j["p_other"] == pytest.approx(math.exp(-2.5))
    assert j["success"] is True and j["kind"] == "edit" and j["top1"] == "<11>"


def test_probe_without_other_uses_greedy_match():
    scorer = FakeScorer({("Q", " A"): ([-0.1], [7], [7]), ("R", " B"): ([-0.1], [8], [9])})
    hit, miss = run_probes(scorer, [Probe("x", "edit", "Q", "A", None), Probe("y", "edit", "R", "B", None)])
    assert hit.success and hit.margin == math.inf and hit.lp_other is None
    assert not miss.success and miss.margin == -math.inf
    assert hit.to_json()["margin"] is None and hit.to_json()["p_other"] is None
    assert hit.top1 == "7"  # no decode given: the id as text


def test_continuation_adds_one_leading_space():
    assert continuation("Paris") == " Paris"
    assert continuation(" Paris") == " Paris"


def test_run_probes_with_torch_scorer_matches_scores(tiny_llama):
    lm = tiny_llama
    scorer = TorchScorer(lm.model, lm.tokenizer)
    probes = [
        Probe("a", "edit", PAIRS[0][0], "Rome", "Paris"),
        Probe("b", "neighborhood", PAIRS[1][0], "Guido", None),
    ]
    res = run_probes(scorer, probes, decode=lm.tokenizer.decode)
    rome, paris, guido = scorer.score(
        [(PAIRS[0][0], " Rome"), (PAIRS[0][0], " Paris"), (PAIRS[1][0], " Guido")]
    )
    assert res[0].lp_expected == pytest.approx(rome.mean, abs=1e-6)
    assert res[0].lp_other == pytest.approx(paris.mean, abs=1e-6)
    assert res[0].success == (rome.mean > paris.mean)
    assert res[0].top1_id == rome.greedy_ids[0] and res[0].top1 == lm.tokenizer.decode([rome.greedy_ids[0]])
    assert res[1].greedy_expected == guido.greedy_matches
    assert isinstance(res[0], ProbeResult)


@pytest.mark.slow
def test_smollm2_probes_on_known_facts(smollm2):
    """SmolLM2 knows these facts: the true answer beats the counterfactual (edits not applied yet)."""
    scorer = TorchScorer(smollm2.model, smollm2.tokenizer)
    probes = [
        Probe("eiffel", "edit", "The Eiffel Tower is located in the city of", "Paris", "Rome"),
        Probe("france", "edit", "The capital of France is", "Paris", "Berlin"),
        Probe("darrieux", "edit", "The mother tongue of Danielle Darrieux is", "French", "English"),
    ]
    res = run_probes(scorer, probes, decode=smollm2.tokenizer.decode)
    assert all(r.success for r in res), [(r.probe.request_id, r.margin) for r in res]
    assert res[0].top1 == " Paris"
    assert math.exp(res[0].lp_expected) > 0.3
    assert rates(res)["edit"] == 100.0


def test_scored_from_logits_matches_a_float64_log_softmax():
    """The numpy runtimes' log-probs (float32 exponentials, float64 sums) equal a float64 log-softmax to 1e-6, for
    logits spread wide as a real model's are, and the greedy ids are the row maxima."""
    import numpy as np

    from edit2deploy.scoring import scored_from_logits

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((7, 5000)) * 8 + rng.uniform(-50, 50, (7, 1))).astype(np.float32)
    target = rng.integers(0, 5000, 7)
    s = scored_from_logits([1, 2], target.tolist(), logits)
    x = logits.astype(np.float64)
    ref = x - (x.max(1, keepdims=True) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)))
    assert np.allclose(s.logprobs, ref[np.arange(7), target], atol=1e-6, rtol=0)
    assert s.greedy_ids == tuple(logits.argmax(1).tolist()) and s.prompt_ids == (1, 2)
