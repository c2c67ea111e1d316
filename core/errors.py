"""One exception root whose subclasses carry the process exit code: the table in the README.

| code | class | meaning |
| --- | --- | --- |
| 0 | - | all done |
| 1 | - | a bug: an unexpected error (its traceback is printed) |
| 2 | BadInput | a config, flag or file that cannot be used; the message names it |
| 3 | BudgetStop | the next phase or request would pass the budget cap; finished work is kept |
| 4 | ItemsFailed | the command ran to the end but left items undone (counted by reason); a rerun resumes |
| 5 | MissingInput | a model, adapter or data file that must exist first |
| 6 | DeadEnd | a stage kept nothing to train on, and nothing can be carried forward |
| 7 | Unreachable | no judge endpoint is left (refused connections, or 401/403/404); finished items are kept |

The CLI turns any `CaiError` into one red line and its code (bootstrap.py); library callers catch the
class they can handle. Click's own usage errors also exit 2.
"""

from __future__ import annotations

from typing import ClassVar


class CaiError(Exception):
    """Root of the project's expected errors: the message says what and where, `exit_code` how to exit."""

    exit_code: ClassVar[int] = 1


class BadInput(CaiError, ValueError):
    exit_code = 2


class BudgetStop(CaiError, RuntimeError):
    exit_code = 3


class ItemsFailed(CaiError, RuntimeError):
    exit_code = 4


class MissingInput(CaiError, FileNotFoundError):
    exit_code = 5


class DeadEnd(CaiError, RuntimeError):
    exit_code = 6


class Unreachable(CaiError, RuntimeError):
    exit_code = 7


def field_errors(e) -> str:
    """`field.sub: message; ...` for a pydantic ValidationError, so the user sees which key is wrong."""
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or '(top)'}: {x['msg']}" for x in e.errors())


EXIT_CODES: dict[int, str] = {0: "all done", 1: "unexpected error (a bug)"} | {
    c.exit_code: c.__name__ for c in (BadInput, BudgetStop, ItemsFailed, MissingInput, DeadEnd, Unreachable)
}
