"""Errors that the CLI turns into one-paragraph messages and exit codes.

Kept free of torch so that the CLI can report usage problems without importing it.
"""

from __future__ import annotations


class CpInspectError(Exception):
    """Base class of every error cpinspect raises on purpose."""

    exit_code = 2


class InputError(CpInspectError):
    """The user's batch, file or option is malformed: exit 2 with what, where and the fix.

    ``what`` says what is wrong (with the numbers), ``where`` names the place (file, key,
    segment, rank, chunk) and ``fix`` the likely remedy. The three parts form one paragraph.
    """

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        parts = [self.what.rstrip(".") + "."]
        if self.where:
            parts.append(f"Where: {self.where.rstrip('.')}.")
        if self.fix:
            parts.append(f"Fix: {self.fix.rstrip('.')}.")
        return " ".join(parts)
