"""Edit requests: loading our JSONL and CounterFact JSON, and every validation error class.

Errors are checked in-process (message names file, line/record and field) and through the real CLI
in subprocesses (exit code 2, one clear line, no traceback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import COUNTERFACT_VAL, FACTS, ROOT

from edit2deploy.cli import main
from edit2deploy.errors import InputFileError, InputProblem, UsageError
from edit2deploy.requests import EditRequest, Neighbor, dump_jsonl, load_requests

GOOD = {
    "id": "eiffel",
    "prompt": "The Eiffel Tower is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}


def write_jsonl(path: Path, *records, raw_lines: dict[int, str] | None = None) -> Path:
    """Write records one per line; `raw_lines` puts verbatim text at given 0-based positions."""
    lines = [json.dumps(r) for r in records]
    for pos, text in (raw_lines or {}).items():
        lines.insert(pos, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def problems_of(path: Path, **kw) -> list[InputProblem]:
    with pytest.raises(InputFileError) as info:
        load_requests(path, **kw)
    return info.value.problems


# ---------------------------------------------------------------- loading
def test_examples_facts_jsonl():
    reqs = load_requests(FACTS)
    assert [r.id for r in reqs] == ["eiffel", "france", "darrieux", "colosseum", "python"]
    eiffel = reqs[0]
    assert eiffel.prompt == "{} is located in the city of"
    assert eiffel.subject == "The Eiffel Tower"
    assert eiffel.text == "The Eiffel Tower is located in the city of"
    assert (eiffel.target_new, eiffel.target_true) == ("Rome", "Paris")
    assert eiffel.paraphrases == ("Where is the Eiffel Tower? It stands in the city of",)
    assert eiffel.neighborhood == (Neighbor("The Louvre is located in the city of", "Paris"),)
    python = reqs[-1]
    assert python.target_true == "Guido van Rossum"


def test_limit_and_offset_jsonl():
    assert [r.id for r in load_requests(FACTS, limit=2)] == ["eiffel", "france"]
    assert [r.id for r in load_requests(FACTS, limit=2, offset=3)] == ["colosseum", "python"]
    assert len(load_requests(FACTS, limit=100)) == 5


@pytest.mark.parametrize("limit", [0, -1, 1.5])
def test_bad_limit_is_a_usage_error(limit):
    with pytest.raises(UsageError, match="--limit: expected a positive integer"):
        load_requests(FACTS, limit=limit)


def test_counterfact_easyedit_json_with_limit():
    assert COUNTERFACT_VAL.is_file(), f"test data missing: {COUNTERFACT_VAL}"
    raw = json.loads(COUNTERFACT_VAL.read_text())
    reqs = load_requests(COUNTERFACT_VAL, limit=7)
    assert len(reqs) == 7
    for req, rec in zip(reqs, raw):
        assert req.id == str(rec["case_id"])
        assert req.text == rec["prompt"]  # subject found literally and turned into the placeholder
        assert "{}" in req.prompt and req.subject == rec["subject"]
        assert req.target_new == rec["target_new"]
        assert req.target_true == rec["ground_truth"]
        assert req.paraphrases == (rec["rephrase_prompt"],)
        assert req.neighborhood == (Neighbor(rec["locality_prompt"], rec["locality_ground_truth"]),)
    offset = load_requests(COUNTERFACT_VAL, limit=3, offset=5)
    assert [r.id for r in offset] == [str(rec["case_id"]) for rec in raw[5:8]]
    assert len(load_requests(COUNTERFACT_VAL)) == len(raw)


def test_rome_counterfact_layout(tmp_path):
    rec = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": ["Danielle Darrieux grew up speaking"],
        "neighborhood_prompts": ["The mother tongue of Jean Gabin is"],
    }
    path = tmp_path / "rome.json"
    path.write_text(json.dumps([rec]))
    (req,) = load_requests(path)
    assert req == EditRequest(
        "The mother tongue of {} is",
        "Danielle Darrieux",
        "English",
        "French",
        ("Danielle Darrieux grew up speaking",),
        (Neighbor("The mother tongue of Jean Gabin is", "French"),),
        "0",
    )


def test_placeholder_and_literal_subject_give_the_same_request(tmp_path):
    literal = write_jsonl(tmp_path / "a.jsonl", GOOD)
    placeholder = write_jsonl(tmp_path / "b.jsonl", dict(GOOD, prompt="{} is located in the city of"))
    (a,), (b,) = load_requests(literal), load_requests(placeholder)
    assert a == b
    assert a.prompt.count("{}") == 1 and a.text == GOOD["prompt"]


def test_subject_in_the_middle_and_only_first_occurrence_replaced(tmp_path):
    rec = dict(GOOD, prompt="Tourists say Paris is Paris, and Paris is", subject="Paris", target_true="x")
    (req,) = load_requests(write_jsonl(tmp_path / "m.jsonl", rec))
    assert req.prompt == "Tourists say {} is Paris, and Paris is"
    assert req.text == rec["prompt"]


def test_paraphrase_placeholder_is_filled(tmp_path):
    rec = dict(GOOD, paraphrases=["Where is {}? It stands in the city of", "In which city is the tower? In"])
    (req,) = load_requests(write_jsonl(tmp_path / "p.jsonl", rec))
    assert req.paraphrases == ("Where is The Eiffel Tower? It stands in the city of", rec["paraphrases"][1])


def test_blank_lines_comments_bom_and_default_ids(tmp_path):
    path = tmp_path / "c.jsonl"
    rec = {k: v for k, v in GOOD.items() if k != "id"}
    text = "# a comment\n\n" + json.dumps(rec) + "\n   \n" + json.dumps(dict(rec, target_new="Berlin")) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # UTF-8 BOM, as some editors write it
    reqs = load_requests(path)
    assert [r.id for r in reqs] == ["3", "5"]  # default id = line number
    assert [r.target_new for r in reqs] == ["Rome", "Berlin"]


def test_integer_id_and_dump_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", dict(GOOD, id=7), dict(GOOD, id="x", target_true=None))
    reqs = load_requests(path)
    assert [r.id for r in reqs] == ["7", "x"]
    assert reqs[1].target_true is None
    again = tmp_path / "again.jsonl"
    again.write_text(dump_jsonl(reqs))
    assert load_requests(again) == reqs


# ---------------------------------------------------------------- validation: one problem class each
# (records, expected (line, field, message fragment)); line is 1-based for JSONL
ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre-eval-head.json"


def test_questions_and_aliases_round_trip(tmp_path):
    rec = dict(GOOD, questions=["Where is {}?"], aliases={"Rome": ["Roma"], "Paris": ["Paname"]})
    (req,) = load_requests(write_jsonl(tmp_path / "q.jsonl", rec))
    assert req.questions == ("Where is The Eiffel Tower?",)  # "{}" names the subject, as in paraphrases
    assert req.aliases_of("Rome") == ("Roma",) and req.aliases_of("Berlin") == ()
    assert EditRequest.from_json(req.to_json()) == req
    (plain,) = load_requests(write_jsonl(tmp_path / "p.jsonl", GOOD))
    assert "questions" not in plain.to_json() and "aliases" not in plain.to_json()  # older records unchanged


def test_zsre_mend_layout(tmp_path):
    """zsRE as MEND splits it: the question is the prompt, `alt` the new answer, `answers[0]` the true one, the
    rephrased question a paraphrase and a chat question, the NQ locality question a neighbour; records without a
    new answer are skipped with a warning, and `alt` equal to the truth leaves no old answer."""
    recs = [
        {
            "subject": "Watts Humphrey",
            "src": "What university did Watts Humphrey attend?",
            "pred": "Trinity College",
            "rephrase": "What university did Watts Humphrey take part in?",
            "alt": "University of Michigan",
            "answers": ["Illinois Institute of Technology"],
            "loc": "nq question: who played desmond doss father in hacksaw ridge",
            "loc_ans": "Hugo Weaving",
            "cond": "...",
        },
        {"subject": "Phyllis Chan", "src": "What is the sex of Phyllis Chan?", "alt": "", "answers": ["female"],
         "rephrase": "Phyllis Chan is of which sex?", "loc": "nq question: x", "loc_ans": "y"},
        {"subject": "Ada", "src": "Where was Ada born?", "alt": "London", "answers": ["london"], "rephrase": "Ada's birthplace?"},
    ]  # fmt: skip
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(recs))
    first, last = load_requests(path)
    assert first == EditRequest(
        "What university did {} attend?",
        "Watts Humphrey",
        "University of Michigan",
        "Illinois Institute of Technology",
        ("What university did Watts Humphrey take part in?",),
        (Neighbor("Who played desmond doss father in hacksaw ridge?", "Hugo Weaving"),),
        "0",
        ("What university did Watts Humphrey take part in?",),
    )
    assert last.target_true is None and last.id == "2"
    path.write_text(json.dumps([dict(recs[0], answers=[])]))
    (problem,) = problems_of(path)
    assert problem.field == "answers" and "non-empty list" in problem.message


@pytest.mark.skipif(not ZSRE.is_file(), reason="shared zsRE data missing")
def test_zsre_eval_head_loads():
    requests = load_requests(ZSRE, limit=100)
    assert len(requests) == 99  # record 54 has no new answer
    assert all(r.questions and r.neighborhood and r.prompt.endswith("?") for r in requests)


PROBLEMS = {
    "malformed JSON": ([GOOD], {1: '{"prompt": "x",'}, (2, None, "malformed JSON")),
    "missing field": ([{k: v for k, v in GOOD.items() if k != "subject"}], {}, (1, "subject", "missing")),
    "empty field": ([dict(GOOD, target_new="  ")], {}, (1, "target_new", "empty")),
    "wrong type": ([dict(GOOD, target_new=5)], {}, (1, "target_new", "expected a string, got a number")),
    "wrong type list": ([dict(GOOD, paraphrases=[1])], {}, (1, "paraphrases", "expected a list")),
    "wrong type neighbor": (
        [dict(GOOD, neighborhood=[{"prompt": "x"}])],
        {},
        (1, "neighborhood[0]", "answer"),
    ),
    "subject not in prompt": ([dict(GOOD, subject="Big Ben")], {}, (1, "prompt", "'Big Ben' does not occur")),
    "two placeholders": ([dict(GOOD, prompt="{} and {}")], {}, (1, "prompt", "more than one")),
    "target equals truth": (
        [dict(GOOD, target_new=" Paris")],
        {},
        (1, "target_new", "equals the true answer"),
    ),
    "unknown field": ([dict(GOOD, neighbourhood=[])], {}, (1, "neighbourhood", "unknown field")),
    "bad id type": ([dict(GOOD, id=[1])], {}, (1, "id", "expected a string or an integer, got an array")),
    "duplicate id": ([GOOD, dict(GOOD, target_new="Berlin")], {}, (2, "id", "duplicate id 'eiffel'")),
    "not an object": ([GOOD], {1: "[1, 2]"}, (2, None, "expected a JSON object, got an array")),
    "bad questions": (
        [dict(GOOD, questions=[""])],
        {},
        (1, "questions", "expected a list of non-empty strings"),
    ),
    "bad aliases": (
        [dict(GOOD, aliases={"Rome": "Roma"})],
        {},
        (1, "aliases", "answer -> list of non-empty"),
    ),
}


@pytest.mark.parametrize("case", PROBLEMS, ids=list(PROBLEMS))
def test_each_problem_names_file_line_and_field(tmp_path, case):
    records, raw, (line, field, fragment) = PROBLEMS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", *records, raw_lines=raw)
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.field) == (str(path), line, field)
    assert fragment in problem.message
    text = str(problem)
    assert text.startswith(f"{path}:{line}: ")
    if field:
        assert f"field '{field}'" in text
    assert fragment in text


def test_duplicate_id_points_at_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", GOOD, dict(GOOD, id="other"), dict(GOOD, target_new="Berlin"))
    (problem,) = problems_of(path)
    assert problem.line == 3 and problem.field == "id"
    assert "first used at line 1" in problem.message


def test_all_problems_of_a_file_are_collected_in_line_order(tmp_path):
    path = write_jsonl(
        tmp_path / "many.jsonl",
        dict(GOOD, id="a", subject="Big Ben"),
        dict(GOOD, id="b"),
        {"id": "c", "prompt": "p"},
        raw_lines={3: "{oops"},
    )
    problems = problems_of(path)
    got = [(p.line, p.field) for p in problems]
    assert got == [(1, "prompt"), (3, "subject"), (3, "target_new"), (4, None)]
    err = InputFileError(problems)
    assert str(err).endswith("(and 3 more problem(s))")
    assert err.report().splitlines() == [str(p) for p in problems]


def test_json_records_are_named_by_index(tmp_path):
    path = tmp_path / "cf.json"
    good = json.loads(COUNTERFACT_VAL.read_text())[0]
    bad = dict(good, subject="Nobody")
    path.write_text(json.dumps([good, good | {"case_id": 11}, bad | {"case_id": 12}], indent=1))
    (problem,) = problems_of(path)
    assert (problem.line, problem.field, problem.record_kind) == (2, "prompt", "record")
    assert str(problem).startswith(f"{path}: record 2: field 'prompt': subject 'Nobody'")


def test_json_duplicate_case_id(tmp_path):
    good = json.loads(COUNTERFACT_VAL.read_text())[0]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([good, good]))
    (problem,) = problems_of(path)
    assert (problem.line, problem.field) == (1, "case_id")
    assert "duplicate id" in problem.message and "record 0" in problem.message


def test_json_malformed_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    (problem,) = problems_of(path)
    assert problem.line == 3 and "malformed JSON" in problem.message
    assert str(problem).startswith(f"{path}:3: malformed JSON")


def test_json_not_an_array(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps(GOOD))
    (problem,) = problems_of(path)
    assert str(problem) == f"{path}: expected a JSON array of records, got an object"


def test_json_record_not_an_object(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([GOOD, "oops"]))
    (problem,) = problems_of(path)
    assert str(problem) == f"{path}: record 1: expected an object, got a string"


def test_neighborhood_prompt_with_placeholder_is_rejected(tmp_path):
    rec = dict(GOOD, neighborhood=[{"prompt": "{} is in", "answer": "Paris"}])
    (problem,) = problems_of(write_jsonl(tmp_path / "n.jsonl", rec))
    assert problem.field == "neighborhood[0]" and '"{}"' in problem.message


def test_missing_path():
    with pytest.raises(UsageError, match=r"nope\.jsonl: file not found"):
        load_requests("nope.jsonl")


def test_path_is_a_directory(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        load_requests(tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(dict(GOOD, subject="Café")).replace("Caf\\u00e9", "Café").encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1\.jsonl: not UTF-8 text \(byte \d+\)"):
        load_requests(path)


def test_unreadable_file(tmp_path, monkeypatch):
    """The OSError branch, independent of who runs the tests (root can read mode-000 files)."""
    path = write_jsonl(tmp_path / "locked.jsonl", GOOD)

    def deny(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(UsageError, match=r"locked\.jsonl: cannot read \(Permission denied\)"):
        load_requests(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("# only a comment\n\n")
    with pytest.raises(UsageError, match="no edit requests found"):
        load_requests(path)


# ---------------------------------------------------------------- the CLI, in process (every problem class)
@pytest.mark.parametrize("case", PROBLEMS, ids=list(PROBLEMS))
def test_cli_in_process_reports_input_problems(tmp_path, capsys, case):
    records, raw, (line, field, fragment) = PROBLEMS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", *records, raw_lines=raw)
    rc = main(["facts", "--model", str(tmp_path / "no-model"), "--facts", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.splitlines()  # one problem, one line
    assert lines[0].startswith(f"edit2deploy: error: {path}:{line}: ") and fragment in lines[0]
    assert field is None or f"field '{field}'" in lines[0]
    assert len(lines) == 1


# ---------------------------------------------------------------- the CLI, in subprocesses
def _cli_cases(d: Path) -> dict[str, tuple[list[str], list[str], int]]:
    """name -> (argv, fragments stderr must contain, expected number of stderr lines)."""
    model_arg = ["--model", str(d / "no-such-model")]
    bad = write_jsonl(d / "bad.jsonl", dict(GOOD, subject="Big Ben"), raw_lines={1: "{oops"})
    latin = d / "latin1.jsonl"
    latin.write_bytes('{"prompt": "Café"}\n'.encode("latin-1"))
    notarray = d / "obj.json"
    notarray.write_text(json.dumps(GOOD))
    bert = d / "bert-model"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    noconfig = d / "not-a-model"
    noconfig.mkdir()
    (noconfig / "weights.bin").write_bytes(b"\0")
    garbage = d / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file")
    facts = ["--facts", str(FACTS)]
    return {
        "input problems": (["facts", *model_arg, "--facts", str(bad)], ["2 problem(s) in input"], 3),
        "facts not found": (
            ["facts", *model_arg, "--facts", str(d / "missing.jsonl")],
            ["file not found"],
            1,
        ),
        "facts is a directory": (["facts", *model_arg, "--facts", str(d)], ["is a directory"], 1),
        "facts not utf-8": (["facts", *model_arg, "--facts", str(latin)], ["not UTF-8 text"], 1),
        "json not an array": (["facts", *model_arg, "--facts", str(notarray)], ["expected a JSON array"], 1),
        "unknown architecture": (
            ["facts", "--model", str(bert), *facts],
            ["unsupported architecture 'bert'", "gemma3_text, gpt2, llama, mistral, qwen2, qwen3"],
            1,
        ),
        "model not found": (["facts", *model_arg, *facts], ["model not found", "smollm2-135m"], 1),
        "dir without config.json": (["facts", "--model", str(noconfig), *facts], ["no config.json"], 1),
        "not a gguf": (["facts", "--model", str(garbage), *facts], ["cannot read as a GGUF model"], 1),
        "bad --probes": (["facts", *model_arg, *facts, "--probes", "edit,bogus"], ["--probes", "bogus"], 1),
        "bad --limit": (
            ["facts", *model_arg, *facts, "--limit", "ten"],
            ["--limit", "expected a positive integer"],
            1,
        ),
        "missing --facts": (["facts", *model_arg], ["required", "--facts"], 1),
        "unknown command": (["fatcs"], ["invalid choice"], 1),
    }


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Run the subprocess CLI cases once, two at a time (each pays Python + torch start-up, ~2 s)."""
    d = tmp_path_factory.mktemp("cli")
    cases = _cli_cases(d)
    env = dict(os.environ, HF_HUB_OFFLINE="1", EDIT2DEPLOY_CACHE=str(d / "cache"))
    results, pending = {}, [(name, cases[name]) for name in SUBPROCESS_CASES]
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < 2:
            name, (argv, _, _) = pending.pop(0)
            proc = subprocess.Popen(
                [sys.executable, "-m", "edit2deploy", *argv],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            running.append((name, proc))
        name, proc = running.pop(0)
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return cases, results


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return list(_cli_cases(Path(d)))


CLI_CASE_NAMES = _case_names()
# In a subprocess: one case per kind of user error (input file, option, model); every case also runs
# in-process. Each subprocess that gets past argument parsing pays ~2 s of torch start-up (see cli.py).
IN_PROCESS_ONLY = {
    "facts not found",
    "facts is a directory",
    "facts not utf-8",
    "json not an array",
    "not a gguf",
}
SUBPROCESS_CASES = [c for c in CLI_CASE_NAMES if c not in IN_PROCESS_ONLY]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_user_errors_exit_2_with_one_clear_line(cli_runs, case):
    cases, results = cli_runs
    _, fragments, n_lines = cases[case]
    rc, out, err = results[case]
    _check_user_error(rc, out, err, fragments, n_lines)


@pytest.mark.parametrize("case", CLI_CASE_NAMES)
def test_cli_user_errors_in_process(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    argv, fragments, n_lines = _cli_cases(tmp_path)[case]
    rc = main(argv)
    out, err = capsys.readouterr()
    _check_user_error(rc, out, err, fragments, n_lines)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # a failed model open converts nothing


def _check_user_error(rc, out, err, fragments, n_lines):
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert lines[0].startswith("edit2deploy: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert len(lines) == n_lines, err


def test_cli_input_problem_lines(cli_runs):
    cases, results = cli_runs
    _, _, err = results["input problems"]
    bad = cases["input problems"][0][-1]
    assert err.splitlines()[1:] == [
        (
            f"{bad}:1: field 'prompt': subject 'Big Ben' does not occur in the prompt "
            '(expected it, or a "{}" placeholder)'
        ),
        f"{bad}:2: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
    ]


def test_cli_in_process_unreadable_file(tmp_path, monkeypatch, capsys):
    """Works as root too: the read itself is made to fail."""
    path = write_jsonl(tmp_path / "locked.jsonl", GOOD)

    def deny(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", deny)
    rc = main(["facts", "--model", "x", "--facts", str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"edit2deploy: error: {path}: cannot read (Permission denied)\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 000 does not stop root from reading")
def test_cli_unreadable_file(tmp_path):
    from conftest import run_cli

    path = write_jsonl(tmp_path / "locked.jsonl", GOOD)
    path.chmod(0)
    try:
        proc = run_cli("facts", "--model", "x", "--facts", str(path))
    finally:
        path.chmod(0o644)
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr and "Traceback" not in proc.stderr
