"""Tamper evidence (issue 31): changed weights of an edited model are refused by rollback (the one-line CLI message
is in test_bad_input.py), for ledgers with and without recorded file hashes; corrupt cache entries (statistics,
scores, paired baselines) are detected, recomputed, and the user is told in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from test_bad_input import GOOD, flip_tensor_byte, jsonl

from edit2deploy.errors import UsageError
from edit2deploy.ledger import LEDGER_DIR, STATE_FILE, Ledger, rollback, tensor_sha256
from edit2deploy.methods import EditConfig
from edit2deploy.methods.values import ValueHParams


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    from edit2deploy.ops.edit import edit_model
    from edit2deploy.ops.scores import load_heldout

    root = tmp_path_factory.mktemp("tamper")
    model = tiny_model_dir("llama")
    edits = root / "edits.jsonl"
    edits.write_text(jsonl(GOOD))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(p + c for p, c in load_heldout().pairs) * 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDIT2DEPLOY_CACHE", str(root / "cache"))
        mp.setenv("TQDM_DISABLE", "1")
        cfg = EditConfig(layers=(0, 1), values=ValueHParams(max_steps=2))
        edit_model(str(model), edits, root / "edited", cfg=cfg, corpus=corpus, n_tokens=400, quiet=True)
    return {"root": root, "model": model, "edited": root / "edited", "corpus": corpus}


def _weights(model: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {k: tensor_sha256(v) for k, v in load_file(model / "model.safetensors").items()}


@pytest.mark.parametrize("file_hashes", [True, False], ids=["recorded file hashes", "older ledger"])
def test_rollback_refuses_changed_weights(env, tmp_path, file_hashes):
    model = shutil.copytree(env["edited"], tmp_path / "m")
    if not file_hashes:  # a ledger written before file hashes were recorded: the edited tensors are compared
        state_path = model / LEDGER_DIR / STATE_FILE
        state = json.loads(state_path.read_text())
        del state["weights_sha256"]
        state_path.write_text(json.dumps(state))
    pristine = shutil.copytree(model, tmp_path / "pristine")
    name = Ledger.load(model).state["edited_tensors"][0]
    flip_tensor_byte(model / "model.safetensors", name)
    what = "model.safetensors: SHA-256 differs" if file_hashes else f"tensor {name} differs"
    with pytest.raises(UsageError, match=what):
        rollback(model, last=1)
    rollback(pristine, last=1)  # the same ledger on unchanged weights rolls back, bit for bit
    assert _weights(pristine) == _weights(env["model"])


def test_a_changed_byte_outside_the_edited_tensors_is_refused_too(env, tmp_path):
    model = shutil.copytree(env["edited"], tmp_path / "m")
    flip_tensor_byte(model / "model.safetensors", "model.embed_tokens.weight")
    with pytest.raises(UsageError, match="SHA-256 differs from the one recorded in the edit ledger"):
        rollback(model, last=1)


def test_corrupt_statistics_cache_is_recomputed_with_a_one_line_warning(env, tmp_path):
    cache = tmp_path / "cache"
    args = ["stats", "--model", str(env["model"]), "--corpus", str(env["corpus"]), "--n-tokens", "300"]
    args += ["--layers", "0", "--quiet"]
    first = run_cli(*args, env={"EDIT2DEPLOY_CACHE": str(cache)})
    assert first.returncode == 0, first.stderr
    (entry,) = (cache / "stats").rglob("L0-*.safetensors")
    flip_tensor_byte(entry, "C")
    again = run_cli(*args, env={"EDIT2DEPLOY_CACHE": str(cache)})
    assert again.returncode == 0, again.stderr
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edit2deploy: warning: statistics cache"), again.stderr
    assert "corrupt (checksum mismatch); recomputing" in lines[0]
    # recomputed: the same statistics (the wall-clock seconds on the last line may differ)
    assert _without_seconds(first.stdout) == _without_seconds(again.stdout)


def _without_seconds(text: str) -> str:
    return re.sub(r"ready in [0-9.]+ s", "ready in … s", text)


def test_corrupt_scores_cache_is_scored_again_with_a_warning(env, tmp_path):
    from edit2deploy.ops.scores import CachedScorer, torch_factory

    store, key = tmp_path / "scores.json", {"weights": "tiny"}
    pairs = [("The Eiffel Tower is located in", " Paris"), ("Lionel Messi plays", " football")]
    first = CachedScorer(torch_factory(env["model"], "cpu"), store, key)
    scored = first.score(pairs)
    first.close()
    reread = CachedScorer(torch_factory(env["model"], "cpu"), store, key)
    assert reread.score(pairs) == scored and not reread.opened  # intact: nothing scored again
    doc = json.loads(store.read_text())
    doc["scores"][0][2]["logprobs"][0] += 1.0  # still valid JSON, a wrong number
    store.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="scores cache .* is corrupt .*checksum mismatch.*; scoring again"):
        damaged = CachedScorer(torch_factory(env["model"], "cpu"), store, key)
    assert damaged.score(pairs) == scored and damaged.opened and damaged.misses == len(pairs)
    damaged.close()


def test_corrupt_paired_baseline_is_exported_again_with_a_warning(env, tmp_path, monkeypatch):
    from edit2deploy.formats import FORMATS
    from edit2deploy.models import weights_fingerprint
    from edit2deploy.ops.baseline import paired_baseline
    from edit2deploy.ops.export import export

    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    fmt = FORMATS["gguf"]
    art = export(env["edited"], tmp_path / "edited.gguf", "gguf:Q8_0")
    fingerprint = weights_fingerprint(env["model"])
    base, reused = paired_baseline(fmt, art, env["model"], fingerprint)
    assert not reused
    original = base.path.read_bytes()
    assert paired_baseline(fmt, art, env["model"], fingerprint)[1] is True
    raw = bytearray(original)
    raw[len(raw) // 2] ^= 0x01  # inside the tensor data: the file still loads
    base.path.write_bytes(bytes(raw))
    with pytest.warns(
        UserWarning, match="paired baseline cache .* is corrupt .*SHA-256 changed.*exporting it again"
    ):
        again, reused = paired_baseline(fmt, art, env["model"], fingerprint)
    assert not reused and again.path.read_bytes() == original
