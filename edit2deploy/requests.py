"""Edit requests: the schema, and loaders for our JSONL format, CounterFact/EasyEdit JSON and zsRE (MEND's layout).

Every problem is reported with file, line (JSONL) or record index (JSON), field, and what was
expected; all problems of a file are collected before raising, so one run shows them all.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import InputFileError, InputProblem, UsageError, first_few

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbor:
    """A preserved fact near an edit: the prompt should keep completing with `answer`."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: `prompt` holds "{}" where `subject` goes; the model should say `target_new`."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Neighbor, ...] = ()
    id: str = ""
    # questions a chat user would ask about the fact (the subject filled in), answered by `target_new` after the edit
    questions: tuple[str, ...] = ()
    # other spellings of an answer that count as mentioning it in generated text: ((answer, (alias, ...)), ...)
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # where it was read ("edits.jsonl:3"), for messages about it; not part of the request (nor of its record)
    where: str = field(default="", compare=False, repr=False)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def aliases_of(self, answer: str) -> tuple[str, ...]:
        """The aliases given for `answer` (empty when none)."""
        return next((a for name, a in self.aliases if name == answer), ())

    @classmethod
    def from_json(cls, d: dict) -> EditRequest:
        """Inverse of `to_json` (ledger records)."""
        return cls(
            prompt=d["prompt"],
            subject=d["subject"],
            target_new=d["target_new"],
            target_true=d.get("target_true"),
            paraphrases=tuple(d.get("paraphrases", ())),
            neighborhood=tuple(Neighbor(n["prompt"], n["answer"]) for n in d.get("neighborhood", ())),
            id=str(d.get("id", "")),
            questions=tuple(d.get("questions", ())),
            aliases=tuple((k, tuple(v)) for k, v in d.get("aliases", {}).items()),
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["paraphrases"] = list(self.paraphrases)
        d["neighborhood"] = [asdict(n) for n in self.neighborhood]
        # the optional fields appear only when given, so records (and ledgers) of requests without them are unchanged
        d.pop("questions"), d.pop("aliases"), d.pop("where")
        if self.questions:
            d["questions"] = list(self.questions)
        if self.aliases:
            d["aliases"] = {k: list(v) for k, v in self.aliases}
        return d


JSONL_FIELDS = (
    "id",
    "prompt",
    "subject",
    "target_new",
    "target_true",
    "paraphrases",
    "neighborhood",
    "questions",
    "aliases",
)
REQUIRED = ("prompt", "subject", "target_new")


class _Checker:
    """Collects problems for one record."""

    def __init__(self, file: str, index: int, kind: str, problems: list[InputProblem]):
        self.file, self.index, self.kind, self.problems = file, index, kind, problems
        self.id_field = "id"  # the field holding the record's id ("case_id" in CounterFact)

    def bad(self, field_name: str | None, message: str) -> None:
        self.problems.append(InputProblem(self.file, self.index, field_name, message, self.kind))

    def string(self, rec: dict, key: str, required: bool = True, label: str | None = None) -> str | None:
        label = label or key
        if key not in rec or rec[key] is None:
            if required:
                self.bad(label, "missing (expected a non-empty string)")
            return None
        value = rec[key]
        if not isinstance(value, str):
            self.bad(label, f"expected a string, got {_json_kind(value)}")
            return None
        if not value.strip():
            self.bad(label, "empty (expected a non-empty string)")
            return None
        return value


def _lone_surrogate(chk: _Checker, value, path: str = "") -> bool:
    """Report the first string (or key) in a parsed record that is not valid Unicode: JSON lets a file write a lone
    UTF-16 surrogate ("\\ud800"), which no tokenizer takes. True when one was found."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(value[exc.start])
            chk.bad(
                path or None,
                f"holds a lone UTF-16 surrogate \\u{code:04x} at character {exc.start} (expected valid Unicode text)",
            )
            return True
        return False
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if _lone_surrogate(chk, k, path) or _lone_surrogate(chk, v, sub):
                return True
    elif isinstance(value, list):
        return any(_lone_surrogate(chk, v, f"{path}[{i}]") for i, v in enumerate(value))
    return False


def _normalise_prompt(chk: _Checker, prompt: str, subject: str, label: str = "prompt") -> str | None:
    """Return the prompt with exactly one "{}" for the subject, or report why that is impossible."""
    if "{}" in prompt:
        if prompt.count("{}") > 1:
            chk.bad(label, 'has more than one "{}" placeholder (expected exactly one, for the subject)')
            return None
        return prompt
    if subject not in prompt:
        chk.bad(
            label,
            f"subject '{subject}' does not occur in the prompt (expected it, or a \"{{}}\" placeholder)",
        )
        return None
    return prompt.replace(subject, "{}", 1)


def _strings(chk: _Checker, rec: dict, key: str) -> tuple[str, ...]:
    value = rec.get(key, [])
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        chk.bad(key, "expected a list of non-empty strings")
        return ()
    return tuple(value)


def _fill_paraphrases(paraphrases: tuple[str, ...], subject: str) -> tuple[str, ...]:
    """Paraphrases may name the subject with "{}" like the prompt does; fill it in."""
    return tuple(p.replace("{}", subject) for p in paraphrases)


def _record_id(chk: _Checker, rec: dict, key: str, default_id: str) -> str:
    """A record's id: a non-empty string or an integer; absent or null means `default_id`."""
    chk.id_field = key
    value = rec.get(key)
    if value is None:
        return default_id
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        chk.bad(key, f"expected a string or an integer, got {_json_kind(value)}")
        return default_id
    if isinstance(value, str) and not value.strip():
        chk.bad(key, "empty (expected a non-empty string or an integer)")
        return default_id
    return str(value)


def _neighbors(chk: _Checker, value) -> tuple[Neighbor, ...]:
    if value is None:
        return ()
    out = []
    if not isinstance(value, list):
        chk.bad("neighborhood", 'expected a list of {"prompt": ..., "answer": ...} objects')
        return ()
    for i, item in enumerate(value):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("prompt"), str)
            and isinstance(item.get("answer"), str)
            and item["prompt"].strip()
            and item["answer"].strip()
        ):
            chk.bad(f"neighborhood[{i}]", 'expected {"prompt": "<non-empty>", "answer": "<non-empty>"}')
            continue
        if "{}" in item["prompt"]:
            chk.bad(
                f"neighborhood[{i}]",
                'prompt contains "{}" (expected a complete prompt about another subject)',
            )
            continue
        out.append(Neighbor(item["prompt"], item["answer"]))
    return tuple(out)


def _aliases(chk: _Checker, value) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`{"Rome": ["Roma"], ...}`: other spellings of an answer."""
    if value is None:
        return ()
    ok = isinstance(value, dict) and all(
        isinstance(k, str)
        and k.strip()
        and isinstance(v, list)
        and all(isinstance(a, str) and a.strip() for a in v)
        for k, v in value.items()
    )
    if not ok:
        chk.bad(
            "aliases", 'expected an object of answer -> list of non-empty strings, e.g. {"Rome": ["Roma"]}'
        )
        return ()
    return tuple((k, tuple(v)) for k, v in value.items())


def _finish(
    chk: _Checker,
    prompt,
    subject,
    target_new,
    target_true,
    paraphrases,
    neighborhood,
    rid,
    questions=(),
    aliases=(),
):
    if prompt is None or subject is None or target_new is None:
        return None
    prompt = _normalise_prompt(chk, prompt, subject)
    if target_true is not None and target_new.strip() == target_true.strip():
        chk.bad("target_new", f"equals the true answer '{target_true}' (expected a different target)")
        return None
    if prompt is None:
        return None
    paraphrases = _fill_paraphrases(paraphrases, subject)
    questions = _fill_paraphrases(questions, subject)
    return EditRequest(
        prompt, subject, target_new, target_true, paraphrases, neighborhood, rid, questions, aliases
    )


def parse_jsonl_record(rec: dict, chk: _Checker, default_id: str) -> EditRequest | None:
    unknown = sorted(set(rec) - set(JSONL_FIELDS))
    for key in unknown:
        chk.bad(key, f"unknown field (expected one of: {', '.join(JSONL_FIELDS)})")
    prompt = chk.string(rec, "prompt")
    subject = chk.string(rec, "subject")
    target_new = chk.string(rec, "target_new")
    target_true = chk.string(rec, "target_true", required=False)
    paraphrases = _strings(chk, rec, "paraphrases")
    neighborhood = _neighbors(chk, rec.get("neighborhood"))
    rid = _record_id(chk, rec, "id", default_id)
    questions = _strings(chk, rec, "questions")
    aliases = _aliases(chk, rec.get("aliases"))
    return _finish(
        chk, prompt, subject, target_new, target_true, paraphrases, neighborhood, rid, questions, aliases
    )


def parse_easyedit_record(rec: dict, chk: _Checker) -> EditRequest | None:
    """CounterFact as redistributed by EasyEdit: prompt, subject, target_new, ground_truth, ..."""
    prompt = chk.string(rec, "prompt")
    subject = chk.string(rec, "subject")
    target_new = chk.string(rec, "target_new")
    target_true = chk.string(rec, "ground_truth", required=False)
    paraphrases = _strings(chk, rec, "rephrase_prompt")
    loc_p, loc_a = rec.get("locality_prompt"), rec.get("locality_ground_truth")
    neighborhood: tuple[Neighbor, ...] = ()
    if loc_p is not None or loc_a is not None:
        if isinstance(loc_a, list):  # some EasyEdit files keep answers as lists
            loc_a = loc_a[0] if loc_a else None
        if isinstance(loc_p, str) and isinstance(loc_a, str) and loc_p.strip() and loc_a.strip():
            neighborhood = (Neighbor(loc_p, loc_a),)
        else:
            chk.bad(
                "locality_prompt", "expected non-empty strings in locality_prompt and locality_ground_truth"
            )
    rid = _record_id(chk, rec, "case_id", str(chk.index))
    return _finish(chk, prompt, subject, target_new, target_true, paraphrases, neighborhood, rid)


NQ_PREFIX = "nq question: "


def parse_zsre_record(rec: dict, chk: _Checker) -> EditRequest | None:
    """zsRE in MEND's layout: `src` (a question about `subject`) is the prompt, `alt` the new answer, `answers[0]`
    the true one, `rephrase` a paraphrase and a chat question, `loc`/`loc_ans` an unrelated question (NQ) whose
    answer must not change. Where `alt` is the true answer already, the request has no old answer. (Records whose
    `alt` is empty cannot be edited; `load_requests` skips them with a warning.)"""
    prompt = chk.string(rec, "src")
    subject = chk.string(rec, "subject")
    target_new = chk.string(rec, "alt")
    answers = rec.get("answers")
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)):
        chk.bad("answers", "expected a non-empty list of non-empty strings (the true answer first)")
        return None
    target_true = answers[0]
    if target_new is not None and target_new.strip().lower() == target_true.strip().lower():
        target_true = None
    rephrase = _strings(chk, rec, "rephrase")
    neighborhood: tuple[Neighbor, ...] = ()
    loc, loc_ans = rec.get("loc"), rec.get("loc_ans")
    if loc is not None or loc_ans is not None:
        if isinstance(loc, str) and isinstance(loc_ans, str) and loc.strip() and loc_ans.strip():
            question = loc.removeprefix(NQ_PREFIX).strip()
            neighborhood = (Neighbor(question[:1].upper() + question[1:] + "?", loc_ans),)
        else:
            chk.bad("loc", "expected non-empty strings in loc and loc_ans")
    rid = _record_id(chk, rec, "case_id", str(chk.index))
    return _finish(chk, prompt, subject, target_new, target_true, rephrase, neighborhood, rid, rephrase)


def parse_rome_record(rec: dict, chk: _Checker) -> EditRequest | None:
    """The original ROME CounterFact layout (requested_rewrite + paraphrase/neighborhood prompts)."""
    rw = rec.get("requested_rewrite")
    if not isinstance(rw, dict):
        chk.bad("requested_rewrite", "expected an object")
        return None
    prompt = chk.string(rw, "prompt", label="requested_rewrite.prompt")
    subject = chk.string(rw, "subject", label="requested_rewrite.subject")
    tn, tt = rw.get("target_new"), rw.get("target_true")
    target_new = chk.string(
        tn if isinstance(tn, dict) else {}, "str", label="requested_rewrite.target_new.str"
    )
    target_true = chk.string(
        tt if isinstance(tt, dict) else {}, "str", required=False, label="requested_rewrite.target_true.str"
    )
    paraphrases = _strings(chk, rec, "paraphrase_prompts")
    neighborhood = (
        tuple(Neighbor(p, target_true) for p in _strings(chk, rec, "neighborhood_prompts"))
        if target_true
        else ()
    )
    rid = _record_id(chk, rec, "case_id", str(chk.index))
    return _finish(chk, prompt, subject, target_new, target_true, paraphrases, neighborhood, rid)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory (expected a .jsonl or .json file)")
    try:
        return path.read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) is not an error
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from exc


def load_requests(
    path: Path | str, limit: int | None = None, offset: int = 0, merge: bool = False
) -> list[EditRequest]:
    """Load and validate edit requests from JSONL (ours) or JSON (CounterFact/EasyEdit, ROME, or zsRE in MEND's
    layout).

    `offset` skips that many records, `limit` (None: all) keeps at most that many after it. `merge` (files to
    edit with; a fact file may ask twice): `merge_duplicates` the requests.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"--limit: expected a positive integer, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise UsageError(f"offset: expected a non-negative integer, got {offset!r}")
    path = Path(path)
    text = _read_text(path)
    problems: list[InputProblem] = []
    requests: list[EditRequest] = []
    where: list[_Checker] = []  # where each accepted request came from (for duplicate-id reports)
    skipped: list[int] = []  # zsRE records without a new answer
    name = str(path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputFileError(
                [InputProblem(name, exc.lineno, None, f"malformed JSON: {exc.msg} (column {exc.colno})")]
            ) from exc
        if not isinstance(data, list):
            raise InputFileError(
                [InputProblem(name, None, None, f"expected a JSON array of records, got {_json_kind(data)}")]
            )
        stop = None if limit is None else offset + limit
        for i, rec in enumerate(data[offset:stop], start=offset):
            chk = _Checker(name, i, "record", problems)
            if not isinstance(rec, dict):
                chk.bad(None, f"expected an object, got {_json_kind(rec)}")
                continue
            if _lone_surrogate(chk, rec):
                continue
            if "requested_rewrite" in rec:
                req = parse_rome_record(rec, chk)
            elif "src" in rec and "alt" in rec:
                if isinstance(rec["alt"], str) and not rec["alt"].strip():
                    skipped.append(i)
                    continue
                req = parse_zsre_record(rec, chk)
            elif "ground_truth" in rec or "rephrase_prompt" in rec or "locality_prompt" in rec:
                req = parse_easyedit_record(rec, chk)
            else:
                req = parse_jsonl_record(rec, chk, str(i))
            if req is not None:
                requests.append(replace(req, where=f"{name}: record {i}"))
                where.append(chk)
    else:
        seen = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            seen += 1
            if seen <= offset:
                continue
            if limit is not None and seen > offset + limit:
                break
            chk = _Checker(name, lineno, "line", problems)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                chk.bad(None, f"malformed JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(rec, dict):
                chk.bad(None, f"expected a JSON object, got {_json_kind(rec)}")
                continue
            if _lone_surrogate(chk, rec):
                continue
            req = parse_jsonl_record(rec, chk, str(lineno))
            if req is not None:
                requests.append(replace(req, where=f"{name}:{lineno}"))
                where.append(chk)
    if merge and not problems:
        kept = {id(r) for r in merge_duplicates(requests, name)}
        where = [c for r, c in zip(requests, where) if id(r) in kept]
        requests = [r for r in requests if id(r) in kept]
    first_seen: dict[str, _Checker] = {}
    for req, chk in zip(requests, where):
        if req.id in first_seen:
            prev = first_seen[req.id]
            prev_where = f"line {prev.index}" if prev.kind == "line" else f"record {prev.index}"
            chk.bad(
                chk.id_field, f"duplicate id '{req.id}' (first used at {prev_where}; expected unique ids)"
            )
        else:
            first_seen[req.id] = chk
    if problems:
        problems.sort(key=lambda p: p.line if p.line is not None else -1)
        raise InputFileError(problems)
    if skipped:
        log.warning(
            "%s: skipped %d zsRE record(s) with an empty new answer ('alt'): record(s) %s",
            path,
            len(skipped),
            ", ".join(map(str, skipped)),
        )
    if not requests:
        raise UsageError(f"{path}: no edit requests found")
    return requests


def fact_key(r: EditRequest) -> tuple[str, str]:
    """What makes two requests the same fact: the subject and the prompt about it."""
    return (r.subject.strip(), r.prompt.strip())


def _place(r: EditRequest, index: int, source: str) -> str:
    return r.where or f"{source}: request {index}"


def merge_duplicates(requests: list[EditRequest], source: str) -> list[EditRequest]:
    """The requests with exact repeats (the same subject, prompt and target) merged into the first, with a
    one-line warning; the same subject and prompt with another target is an error naming both places."""
    first: dict[tuple[str, str], int] = {}
    out: list[EditRequest] = []
    problems: list[InputProblem] = []
    merged: list[str] = []
    for i, r in enumerate(requests):
        j = first.setdefault(fact_key(r), i)
        if j == i:
            out.append(r)
            continue
        prev = requests[j]
        if prev.target_new.strip() == r.target_new.strip():
            merged.append(f"{_place(r, i, source)} repeats {_place(prev, j, source)}")
            continue
        problems.append(
            InputProblem(
                _place(r, i, source),
                None,
                "target_new",
                f"'{r.target_new}' conflicts with '{prev.target_new}' at {_place(prev, j, source)} for the same "
                f"subject '{r.subject}' and prompt '{r.prompt}' (expected one target per fact)",
            )
        )
    if problems:
        raise InputFileError(problems)
    if merged:
        warnings.warn(f"merged {len(merged)} exact duplicate request(s): {first_few(merged)}", stacklevel=2)
    return out


def _json_kind(value) -> str:
    """JSON's name for a parsed value's type (what the user wrote, not Python's name)."""
    if value is None:
        return "null"
    for kind, name in (
        (bool, "true/false"),
        (str, "a string"),
        (int, "a number"),
        (float, "a number"),
        (list, "an array"),
        (dict, "an object"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def dump_jsonl(requests: list[EditRequest]) -> str:
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in requests)
