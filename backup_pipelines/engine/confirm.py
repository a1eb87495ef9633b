"""Explicit confirmation for operations that replace or change a database (restore, rollback)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from backup_pipelines.engine.errors import RefusedError


class ConfirmationError(RefusedError):
    """The operator did not confirm (or confirmed the wrong target): nothing was touched."""


def require_confirmation(
    target: str,
    given: str | None,
    *,
    action: str,
    prompt: Callable[[str], str] | None = None,
) -> None:
    """Pass only when ``given`` (or, interactively, what the operator types) equals ``target``.

    Scripts pass ``--confirm <target>``; a person at a terminal is asked to type the name.
    """
    if given is None and prompt is None and sys.stdin is not None and sys.stdin.isatty():
        prompt = input
    if given is None and prompt is not None:
        given = prompt(f"This will {action}. Type the target name ({target}) to continue: ").strip()
    if given is None:
        raise ConfirmationError(
            f"refusing to {action} without confirmation; nothing was touched",
            hint=f"pass --confirm {target} (or set confirm: {target} in the Dagster run config)",
        )
    if given != target:
        raise ConfirmationError(
            f"confirmation {given!r} does not match the target {target!r}; nothing was touched",
            hint=f"confirm with the exact target name: {target}",
        )
