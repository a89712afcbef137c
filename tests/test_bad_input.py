"""Every user mistake is caught before the work starts (issue 31): each bad input below is a one-line usage error
(exit code 2) naming the file or flag and the field, with no traceback, within 5 s, and before statistics or
editing start (the statistics cache and the output directory stay absent).

The CLI runs in process (`edit2deploy.cli.main`, the console script's function): a subprocess would spend most of
its time importing torch; `test_console_script_gives_the_same_one_line` checks the real entry point on a few rows.
Models are tiny random ones made by the tests (`conftest.tiny_model_dir`), edited here where a ledger is needed.
"""

from __future__ import annotations

import importlib
import json
import shutil
import struct
import time
from pathlib import Path

import pytest
from conftest import run_cli

from edit2deploy import cli
from edit2deploy.errors import InputFileError, UsageError
from edit2deploy.methods import EditConfig
from edit2deploy.methods.values import ValueHParams

GOOD = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
OTHER = {"prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": "ice hockey"}
SURROGATE = r'{"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Ro\ud800me"}'


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


EDIT = ["edit", "--model", "{model}", "--edits", "{edits}", "--out", "{out}"]
RUN = ["run", "--model", "{model}", "--edits", "{edits}", "--out", "{out}", "--targets", "gguf:Q8_0"]
TOML = ["--config", "{d}/c.toml"]


def toml(text: str) -> dict[str, str | bytes]:
    return {"c.toml": text}


# name -> (argv, fragments of the one stderr line, files written into the case's directory {d}).
# Placeholders: {model} a tiny llama, {edits} a good edit file, {out} an output that must not appear,
# {d} the case's directory, {m_*} broken model directories, {edited}/{tampered}/{artifact} an edited model.
CASES: dict[str, tuple[list[str], list[str], dict[str, str | bytes]]] = {
    # ---- the table
    "edit --n-tokens -1": (EDIT + ["--n-tokens", "-1"], ["--n-tokens", "expected a positive integer"], {}),
    "[edit] dtype = float128": (
        EDIT + TOML,
        ["c.toml: field 'dtype'", "'float128'", "auto, float32, bfloat16"],
        toml('[edit]\ndtype = "float128"\n'),
    ),
    "[edit] lr = nan": (EDIT + TOML, ["c.toml: field 'lr'", "finite"], toml("[edit]\nlr = nan\n")),
    "[edit] lambda_p = inf": (
        EDIT + TOML,
        ["c.toml: field 'lambda_p'", "finite"],
        toml("[edit]\nlambda_p = inf\n"),
    ),
    "[run] n_tokens string": (
        RUN + TOML,
        ["c.toml: [run] field 'n_tokens'", "integer ≥ 1", "'20000'"],
        toml('[run]\nn_tokens = "20000"\n'),
    ),
    "[run] baseline string": (
        RUN + TOML,
        ["c.toml: [run] field 'baseline'", "true or false", "'no'"],
        toml('[run]\nbaseline = "no"\n'),
    ),
    "edit = 5 (not a table)": (EDIT + TOML, ["c.toml: 'edit' must be a table", "int"], toml("edit = 5\n")),
    "lone surrogate in target_new (facts)": (
        ["facts", "--model", "{model}", "--facts", "{d}/s.jsonl"],
        ["s.jsonl:1: field 'target_new'", "lone UTF-16 surrogate \\ud800"],
        {"s.jsonl": jsonl(SURROGATE)},
    ),
    "config.json num_hidden_layers thirty": (
        ["facts", "--model", "{m_thirty}", "--facts", "{edits}"],
        ["config.json: field 'num_hidden_layers'", 'expected a positive integer, got "thirty"'],
        {},
    ),
    # ---- more numbers, types and enums in the [edit] table and --set
    "[edit] lr = 0": (EDIT + TOML, ["c.toml: field 'lr'", "> 0"], toml("[edit]\nlr = 0.0\n")),
    "[edit] max_steps string": (
        EDIT + TOML,
        ["c.toml: field 'max_steps'", "expected an integer"],
        toml('[edit]\nmax_steps = "25"\n'),
    ),
    "[edit] mpes string": (
        EDIT + TOML,
        ["c.toml: field 'mpes'", "true or false"],
        toml('[edit]\nmpes = "yes"\n'),
    ),
    "[edit] method unknown": (
        EDIT + TOML,
        ["c.toml: field 'method'", "'rome'"],
        toml('[edit]\nmethod = "rome"\n'),
    ),
    "[edit] unknown field": (
        EDIT + TOML,
        ["c.toml: unknown field 'lamda_p'"],
        toml("[edit]\nlamda_p = 1.0\n"),
    ),
    "[edit] layers floats": (EDIT + TOML, ["c.toml: field 'layers'"], toml("[edit]\nlayers = [0.5, 1]\n")),
    "[edit] negative retry_rounds": (
        EDIT + TOML,
        ["c.toml: field 'retry_rounds'", "≥ 0"],
        toml("[edit]\nretry_rounds = -1\n"),
    ),
    "unknown table": (EDIT + TOML, ["c.toml: unknown table(s) ['edits']"], toml("[edits]\nlr = 0.5\n")),
    "not TOML": (EDIT + TOML, ["c.toml: not valid TOML"], toml("[edit\nlr = 0.5\n")),
    "TOML not UTF-8": (EDIT + TOML, ["c.toml: not UTF-8"], {"c.toml": "[edit]\n# café\n".encode("latin-1")}),
    "--config missing": (EDIT + ["--config", "{d}/none.toml"], ["none.toml: file not found"], {}),
    "[edit] chat_contexts = maybe": (
        EDIT + TOML,
        ["c.toml: field 'chat_contexts'", "'maybe'", "auto, on, off"],
        toml('[edit]\nchat_contexts = "maybe"\n'),
    ),
    "--set chat_keys=both": (
        EDIT + ["--set", "chat_keys=both"],
        ["--set: field 'chat_keys'", "separate, shared"],
        {},
    ),
    "--set dtype=float128": (EDIT + ["--set", "dtype=float128"], ["--set: field 'dtype'", "'float128'"], {}),
    "--set lr=abc": (EDIT + ["--set", "lr=abc"], ["--set: field 'lr'", "expected a number"], {}),
    "--set lr=nan": (EDIT + ["--set", "lr=nan"], ["--set: field 'lr'", "finite"], {}),
    "--set without =": (EDIT + ["--set", "lr"], ["--set lr: expected KEY=VALUE"], {}),
    "--method unknown": (EDIT + ["--method", "rome"], ["field 'method'", "'rome'"], {}),
    # ---- flags
    "--batch-size 0": (EDIT + ["--batch-size", "0"], ["--batch-size", "expected a positive integer"], {}),
    "--layers bad": (EDIT + ["--layers", "4-x"], ["--layers", "not a layer list"], {}),
    "--layers out of range": (EDIT + ["--layers", "7"], ["--layers: [7] out of range"], {}),
    "--harden-margin nan": (
        EDIT + ["--harden-for", "gguf:Q8_0", "--harden-margin", "nan"],
        ["--harden-margin", "finite number"],
        {},
    ),
    "--harden-margin without --harden-for": (EDIT + ["--harden-margin", "2"], ["need --harden-for"], {}),
    "--device tpu": (EDIT + ["--device", "tpu"], ["--device", "'tpu'"], {}),
    "--gate survival=nan": (RUN + ["--gate", "survival=nan"], ["--gate survival=nan", "finite"], {}),
    "--gate unknown": (RUN + ["--gate", "surviving=0.9"], ["--gate surviving=0.9", "NAME one of"], {}),
    "--targets unknown type": (
        ["run", "--model", "{model}", "--edits", "{edits}", "--out", "{out}", "--targets", "gguf:Q9_X"],
        ["Q9_X"],
        {},
    ),
    "--protect-edits q4": (RUN + ["--protect-edits", "q4"], ["--protect-edits", "'q4'"], {}),
    "run without --targets": (
        ["run", "--model", "{model}", "--edits", "{edits}", "--out", "{out}"],
        ["missing --targets"],
        {},
    ),
    # ---- the [run] table
    "[run] device tpu": (
        RUN + TOML,
        ["c.toml: [run] field 'device'", "'tpu'"],
        toml('[run]\ndevice = "tpu"\n'),
    ),
    "[run] gate as a quoted number": (
        RUN + TOML,
        ["c.toml: [run] field 'gates'"],
        toml('[run]\ngates = {survival = "0.9"}\n'),
    ),
    "[run] targets a number": (RUN + TOML, ["c.toml: [run] field 'targets'"], toml("[run]\ntargets = 5\n")),
    "[run] unknown field": (
        RUN + TOML,
        ["c.toml: [run]: unknown field 'modle'"],
        toml('[run]\nmodle = "x"\n'),
    ),
    # ---- edit files
    "edits: malformed JSON": (
        EDIT[:4] + ["{d}/e.jsonl", "--out", "{out}"],
        ["e.jsonl:2: malformed JSON"],
        {"e.jsonl": jsonl(GOOD, "{oops")},
    ),
    "edits: missing subject": (
        EDIT[:4] + ["{d}/e.jsonl", "--out", "{out}"],
        ["e.jsonl:1: field 'subject'", "missing"],
        {"e.jsonl": jsonl({k: v for k, v in GOOD.items() if k != "subject"})},
    ),
    "edits: not UTF-8": (
        EDIT[:4] + ["{d}/e.jsonl", "--out", "{out}"],
        ["e.jsonl: not UTF-8"],
        {"e.jsonl": json.dumps({**GOOD, "target_new": "Café"}, ensure_ascii=False).encode("latin-1")},
    ),
    "edits: surrogate in a neighbour": (
        EDIT[:4] + ["{d}/e.jsonl", "--out", "{out}"],
        ["e.jsonl:1: field 'neighborhood[0].answer'", "surrogate \\udc80"],
        {
            "e.jsonl": jsonl(
                json.dumps({**GOOD, "neighborhood": [{"prompt": "P", "answer": "x"}]}).replace(
                    '"x"', '"\\udc80"'
                )
            )
        },
    ),
    "edits: conflicting targets": (
        EDIT[:4] + ["{d}/e.jsonl", "--out", "{out}"],
        ["e.jsonl:3: field 'target_new'", "'Paris' conflicts with 'Rome' at {d}/e.jsonl:1"],
        {"e.jsonl": jsonl(GOOD, OTHER, {**GOOD, "target_new": "Paris"})},
    ),
    "edits: not found": (EDIT[:4] + ["{d}/none.jsonl", "--out", "{out}"], ["none.jsonl: file not found"], {}),
    # ---- models
    "model: config.json not JSON": (
        EDIT[:2] + ["{m_notjson}"] + EDIT[3:],
        ["config.json:1: not valid JSON"],
        {},
    ),
    "model: rms_norm_eps NaN": (
        EDIT[:2] + ["{m_nan}"] + EDIT[3:],
        ["config.json: field 'rms_norm_eps'", "NaN"],
        {},
    ),
    "model: no config.json": (EDIT[:2] + ["{m_noconfig}"] + EDIT[3:], ["no config.json"], {}),
    "model: only a pickle": (
        EDIT[:2] + ["{m_pickle}"] + EDIT[3:],
        ["cannot load the model weights"],
        {},
    ),
    "model: not found": (EDIT[:2] + ["{d}/nowhere"] + EDIT[3:], ["model not found"], {}),
    "--out is the input": (EDIT[:6] + ["{model}"], ["is the input model directory"], {}),
    # ---- an edited model: its ledger and weights
    "edit: conflicts with the ledger": (
        ["edit", "--model", "{edited}", "--edits", "{d}/e.jsonl", "--out", "{out}"],
        ["e.jsonl:1: field 'target_new'", "'Paris' conflicts with 'Rome'", "batch-0001 of"],
        {"e.jsonl": jsonl({**GOOD, "target_new": "Paris"})},
    ),
    "rollback: a flipped weight byte": (
        ["rollback", "--model", "{tampered}", "--last", "1"],
        ["model.safetensors: SHA-256 differs", "rollback refused"],
        {},
    ),
    "verify: a flipped weight byte": (
        ["verify", "--artifact", "{artifact}", "--model", "{tampered}"],
        ["model.safetensors: SHA-256 differs", "verify refused"],
        {},
    ),
    "rollback --last 3 of 1": (
        ["rollback", "--model", "{edited}", "--last", "3"],
        ["--last 3: the ledger has 1 active batch(es)"],
        {},
    ),
}


def flip_tensor_byte(path: Path, tensor: str) -> None:
    """Flip one byte in the middle of `tensor`'s data in a safetensors file (the header stays readable)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _copy_model(src: Path, dst: Path, config: str | None = None, weights: bool = True) -> Path:
    shutil.copytree(src, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    if config is not None:
        (dst / "config.json").write_text(config)
    return dst


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    """The models and files the cases name: a tiny llama, broken copies of it, and an edited, exported and
    tampered one."""
    from edit2deploy.ledger import Ledger
    from edit2deploy.ops.edit import edit_model
    from edit2deploy.ops.export import export
    from edit2deploy.ops.scores import load_heldout

    root = tmp_path_factory.mktemp("bad-input")
    model = tiny_model_dir("llama")
    config = json.loads((model / "config.json").read_text())
    edits = root / "edits.jsonl"
    edits.write_text(jsonl(GOOD))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(p + c for p, c in load_heldout().pairs) * 4)
    noconfig = root / "m-noconfig"
    noconfig.mkdir()
    (noconfig / "model.safetensors").write_bytes(b"\0")
    pickle = _copy_model(model, root / "m-pickle", weights=False)
    (pickle / "pytorch_model.bin").write_bytes(b"\0not a pickle")  # never unpickled
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDIT2DEPLOY_CACHE", str(root / "cache"))
        mp.setenv("TQDM_DISABLE", "1")
        edited = root / "edited"
        cfg = EditConfig(layers=(0, 1), values=ValueHParams(max_steps=2))
        edit_model(str(model), edits, edited, cfg=cfg, corpus=corpus, n_tokens=400, quiet=True)
        artifact = export(edited, root / "edited-F32.gguf", "gguf:F32")
    tampered = _copy_model(edited, root / "tampered")
    name = Ledger.load(edited).state["edited_tensors"][0]
    flip_tensor_byte(tampered / "model.safetensors", name)
    return {
        "model": model,
        "edits": edits,
        "m_thirty": _copy_model(
            model, root / "m-thirty", json.dumps({**config, "num_hidden_layers": "thirty"})
        ),
        "m_nan": _copy_model(model, root / "m-nan", json.dumps({**config, "rms_norm_eps": float("nan")})),
        "m_notjson": _copy_model(model, root / "m-notjson", "{'model_type': 'llama'"),
        "m_noconfig": noconfig,
        "m_pickle": pickle,
        "edited": edited,
        "tampered": tampered,
        "artifact": artifact.path,
    }


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """What the commands import (torch, transformers) is loaded once, outside the timed part."""
    for name in ("edit2deploy.ops.edit", "edit2deploy.ops.run", "edit2deploy.ops.verify"):
        importlib.import_module(name)


def _fill(text: str, values: dict) -> str:
    return text.format(**{k: str(v) for k, v in values.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_before_any_work(name, ws, tmp_path, monkeypatch, capsys):
    argv, fragments, files = CASES[name]
    d = tmp_path / "case"
    d.mkdir()
    for fname, content in files.items():
        (d / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
    values = {**ws, "d": d, "out": tmp_path / "out"}
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(cache))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    t = time.perf_counter()
    rc = cli.main([_fill(a, values) for a in argv])
    seconds = time.perf_counter() - t
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("edit2deploy: error: "), err
    print(f"\n{name} | {lines[0]}")  # with -s: the table of inputs and messages
    for fragment in fragments:
        assert _fill(fragment, values) in lines[0], lines[0]
    assert "Traceback" not in err and "internal error" not in err
    assert seconds < 5, f"{seconds:.1f} s"
    assert not (cache / "stats").exists() and not (tmp_path / "out").exists()  # no statistics, no output


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


# ---------------------------------------------------------------- the console script itself
@pytest.mark.parametrize("name", ["edit --n-tokens -1", "[edit] dtype = float128", "edit = 5 (not a table)"])
def test_console_script_gives_the_same_one_line(name, ws, tmp_path):
    argv, fragments, files = CASES[name]
    d = tmp_path / "case"
    d.mkdir()
    for fname, content in files.items():
        (d / fname).write_text(content)
    values = {**ws, "d": d, "out": tmp_path / "out"}
    t = time.perf_counter()
    r = run_cli(*[_fill(a, values) for a in argv], env={"EDIT2DEPLOY_CACHE": str(tmp_path / "cache")})
    seconds = time.perf_counter() - t
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(_fill(f, values) in r.stderr for f in fragments) and "Traceback" not in r.stderr
    assert seconds < 15, f"{seconds:.1f} s"  # interpreter and torch start-up included


# ---------------------------------------------------------------- the Python API checks the same things
API_CASES = {
    "n_tokens string": ("run", {"n_tokens": "20000"}, "field 'n_tokens'"),
    "baseline string": ("run", {"baseline": "no"}, "field 'baseline'"),
    "gates quoted number": ("run", {"gates": {"survival": "0.9"}}, "field 'gates'"),
    "device tpu": ("run", {"device": "tpu"}, "--device: unknown device 'tpu'"),
    "lambda_p inf": ("run", {"cfg": EditConfig(lambda_p=float("inf"))}, "cfg: field 'lambda_p'"),
    "dtype float128": (
        "run",
        {"cfg": EditConfig(values=ValueHParams(dtype="float128"))},
        "cfg: field 'dtype'",
    ),
    "quiet string": ("run", {"quiet": "yes"}, "field 'quiet'"),
    "edit batch_size 0": ("edit", {"batch_size": 0}, "field 'batch_size'"),
    "edit lr nan": ("edit", {"cfg": EditConfig(values=ValueHParams(lr=float("nan")))}, "cfg: field 'lr'"),
    "edit layers strings": ("edit", {"cfg": EditConfig(layers=("a",))}, "field 'layers'"),
    "edit limit 0": ("edit", {"limit": 0}, "field 'limit'"),
    "run unknown argument": ("run", {"n_token": 400}, "unknown argument(s) ['n_token']"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_python_api_rejects_the_same_mistakes_before_any_work(name, ws, tmp_path, monkeypatch):
    import edit2deploy

    op, kwargs, fragment = API_CASES[name]
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    t = time.perf_counter()
    with pytest.raises(UsageError) as exc:
        if op == "run":
            edit2deploy.run(
                str(ws["model"]), ws["edits"], "gguf:Q8_0", out, quiet=kwargs.pop("quiet", True), **kwargs
            )
        else:
            edit2deploy.edit(str(ws["model"]), ws["edits"], out, quiet=True, **kwargs)
    assert fragment in str(exc.value) and time.perf_counter() - t < 5
    assert not (tmp_path / "cache" / "stats").exists() and not out.exists()


def test_verify_gates_mapping_takes_numbers_only(ws):
    from edit2deploy.ops.verify import verify

    with pytest.raises(
        UsageError, match="gates: field 'survival': expected a number ≥ 0 or 'off', got '0.9'"
    ):
        verify(ws["artifact"], ws["edited"], gates={"survival": "0.9"})


# ---------------------------------------------------------------- duplicates and conflicts
def test_exact_duplicates_are_merged_with_one_warning(tmp_path):
    from edit2deploy.requests import load_requests, merge_duplicates

    path = tmp_path / "e.jsonl"
    path.write_text(jsonl(GOOD, OTHER, GOOD))
    with pytest.warns(
        UserWarning, match=r"merged 1 exact duplicate request\(s\): .*e.jsonl:3 repeats .*e.jsonl:1"
    ):
        merged = load_requests(path, merge=True)
    assert [r.subject for r in merged] == ["The Eiffel Tower", "Lionel Messi"]
    assert len(load_requests(path)) == 3  # a fact file may ask twice (`facts` scores both lines)
    from edit2deploy.requests import EditRequest

    with pytest.raises(
        InputFileError, match="request 1: field 'target_new'.*conflicts with 'Rome' at edits: request 0"
    ):
        merge_duplicates([EditRequest(**GOOD), EditRequest(**{**GOOD, "target_new": "Paris"})], "edits")


def test_edits_already_in_the_ledger_are_skipped_with_a_warning(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    edits = tmp_path / "e.jsonl"
    edits.write_text(jsonl(GOOD))
    rc = cli.main(["edit", "--model", str(ws["edited"]), "--edits", str(edits), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (tmp_path / "o").exists()
    assert (
        err[0].startswith("edit2deploy: warning: skipped 1 request(s) already edited into")
        and "batch-0001" in err[0]
    )
    assert err[1].startswith("edit2deploy: error: every edit request is already in")
