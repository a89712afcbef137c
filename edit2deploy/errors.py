"""Error types. A `UsageError` is the user's to fix: the CLI prints its one line and exits 2."""

from __future__ import annotations

from dataclasses import dataclass


class Edit2DeployError(Exception):
    """Base class for errors raised on purpose by edit2deploy."""


class UsageError(Edit2DeployError):
    """A mistake in what the user asked for (bad path, bad file, bad option). Exit code 2."""

    exit_code = 2


@dataclass
class InputProblem:
    """One problem in an input file: where it is, which field, what was expected."""

    file: str
    line: int | None  # 1-based line (JSONL) or record index (JSON arrays, reported as "record N")
    field: str | None
    message: str
    record_kind: str = "line"

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}" if self.record_kind == "line" else f": record {self.line}"
        if self.field:
            where += f": field '{self.field}'"
        return f"{where}: {self.message}"


class InputFileError(UsageError):
    """An input file has one or more problems; all of them are listed."""

    def __init__(self, problems: list[InputProblem]):
        self.problems = problems
        head = str(problems[0])
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(head + more)

    def report(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class NonFiniteUpdateError(Edit2DeployError):
    """A batch's solve produced NaN/Inf; nothing was applied."""


def first_few(items: list[str], shown: int = 3) -> str:
    """ "a; b; c (and 4 more)": a one-line list for a warning."""
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more
