"""Key statistics: C = E[k kᵀ] of each edited projection's input equals a direct computation, all layers
come from one forward pass per sequence, the cache is reused and a corrupt entry is recomputed, and the
corpus can be a text file, a directory of .txt/.jsonl files, or text the model generates itself."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from edit2deploy import stats as stats_mod
from edit2deploy.errors import UsageError
from edit2deploy.models import open_model, weights_fingerprint
from edit2deploy.stats import (
    MAX_SEQ_LEN,
    collect_key_stats,
    corpus_from_path,
    corpus_token_chunks,
    generated_token_chunks,
    key_stats,
)

PARAGRAPHS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower.",
    "Locally nicknamed the Iron Lady, it was constructed from 1887 to 1889 as the centerpiece of the fair.",
    "Short.",  # fewer than 8 tokens: skipped
    "The tower is 330 metres tall, about the same height as an 81-storey building, and the tallest structure.",
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return open_model(tiny_model_dir("llama"))


@pytest.fixture
def cache(tmp_path, monkeypatch, smollm2_dir):
    """A private statistics cache (smollm2_dir first: the session's model cache is already resolved)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(d))
    return d


@pytest.fixture
def corpus_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(PARAGRAPHS * 3) + "\n")
    return f


def direct_second_moment(lm, chunks, layer: int) -> tuple[torch.Tensor, int]:
    """E[k kᵀ] the obvious way: a full forward per sequence, the MLP's input captured, and the down
    projection's input recomputed in float64 from the MLP's own weights."""
    mlp = lm.model.model.layers[layer].mlp
    xs = []
    handle = mlp.register_forward_pre_hook(lambda _m, inp: xs.append(inp[0].detach()))
    try:
        with torch.no_grad():
            for ids in chunks:
                lm.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    acc = torch.zeros(mlp.down_proj.in_features, mlp.down_proj.in_features, dtype=torch.float64)
    n = 0
    for x in xs:
        x = x[0].double()
        k = mlp.act_fn(x @ mlp.gate_proj.weight.double().T) * (x @ mlp.up_proj.weight.double().T)
        acc += k.T @ k
        n += k.shape[0]
    return acc / n, n


# ================================================================ collection
def test_collect_equals_direct_computation_in_one_pass(lm, corpus_file):
    chunks = corpus_token_chunks(lm, corpus_from_path(corpus_file), 250, quiet=True)
    calls = {"embed": 0, "block1": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    h1 = lm.model.model.embed_tokens.register_forward_pre_hook(count("embed"))
    h2 = lm.model.model.layers[1].register_forward_pre_hook(count("block1"))
    try:
        both = collect_key_stats(lm, [0, 1], chunks, quiet=True)
        assert calls == {"embed": len(chunks), "block1": len(chunks)}  # one pass per sequence for all layers
        calls.update(embed=0, block1=0)
        only0 = collect_key_stats(lm, [0], chunks, quiet=True)
        assert calls == {"embed": len(chunks), "block1": 0}  # blocks above the last edited layer never run
    finally:
        h1.remove()
        h2.remove()
    total = sum(len(c) for c in chunks)
    assert total == 250
    for li in (0, 1):
        ref, n = direct_second_moment(lm, chunks, li)
        st = both[li]
        assert st.layer == li and st.n_tokens == n == total
        assert st.C.dtype == torch.float64 and st.C.shape == (128, 128)
        assert torch.allclose(st.C, st.C.T)
        assert torch.allclose(st.C, ref, rtol=1e-5, atol=1e-6 * ref.abs().max())
        assert torch.linalg.eigvalsh(st.C).min() > -1e-6 * ref.abs().max()  # PSD
    assert torch.equal(only0[0].C, both[0].C)


def test_symmetric_sum_holds_the_upper_block_triangle_and_gives_the_whole_sum():
    """`SymmetricSum`: block rows [r0:r1, r0:] only (here 4 + 4 + 2 rows of a 10 × 10 sum: 70 of 100 entries), and
    `full()` is Σ kᵀk of the float32 keys added in float64, exactly symmetric, with the block rows released."""
    from edit2deploy.moments import SymmetricSum

    g = torch.Generator().manual_seed(0)
    sums = SymmetricSum(10, block_rows=4)
    assert [tuple(r.shape) for r in sums.block_rows()] == [(4, 10), (4, 6), (2, 2)]
    ref = torch.zeros(10, 10, dtype=torch.float64)
    for tokens in (7, 1, 30):
        k = torch.randn(tokens, 10, generator=g)
        sums.add(k)
        ref += (k.T @ k).double()
    C = sums.full()
    assert C.dtype == torch.float64 and torch.equal(C, C.T)
    assert torch.allclose(C, ref, rtol=1e-6, atol=1e-6)
    assert sums.block_rows() == []


# ================================================================ cache
def _cached_files(cache_dir):
    return sorted((cache_dir / "stats").rglob("*.safetensors"))


@pytest.fixture
def spy(monkeypatch):
    """Records the layers each real statistics pass computed."""
    seen: list[list[int]] = []
    real = stats_mod.collect_key_stats

    def wrapper(lm, layers, chunks, quiet=False):
        seen.append(list(layers))
        return real(lm, layers, chunks, quiet=quiet)

    monkeypatch.setattr(stats_mod, "collect_key_stats", wrapper)
    return seen


def test_cache_hit_on_second_call(lm, tiny_model_dir, corpus_file, cache, spy):
    fp = weights_fingerprint(tiny_model_dir("llama"))
    corpus = corpus_from_path(corpus_file)
    first = key_stats(lm, [0, 1], fp, corpus, n_tokens=250, quiet=True)
    assert spy == [[0, 1]]
    files = _cached_files(cache)
    assert len(files) == 2 and all(f.with_suffix(".json").is_file() for f in files)
    assert all(f"-{corpus.id}-250-float64" in f.name for f in files)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = key_stats(lm, [0, 1], fp, corpus, n_tokens=250, quiet=True)
    assert spy == [[0, 1]]  # nothing recomputed
    for li in (0, 1):
        assert torch.equal(first[li].C, second[li].C) and first[li].n_tokens == second[li].n_tokens == 250
    # only a missing layer is computed; another token count or corpus is another entry
    key_stats(lm, [0], fp, corpus, n_tokens=150, quiet=True)
    assert spy[-1] == [0]
    assert len(_cached_files(cache)) == 3
    # no temporary files left behind
    assert not [p for p in (cache / "stats").rglob("*") if ".tmp-" in p.name]


def test_covariance_files_read_each_layer_from_the_cache(lm, tiny_model_dir, corpus_file, cache, spy):
    """`covariance_files`: every layer's cached C, read (checksum checked) when asked for and not held; None while a
    layer is missing; a file that vanishes in use is a clear error. An editor with λ_∅ (which reads C in every
    solve) edits the same through them as through the C's in memory."""
    from edit2deploy.errors import Edit2DeployError
    from edit2deploy.methods import EditConfig, Editor
    from edit2deploy.methods.values import ValueHParams
    from edit2deploy.requests import EditRequest
    from edit2deploy.stats import CovarianceFiles, covariance_files

    fp = weights_fingerprint(tiny_model_dir("llama"))
    corpus = corpus_from_path(corpus_file)
    assert covariance_files(lm, [0, 1], fp, corpus, 250) is None  # nothing cached yet
    held = key_stats(lm, [0, 1], fp, corpus, n_tokens=250, quiet=True)
    files = covariance_files(lm, [0, 1], fp, corpus, 250)
    assert isinstance(files, CovarianceFiles) and list(files) == [0, 1] and len(files) == 2
    assert torch.equal(files[0], held[0].C) and files[0] is not files[0]  # a fresh read each time
    assert covariance_files(lm, [0, 1, 2], fp, corpus, 250) is None
    requests = [EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", id="a")]
    cfg = EditConfig(layers=(0, 1), lambda_null=50.0, values=ValueHParams(max_steps=2, dtype="float32"))
    deltas = []
    for stats in ({li: s.C for li, s in held.items()}, files):
        edited = open_model(tiny_model_dir("llama"))
        deltas.append(Editor(edited, cfg, stats, [], quiet=True).apply_batch(requests).deltas)
    for li in (0, 1):
        assert deltas[0][li].abs().max() > 0 and torch.equal(deltas[0][li], deltas[1][li])
    del files[1]
    assert list(files) == [0]
    for f in _cached_files(cache):
        f.unlink()
    with pytest.raises(Edit2DeployError, match="vanished"):
        files[0]


def _corrupt_data(f):
    raw = bytearray(f.read_bytes())
    raw[-20] ^= 0xFF  # inside the tensor bytes (the header is at the front)
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flip-bytes", "truncate", "bad-checksum", "no-meta"])
def test_corrupt_cache_warns_and_recomputes(lm, tiny_model_dir, corpus_file, cache, spy, damage):
    fp = weights_fingerprint(tiny_model_dir("llama"))
    corpus = corpus_from_path(corpus_file)
    good = key_stats(lm, [0, 1], fp, corpus, n_tokens=250, quiet=True)
    f = next(f for f in _cached_files(cache) if f.name.startswith("L1-"))
    meta = f.with_suffix(".json")
    if damage == "flip-bytes":
        _corrupt_data(f)
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "bad-checksum":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "sha256": "0" * 64}))
    else:
        meta.unlink()
    with pytest.warns(UserWarning, match="corrupt"):
        again = key_stats(lm, [0, 1], fp, corpus, n_tokens=250, quiet=True)
    assert spy == [[0, 1], [1]]  # only the damaged layer was recomputed
    assert torch.equal(again[1].C, good[1].C) and torch.equal(again[0].C, good[0].C)
    with warnings.catch_warnings():  # and the entry was rewritten intact
        warnings.simplefilter("error")
        key_stats(lm, [0, 1], fp, corpus, n_tokens=250, quiet=True)
    assert spy == [[0, 1], [1]]


# ================================================================ corpora
def test_corpus_text_file(lm, corpus_file):
    corpus = corpus_from_path(corpus_file)
    assert corpus.path == corpus_file and corpus.id.startswith("corpus.txt-")
    tok = lm.tokenizer
    expected = [tok(p)["input_ids"] for p in PARAGRAPHS if p != "Short."]
    with pytest.warns(UserWarning, match="only"):
        chunks = corpus_token_chunks(lm, corpus, 10_000, quiet=True)
    assert chunks == expected * 3  # one chunk per paragraph; tiny paragraphs skipped
    capped = corpus_token_chunks(lm, corpus, 50, quiet=True)
    assert sum(map(len, capped)) == 50 and capped[0] == expected[0]
    assert capped[-1] == expected[len(capped) - 1][: len(capped[-1])]


def test_corpus_long_paragraph_is_cut_into_max_len_pieces(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(lm.model.config, "max_position_embeddings", 4096)  # a long-context model: 1,024 caps
    f = tmp_path / "long.txt"
    f.write_text(" ".join(f"word{i}" for i in range(300)))
    ids = lm.tokenizer(f.read_text())["input_ids"]
    assert len(ids) > MAX_SEQ_LEN
    chunks = corpus_token_chunks(lm, corpus_from_path(f), len(ids), quiet=True)
    assert chunks == [ids[s : s + MAX_SEQ_LEN] for s in range(0, len(ids), MAX_SEQ_LEN)]
    assert len(chunks) == 2


def test_corpus_directory_of_txt_and_jsonl(lm, tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(PARAGRAPHS[0] + "\n\n" + PARAGRAPHS[1])
    (d / "b.jsonl").write_text(
        json.dumps({"text": PARAGRAPHS[2]}) + "\n\n" + json.dumps({"text": PARAGRAPHS[4]}) + "\n"
    )
    (d / "sub" / "c.txt").write_text(PARAGRAPHS[1])
    (d / "notes.md").write_text("# ignored " * 50)
    corpus = corpus_from_path(d)
    tok = lm.tokenizer
    with pytest.warns(UserWarning, match="only"):
        chunks = corpus_token_chunks(lm, corpus, 10_000, quiet=True)
    assert chunks == [tok(PARAGRAPHS[i])["input_ids"] for i in (0, 1, 2, 4, 1)]
    # the corpus id follows the content (it is part of the cache key)
    (d / "sub" / "c.txt").write_text(PARAGRAPHS[0])
    assert corpus_from_path(d).id != corpus.id
    assert corpus_from_path(d).id == corpus_from_path(d).id


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", "malformed JSON"), ('{"txt": "x"}', "field 'text'"), ('["a"]', "field 'text'")],
)
def test_corpus_jsonl_bad_line_names_file_and_line(lm, tmp_path, line, message):
    d = tmp_path / "corpus"
    d.mkdir()
    f = d / "data.jsonl"
    f.write_text(json.dumps({"text": PARAGRAPHS[0]}) + "\n\n" + line + "\n")
    with pytest.raises(UsageError, match=message) as exc:
        corpus_token_chunks(lm, corpus_from_path(d), 10_000, quiet=True)
    assert f"{f}:3:" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_corpus_path_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        corpus_from_path(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .txt or .jsonl"):
        corpus_from_path(tmp_path / "empty")


def test_generated_corpus(lm):
    corpus = corpus_from_path(None)
    assert corpus.path is None and corpus.id == "generated-v3"
    a = generated_token_chunks(lm, 60, seq_len=12, batch=3, quiet=True)
    assert sum(map(len, a)) == 60
    seed_len = max(len(lm.tokenizer(w)["input_ids"]) for w in stats_mod.GENERATION_SEEDS)
    assert all(len(c) <= 12 + seed_len for c in a)
    assert a == generated_token_chunks(lm, 60, seq_len=12, batch=3, quiet=True)  # seeded: reproducible
    assert a != generated_token_chunks(lm, 60, seq_len=12, batch=3, seed=1, quiet=True)
    pad = lm.tokenizer.pad_token_id
    assert all(pad not in c for c in a)


def test_generated_corpus_rows_start_a_document(lm, monkeypatch):
    """Each row is sampled after the document separator (SmolLM2's tokenizer adds no BOS); the chunk itself
    starts at the seed word, as a text corpus's chunk starts at its text."""
    from edit2deploy.scoring import document_start

    start = document_start(lm.tokenizer)
    assert start == [lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    prompts = []
    real = lm.model.generate

    def generate(**kw):
        for row, mask in zip(kw["input_ids"].tolist(), kw["attention_mask"].tolist(), strict=True):
            prompts.append([t for t, m in zip(row, mask, strict=True) if m])
        return real(**kw)

    monkeypatch.setattr(lm.model, "generate", generate)
    chunks = generated_token_chunks(lm, 48, seq_len=8, batch=6, quiet=True)
    seeds = [lm.tokenizer(w)["input_ids"] for w in stats_mod.GENERATION_SEEDS[:6]]
    assert prompts == [start + s for s in seeds]
    assert [c[: len(s)] for c, s in zip(chunks, seeds, strict=True)] == seeds


def test_generated_corpus_samples_only_the_rows_it_needs(lm, monkeypatch):
    """A small token budget must not sample a whole batch of 32 × 256 tokens."""
    sizes = []
    real = lm.model.generate

    def generate(**kw):
        sizes.append(kw["input_ids"].shape[0])
        return real(**kw)

    monkeypatch.setattr(lm.model, "generate", generate)
    chunks = generated_token_chunks(lm, 30, seq_len=8, batch=32, quiet=True)
    assert sum(map(len, chunks)) == 30
    assert sizes == [4]  # ceil(30 / 8) rows, not 32


def test_cli_stats_command(tiny_model_dir, corpus_file, cache, capsys):
    from edit2deploy import cli

    model = str(tiny_model_dir("llama"))
    args = ["--quiet", "stats", "--model", model, "--corpus", str(corpus_file), "--n-tokens", "200"]
    assert cli.main([*args, "--layers", "0-1"]) == 0
    assert [f.name.split("-")[0] for f in _cached_files(cache)] == ["L0", "L1"]
    # a layer the model does not have: a usage error before any work
    assert cli.main([*args, "--layers", "1-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edit2deploy: error: --layers: [2, 3] out of range (model has 2 layers: 0-1)"]


def test_corpus_pieces_fit_the_model_context(tiny_model_dir, tmp_path):
    """A model with a 512-token context (the tiny GPT-2) gets pieces of at most 512 tokens, not 1,024."""
    gpt2 = open_model(tiny_model_dir("gpt2"))
    assert gpt2.model.config.n_positions == 512
    f = tmp_path / "long.txt"
    f.write_text(" ".join(f"word{i}" for i in range(300)))
    ids = gpt2.tokenizer(f.read_text())["input_ids"]
    chunks = corpus_token_chunks(gpt2, corpus_from_path(f), len(ids), quiet=True)
    assert chunks == [ids[s : s + 512] for s in range(0, len(ids), 512)]
    st = collect_key_stats(gpt2, [0, 1], chunks, quiet=True)
    assert st[1].n_tokens == len(ids) and st[0].C.shape == (128, 128)


# ================================================================ names (neighbour keys)
def test_names_in_text_are_capitalised_runs_not_sentence_starts(lm):
    text = (
        "Robert Boulter is an English actor. He starred in The Bill with Mark Strong in London. "
        "However, the play ran at the Royal Court Theatre in 2001."
    )
    ids = lm.tokenizer(text)["input_ids"]
    assert stats_mod.names_in(lm, [ids]) == [
        "Robert Boulter",
        "English",
        "The Bill",
        "Mark Strong",
        "London",
        "Royal Court Theatre",
    ]
    assert stats_mod.names_in(lm, [ids, ids], limit=2) == ["Robert Boulter", "English"]


def test_corpus_names_are_kept_with_the_statistics(lm, tiny_model_dir, corpus_file, cache, monkeypatch):
    """The statistics pass stores the corpus's names, so `corpus_names` needs no second pass over the corpus
    (for the generated corpus that would be generating it again); a damaged file warns and is redone."""
    fp = weights_fingerprint(tiny_model_dir("llama"))
    corpus = corpus_from_path(corpus_file)
    key_stats(lm, [0], fp, corpus, n_tokens=250, quiet=True)
    expected = stats_mod.names_in(lm, corpus_token_chunks(lm, corpus, 250))
    assert "The Eiffel Tower" in expected and "Gustave Eiffel" in expected
    real_chunks = stats_mod.corpus_token_chunks

    def no_pass(*a, **k):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(stats_mod, "corpus_token_chunks", no_pass)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stats_mod.corpus_names(lm, fp, corpus, 250) == expected
    f = next((cache / "stats").rglob("names-*.json"))
    f.write_text(f.read_text().replace("Eiffel", "Eiffle"))
    monkeypatch.setattr(stats_mod, "corpus_token_chunks", real_chunks)
    with pytest.warns(UserWarning, match="corrupt"):
        assert stats_mod.corpus_names(lm, fp, corpus, 250) == expected
    monkeypatch.setattr(stats_mod, "corpus_token_chunks", no_pass)
    assert stats_mod.corpus_names(lm, fp, corpus, 250) == expected  # rewritten intact
