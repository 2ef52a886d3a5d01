"""Bad input handling: one policy (``skip`` or ``fail``) and one log of what was skipped and why.

Real plate folders are messy (stray files, truncated images, a site missing a channel, unreadable
metadata rows). Every such case goes through :class:`ProblemLog.report`: with ``on_error="fail"`` it
raises :class:`BadInputError` naming the file; with ``on_error="skip"`` it records a counted skip
that ends up in the shard manifest and in the command's closing summary. Nothing is dropped silently.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

ON_ERROR_CHOICES = ("skip", "fail")

# A path or field id inside a reason ("cannot read image plate/A01_s1_w1.png: ..."): masked when tallying.
_PATH_IN_REASON = re.compile(r"[^\s'\"]*/[^\s'\":;,)]*")


class BadInputError(ValueError):
    """An input file, field of view or metadata row that cannot be used as it is.

    Args:
        message: what is wrong, naming the input, and what to do.
        file: the offending file when it is known (the skip's ``file`` in the manifest).
    """

    def __init__(self, message: str, file: str = "") -> None:
        super().__init__(message)
        self.file = str(file)


@dataclass
class Problem:
    """One skipped input: what (``file`` and/or ``field``), why (``reason``) and when (``stage``)."""

    reason: str
    file: str = ""
    field: str = ""
    stage: str = ""  # "discover" | "read" | "metadata"

    def message(self) -> str:
        where = ", ".join(
            part
            for part in (f"file {self.file}" if self.file else "", f"field {self.field}" if self.field else "")
            if part
        )
        return f"{self.reason} ({where})" if where else self.reason


@dataclass
class ProblemLog:
    """Applies the ``on_error`` policy and keeps the skips.

    Args:
        on_error: ``"skip"`` records the problem and carries on; ``"fail"`` raises ``BadInputError``.
    """

    on_error: str = "skip"
    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error={self.on_error!r} is not one of {ON_ERROR_CHOICES}; use 'skip' or 'fail'.")

    def report(self, reason: str, *, file: str = "", field: str = "", stage: str = "") -> None:
        """Raise (policy ``fail``) or record a counted skip (policy ``skip``)."""
        problem = Problem(reason=reason, file=str(file), field=field, stage=stage)
        if self.on_error == "fail":
            raise BadInputError(
                problem.message() + " [re-run with on_error='skip' (--on-error skip) to skip and count such inputs]"
            )
        self.problems.append(problem)

    def extend(self, problems: list[Problem] | list[dict]) -> None:
        self.problems.extend(p if isinstance(p, Problem) else Problem(**p) for p in problems)

    def as_dicts(self) -> list[dict]:
        return [asdict(problem) for problem in self.problems]

    def __len__(self) -> int:
        return len(self.problems)

    def skipped_fields(self) -> list[Problem]:
        """The skips that cost a field of view (they name it); stray files and metadata rows cost none."""
        return [problem for problem in self.problems if problem.field]

    def tally(self, problems: list[Problem] | None = None, top: int = 5) -> str:
        """``"3 x cannot read image <path>: ...; 1 x ..."``: count per reason (paths masked), most common first."""
        problems = self.problems if problems is None else problems
        counts = Counter(" ".join(_PATH_IN_REASON.sub("<path>", problem.reason).split()) for problem in problems)
        text = "; ".join(f"{count} x {reason}" for reason, count in counts.most_common(top))
        return text + (f"; and {len(counts) - top} other reason(s)" if len(counts) > top else "")

    def summary(self) -> str:
        """One line per stage with counts, then the first few messages; '' when nothing was skipped."""
        if not self.problems:
            return ""
        counts = Counter(problem.stage or "other" for problem in self.problems)
        lines = [
            f"skipped {len(self.problems)} input(s): " + ", ".join(f"{n} at {stage}" for stage, n in counts.items())
        ]
        lines += [f"  - {problem.message()}" for problem in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more (all listed in manifest.json under 'skipped')")
        return "\n".join(lines)
