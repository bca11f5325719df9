"""`agentwatch policy lint`: every problem of every file, one line each.

Lint is load's validator (``policy.check``) with nothing added: what lint
accepts, ``load`` accepts, and the other way round. Errors fail the lint;
warnings (shadowed rules, W^X, dead entries) fail it only with strict.
"""
from dataclasses import dataclass, field

from . import check


@dataclass
class LintResult:
    problems: list = field(default_factory=list)     # [Problem], in file order, no repeats
    files: int = 0

    @property
    def errors(self):
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self):
        return sum(p.severity == "warning" for p in self.problems)

    def exit_code(self, strict=False):
        """1 on any error (or, with strict, any warning), else 0."""
        return 1 if self.errors or (strict and self.warnings) else 0

    def lines(self):
        return [str(p) for p in self.problems]

    def summary(self):
        files = f"{self.files} file{'s' if self.files != 1 else ''}"
        return f"{files}: {self.errors} error{'s' if self.errors != 1 else ''}, " \
               f"{self.warnings} warning{'s' if self.warnings != 1 else ''}"


def lint(paths):
    """Check each file (and the bases it extends). A problem in a base shared
    by several files is reported once."""
    result, seen = LintResult(), set()
    for path in paths:
        result.files += 1
        for problem in check(path)[1]:
            if str(problem) not in seen:
                seen.add(str(problem))
                result.problems.append(problem)
    return result
