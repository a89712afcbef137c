"""Reports of `edit2deploy run`: report.json against its JSON Schema, the Markdown and the self-contained HTML
(rendered in a real headless Chromium: the summary table and both scatter series must be on the page), the
Ollama Modelfile, the held-out perplexity text, target/gate parsing, and the persistent score cache.

Everything here is synthetic (no model), except the Modelfile check against SmolLM2's real chat template.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from edit2deploy.errors import UsageError
from edit2deploy.formats import FORMATS, Artifact, Protection, Target, parse_targets
from edit2deploy.formats.gguf.modelfile import CHATML_GO_TEMPLATE, chatml_default_system, modelfile_text
from edit2deploy.gates import Gates, Perplexity
from edit2deploy.generation import Settled, check_generation
from edit2deploy.ops.report import build_report
from edit2deploy.ops.results import RunResult, TargetResult
from edit2deploy.ops.scores import CachedScorer, HeldOut, heldout_pairs, load_heldout
from edit2deploy.ops.verify import parse_gates
from edit2deploy.probes import Probe, ProbeResult
from edit2deploy.report import load_schema, render_html, render_markdown
from edit2deploy.report import write_reports as _write_reports
from edit2deploy.report.svg import EDITED_COLOUR, PRESERVED_COLOUR


def write_reports(result):
    return _write_reports(build_report(result), result.out)


from edit2deploy.gates import GateResult, ProbeRow, Verification
from edit2deploy.requests import EditRequest, Neighbor
from edit2deploy.scoring import Scored

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ==================================================================== a synthetic run
def _result(i: int, kind: str, success: bool, margin: float) -> ProbeResult:
    probe = Probe(
        f"r{i}", kind, f"prompt {i} of {kind} <&>", "new" if kind in ("edit", "paraphrase") else "old", "x"
    )
    return ProbeResult(
        probe, lp_expected=-1.0, lp_other=-1.0 - margin, greedy_expected=success, top1_id=1, top1="a"
    )


class _Says:
    """A text generator that always says the same thing (the report is under test, not a runtime)."""

    def __init__(self, text: str):
        self.text = text

    def complete(self, prompt: str, max_new_tokens: int, until=None) -> str:
        return self.text

    def chat(self, messages, max_new_tokens: int, until=None) -> str:
        return self.text


def synthetic_run(out: Path, n: int = 12, passed: bool = True) -> RunResult:
    """A RunResult with `n` edited and `n` preserved facts per target (margins spread over ±6)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    requests = [
        EditRequest("{} is in", f"S{i}", "new", "old", ("p",), (Neighbor("q", "old"),), f"r{i}")
        for i in range(n)
    ]
    targets = []
    for t in (Target("gguf", "Q4_K_M"), Target("gguf", "Q8_0")):
        rows = []
        for i in range(n):
            for kind, sign in (("edit", 1), ("neighborhood", 1)):
                m32 = float(sign * rng.uniform(0.5, 6))
                ma = m32 + float(rng.normal(0, 0.7))
                fp32, art = _result(i, kind, m32 > 0, m32), _result(i, kind, ma > 0, ma)
                rows.append(ProbeRow(fp32.probe, fp32, art, fp32, fp32))
        gates = [
            GateResult(
                "survival",
                0.97,
                0.95,
                passed,
                "verdicts equal to fp32: 0.970 (need ≥ 0.95)",
                [] if passed else ["edit:r1: prompt 1"],
            )
        ]
        ver = Verification(
            rows,
            {
                "fp32": {"edit": 100.0, "paraphrase": None, "neighborhood": 90.0, "preserved": None},
                "artifact": {"edit": 95.0, "paraphrase": None, "neighborhood": 88.0, "preserved": None},
            },
            {"all": 0.97, "edited": 0.95, "preserved": 1.0},
            0.98,
            gates,
        )
        ver.generation = check_generation(requests, {"fp32": _Says("S1 is in new"), "artifact": _Says("old")})
        art = Artifact(
            out / "artifacts" / FORMATS[t.format].artifact_name(t),
            "gguf",
            t.quant,
            size_bytes=123 * 2**20,
            seconds=1.5,
            edited_types={"model.layers.4.mlp.down_proj.weight": "Q8_0"},
        )
        targets.append(
            TargetResult(
                t,
                art,
                ver,
                None,
                None,
                Perplexity(21.5, 400),
                Perplexity(21.0, 400),
                seconds={"export": 1.5, "verify": 2.0},
            )
        )
    records = [
        {
            "type": "batch",
            "id": f"batch-000{b}",
            "time": "2025-01-01T00:00:00+0000",
            "method": "default",
            "seconds": 3.0,
            "layers": [4, 5],
            "requests": [r.to_json() for r in requests[(b - 1) * 6 : b * 6]],
            "tensors": {
                f"model.layers.{li}.mlp.down_proj.weight": {
                    "layer": li,
                    "delta_fro": 0.1 * li,
                    "fro_from_original": 0.2 * li * (b + 1),
                }
                for li in (4, 5)
            },
        }
        for b in (1, 2)
    ]
    state = {
        "base_model": "smollm2-135m",
        "base_fingerprint": "ab" * 32,
        "corpus": "generated-v3",
        "n_tokens": 20000,
        "edited_tensors": list(records[0]["tensors"]),
        "batches": ["batch-0001", "batch-0002"],
    }
    return RunResult(
        out=out,
        model="smollm2-135m",
        edits="examples/edits.jsonl",
        model_dir=out / "model",
        base_model_dir=Path("/cache/smollm2"),
        requests=requests,
        config={"method": "default", "layers": []},
        edit_cached=False,
        edit_note="no edited model yet",
        ledger_state=state,
        ledger_records=records,
        heldout=HeldOut("package:edit2deploy/data/heldout.txt", (("A.", " B."),)),
        perplexity={"fp32": Perplexity(20.0, 400), "base_fp32": Perplexity(19.5, 400)},
        targets=targets,
        seconds={"edit": 10.0, "reference": 2.0, "total": 30.0},
    )


@pytest.fixture
def doc(tmp_path) -> dict:
    return build_report(synthetic_run(tmp_path))


# ==================================================================== report.json
def test_report_json_validates_against_the_shipped_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    paths = write_reports(synthetic_run(tmp_path / "run"))
    text = paths["json"].read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)
    assert doc["schema_version"] == 2 and doc["passed"] is True
    gen = doc["targets"][0]["generation"]
    assert gen["rates"]["fp32"]["chat_new"] == 100.0 and gen["rates"]["artifact"]["chat_old"] == 100.0
    assert gen["survival"] == 0.0 and gen["facts"][0]["text_artifact"] == "old"
    assert [t["target"] for t in doc["targets"]] == ["gguf:Q4_K_M", "gguf:Q8_0"]
    assert doc["targets"][0]["artifact"]["path"] == "artifacts/model-Q4_K_M.gguf"  # relative to out
    assert doc["ledger"]["batches"][1]["requests"] == [f"r{i}" for i in range(6, 12)]
    # the schema is strict where it promises stability: an unknown top-level field is rejected
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "surprise": 1}, schema)
    bad = json.loads(text)
    bad["targets"][0]["survival"]["all"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_non_finite_numbers_become_null(tmp_path):
    run = synthetic_run(tmp_path)
    run.perplexity["fp32"] = Perplexity(math.inf, 10)
    doc = build_report(run)
    assert doc["perplexity"]["fp32"]["value"] is None
    json.dumps(doc, allow_nan=False)


def test_markdown_has_the_tables(doc):
    md = render_markdown(doc)
    assert md.startswith("# edit2deploy report")
    for needle in (
        "| target | size |",
        "| gguf:Q4_K_M |",
        "## Perplexity",
        "## Norm growth",
        "| batch | L4 | L5 |",
        "## Ledger",
        "batch-0002",
        "**PASS** survival",
    ):
        assert needle in md, needle


def test_html_is_self_contained_and_escaped(doc):
    page = render_html(doc)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    low = page.lower()
    for banned in ("<script", "<link", "<img", "<iframe", "url(", "@import", "src="):
        assert banned not in low, banned
    # the only URL is the SVG namespace (an identifier, never fetched)
    urls = {u.split("'")[0] for u in low.split("http")[1:]}
    assert urls <= {"://www.w3.org/2000/svg"}, urls
    assert "prompt 1 of edit &lt;&amp;&gt;" in page and "<&>" not in page
    assert page.count("<svg") >= 2 + 1 + 1  # two scatters, norm bars, perplexity bars


# ==================================================================== the page in a real browser
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def decode_png(data: bytes) -> np.ndarray:
    """A tiny PNG decoder (8-bit RGB/RGBA, not interlaced — what Chromium writes): (h, w, 3) uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and interlace == 0 and ctype in (2, 6), f"unsupported PNG {hdr}"
    bpp = 4 if ctype == 6 else 3
    raw, stride = zlib.decompress(b"".join(idat)), w * bpp
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1)
        if f == 0:
            cur = line.copy()
        elif f == 1:  # Sub: a running sum per channel
            cur = (
                (np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.uint64) % 256).astype(np.uint8).reshape(-1)
            )
        elif f == 2:  # Up
            cur = line + prev
        else:  # Average (3) / Paeth (4): sequential
            buf, p = bytearray(line.tobytes()), prev.tobytes()
            for i in range(stride):
                a = buf[i - bpp] if i >= bpp else 0
                b = p[i]
                if f == 3:
                    buf[i] = (buf[i] + ((a + b) >> 1)) & 255
                else:
                    c = p[i - bpp] if i >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    buf[i] = (buf[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.frombuffer(bytes(buf), np.uint8)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, bpp)[:, :, :3]


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)


def _count(img: np.ndarray, hex_colour: str, tol: int = 3) -> int:
    return int((np.abs(img.astype(np.int16) - _rgb(hex_colour)) <= tol).all(-1).sum())


def screenshot(html_path: Path, png: Path, tmp: Path) -> np.ndarray:
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'chrome-profile'}",
        "--force-color-profile=srgb",
        "--hide-scrollbars",
        f"--screenshot={png}",
        "--window-size=1280,2000",
        html_path.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert png.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return decode_png(png.read_bytes())


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (apt-get install -y chromium); CI installs it"
)
def test_html_renders_table_and_plots_in_chromium(tmp_path):
    paths = write_reports(synthetic_run(tmp_path / "run", n=15))
    img = screenshot(paths["html"], tmp_path / "report.png", tmp_path)
    assert img.shape == (2000, 1280, 3)
    white = (img >= 250).all(-1)
    assert (~white).mean() > 0.03, "the page is (nearly) blank"
    # the summary table: its header cells have a light blue-grey background, near the top of the page
    header = _count(img[:600], "#eef2f7", tol=2)
    assert header > 2000, f"no table header rendered near the top ({header} px)"
    # both scatter series are drawn (each point is a filled disc; the legend has one small disc per series)
    edited, preserved = _count(img, EDITED_COLOUR), _count(img, PRESERVED_COLOUR)
    assert edited > 30 * 40 and preserved > 30 * 40, (edited, preserved)
    # ... inside the plot area (below the table, left half), not only in the legend
    ys, xs = np.nonzero((np.abs(img.astype(np.int16) - _rgb(EDITED_COLOUR)) <= 3).all(-1))
    assert ys.max() - ys.min() > 100 and xs.max() - xs.min() > 100, "edited points are not spread over a plot"
    # the norm-growth bars (batch palette) and the perplexity bars are drawn too
    assert _count(img, "#2ca02c") > 500 and _count(img, "#0969da") > 500


# ==================================================================== Ollama Modelfile
def test_modelfile_for_chatml_smollm2():
    text = modelfile_text("model-Q4_K_M.gguf", SMOLLM2_TEMPLATE, "<|im_end|>")
    assert text == (
        "# Ollama Modelfile written by edit2deploy: ollama create NAME -f <this file>\n"
        "FROM ./model-Q4_K_M.gguf\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
        "{{ .Content }}<|im_end|>\n"
        '{{ end }}<|im_start|>assistant\n"""\n'
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
        "PARAMETER temperature 0\n"
    )
    assert chatml_default_system("{{ '<|im_start|>system\\n' + message['content'] + '<|im_end|>' }}") is None


def _render_go(template: str, messages: list[dict]) -> str:
    """Ollama's rendering of the ChatML Go template (the subset it uses: range over .Messages, .Role, .Content)."""
    head, rest = template.split("{{- range .Messages }}", 1)
    body, tail = rest.split("{{ end }}", 1)
    return (
        head
        + "".join(
            body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages
        )
        + tail
    )


def test_go_template_renders_like_the_jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    tpl = jinja2.Environment().from_string(SMOLLM2_TEMPLATE)
    system = chatml_default_system(SMOLLM2_TEMPLATE)
    for messages in (
        [{"role": "user", "content": "Where is the Eiffel Tower?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Where is Rome?"},
        ],
    ):
        want = tpl.render(messages=messages, add_generation_prompt=True)
        # Ollama prepends the Modelfile's SYSTEM when the conversation has no system message
        ollama = (
            messages
            if messages[0]["role"] == "system"
            else [{"role": "system", "content": system}, *messages]
        )
        assert _render_go(CHATML_GO_TEMPLATE, ollama) == want


def test_modelfile_for_other_templates_keeps_the_stop_token():
    text = modelfile_text(
        "m.gguf", "{{ bos_token }}{% for m in messages %}<start_of_turn>...", "<end_of_turn>"
    )
    assert "TEMPLATE" not in text and "FROM ./m.gguf\n" in text
    assert 'PARAMETER stop "<end_of_turn>"' in text and "not converted" in text
    assert "TEMPLATE" not in modelfile_text("m.gguf", None, None)


# ==================================================================== held-out text, targets, gates
def test_heldout_pairs_split_first_sentence():
    pairs = heldout_pairs('One two. Three four! Five.\n\nSingle sentence only.\n\n"Quoted." Then more.')
    assert pairs == [("One two.", " Three four! Five."), ('"Quoted."', " Then more.")]
    held = load_heldout()
    assert held.source == "package:edit2deploy/data/heldout.txt" and len(held.pairs) == 6
    assert held.pairs[0][0].startswith("It is a truth universally acknowledged")
    assert all(c.startswith(" ") and len(c) > 40 for _, c in held.pairs)


def test_parse_targets():
    assert parse_targets("gguf:q4_k_m, gguf:Q8_0,gguf:Q4_K_M") == [
        Target("gguf", "Q4_K_M"),
        Target("gguf", "Q8_0"),
    ]
    assert FORMATS["gguf"].artifact_name(Target("gguf", "Q8_0")) == "model-Q8_0.gguf"
    assert FORMATS["onnx"].artifact_name(Target("onnx", "int4")) == "model-onnx-int4"
    with pytest.raises(UsageError, match=r"'mlx:q4': format 'mlx' not available \(available formats: gguf"):
        parse_targets("gguf:Q8_0,mlx:q4")
    with pytest.raises(UsageError, match="has no type 'Q9'"):
        parse_targets("gguf:Q9")
    with pytest.raises(UsageError, match="no format has type 'gguf'"):
        parse_targets("gguf")
    with pytest.raises(UsageError, match="is not FORMAT:TYPE"):
        parse_targets("gguf:Q8_0:f16:extra")


def test_one_target_grammar_protection_and_bare_types():
    """The grammar every command uses: FORMAT:TYPE[:PROTECTION], a bare TYPE that one format has."""
    none = Target("gguf", "Q4_K_M", Protection.NONE)
    assert parse_targets("Q4_K_M:none,onnx:int4,bnb:nf4:f16") == [
        none,
        Target("onnx", "int4"),
        Target("bnb", "nf4", "f16"),
    ]
    assert str(none) == "gguf:Q4_K_M:none" and str(Target("gguf", "Q4_K_M")) == "gguf:Q4_K_M"
    assert parse_targets("gguf:Q8_0", protection="f16") == [Target("gguf", "Q8_0", Protection.F16)]
    assert FORMATS["gguf"].artifact_name(none) == "model-Q4_K_M-none.gguf"
    with pytest.raises(UsageError, match="ambiguous, write one of onnx:int8, bnb:int8"):
        parse_targets("int8")
    with pytest.raises(UsageError, match=r"--protect-edits.*unknown value 'q4'|unknown value 'q4'"):
        parse_targets("gguf:Q8_0:q4")
    with pytest.raises(UsageError, match="empty"):
        parse_targets(" , ")


def test_parse_gates():
    assert parse_gates(["survival=0.9", "perplexity_increase=5"]) == Gates(
        survival=0.9, perplexity_increase=5.0
    )
    assert parse_gates({"specificity_drop": None, "perplexity-increase": "off"}) == Gates(
        specificity_drop=None
    )
    with pytest.raises(UsageError):
        parse_gates(["perplexity_increase=lots"])


# ==================================================================== persistent score cache
class _CountingScorer:
    name = "fake"

    def __init__(self):
        self.calls = 0

    def tokenize(self, prompt, continuation):
        return [1], [2]

    def score(self, pairs):
        self.calls += 1
        return [Scored((1,), (2, 3), (-0.5, -float(len(p))), (2, 3)) for p, _ in pairs]


def test_cached_scorer_remembers_on_disk_and_opens_lazily(tmp_path):
    store = tmp_path / "s.json"
    made = []

    def factory():
        made.append(_CountingScorer())
        return made[-1]

    s = CachedScorer(factory, store, {"weights": "abc"})
    assert not s.opened
    first = s.score([("a", " x"), ("bb", " y"), ("a", " x")])
    assert len(made) == 1 and made[0].calls == 1 and first[0] == first[2]
    s.close()
    again = CachedScorer(factory, store, {"weights": "abc"})
    assert again.score([("bb", " y"), ("a", " x")]) == [first[1], first[0]]
    assert not again.opened and len(made) == 1  # nothing scored, nothing opened
    other = CachedScorer(
        factory, store, {"weights": "changed"}
    )  # another model: the stored scores do not apply
    other.score([("a", " x")])
    assert len(made) == 2
    store.write_text("{damaged")
    CachedScorer(factory, store, {"weights": "abc"}).score([("a", " x")])
    assert len(made) == 3


class _Writer:
    """A text generator that counts what it is asked and answers with its prompt and the rule it was given."""

    def __init__(self):
        self.asked = []

    def complete_many(self, prompts, max_new_tokens, until=None):
        self.asked.extend(prompts)
        return [f"{p}|{u is not None}" for p, u in zip(prompts, until or [None] * len(prompts))]


def test_cached_scorer_remembers_texts_per_stop_rule(tmp_path):
    """A generated text is remembered with the stop rule it was generated under: the same `Settled` rule reuses it
    (on disk too), another rule or none generates again, and a rule that is not a value is never remembered."""
    store = tmp_path / "s.json"
    made = []

    def factory():
        made.append(_Writer())
        return made[-1]

    rome, paris = Settled("Rome", "Paris"), Settled("Paris", "Rome")
    s = CachedScorer(factory, store, {"weights": "abc"})
    assert s.complete_many(["a", "b"], 8, [rome, None]) == ["a|True", "b|False"]
    assert s.complete("a", 8, rome) == "a|True" and made[0].asked == ["a", "b"]
    s.complete_many(["a", "a"], 8, [paris, None])
    s.complete("a", 8, lambda text: False)
    s.complete("a", 8, lambda text: False)
    assert made[0].asked == ["a", "b", "a", "a", "a", "a"]
    s.close()
    again = CachedScorer(factory, store, {"weights": "abc"})
    assert again.complete_many(["b", "a", "a"], 8, [None, rome, paris]) == ["b|False", "a|True", "a|True"]
    assert not again.opened


def test_demo_edits_are_the_example_edits():
    from edit2deploy.ops.demo import demo_edits_path
    from edit2deploy.requests import load_requests

    root = Path(__file__).resolve().parent.parent
    assert demo_edits_path().read_text() == (root / "examples" / "edits.jsonl").read_text()
    requests = load_requests(demo_edits_path())
    assert 4 <= len(requests) <= 6
    assert all(r.target_true and r.paraphrases and r.neighborhood for r in requests)
    assert (
        requests[0].text == "The Eiffel Tower is located in the city of" and requests[0].target_new == "Rome"
    )


def test_chat_gates_are_on_by_default_and_pass_only_what_they_can_measure():
    """`chat_efficacy` (≥ 0.8) and `generation_survival` (≥ 0.9) are default gates: they fail below their
    threshold, and pass, saying so, when nothing could be measured (generation off, or no chat template)."""
    from edit2deploy.gates import generation_gates

    assert (Gates().chat_efficacy, Gates().generation_survival) == (0.8, 0.9)
    req = EditRequest("The Eiffel Tower is in", "The Eiffel Tower", "Rome", "Paris", id="e")
    fp32, good, bad = _Says("It is in Rome, Italy."), _Says("Rome, Italy."), _Says("Paris, of course.")
    passed = generation_gates(Gates(), check_generation([req], {"fp32": fp32, "artifact": good}))
    assert [(g.name, g.value, g.passed) for g in passed] == [
        ("chat_efficacy", 1.0, True),
        ("generation_survival", 1.0, True),
    ]
    failed = generation_gates(Gates(), check_generation([req], {"fp32": fp32, "artifact": bad}))
    assert [(g.name, g.passed) for g in failed] == [("chat_efficacy", False), ("generation_survival", False)]
    assert failed[0].failing == ["chat:e: The Eiffel Tower is in"]
    unmeasured = generation_gates(Gates(), None)
    assert all(g.passed and g.value is None and g.detail.startswith("not measured") for g in unmeasured)
    assert generation_gates(parse_gates(["chat_efficacy=off", "generation_survival=off"]), None) == []
