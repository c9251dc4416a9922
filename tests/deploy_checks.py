"""Checks the deployment tests share: a container's command line is a real `baton` command line, and
the environment it gets names only settings that command reads."""

from __future__ import annotations

import contextlib
import io

from baton.services import settings_table
from baton.services.cli import build_parser


def command_problem(argv: list[str]) -> str | None:
    """None if `argv` (a container's entrypoint + command, e.g. ["baton", "router", "--host", "0.0.0.0"])
    parses as a `baton` command line; otherwise what is wrong with it."""
    if not argv or argv[0] != "baton":
        return f"{argv!r} does not run `baton`"
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            build_parser().parse_args(argv[1:])
    except SystemExit:
        return f"{argv!r}: {complaint.getvalue().strip().splitlines()[-1]}"
    return None


def command_of(argv: list[str]) -> str:
    """The (sub)command an argv runs, as settings_table names it: `router`, `registry check`."""
    words = []
    for word in argv[1:]:
        if word.startswith("-"):
            break
        words.append(word)
    names = {name for name, _ in settings_table.commands(build_parser())}
    while words and " ".join(words) not in names:
        words.pop()
    return " ".join(words)


def environment_problems(argv: list[str], names: set[str]) -> list[str]:
    """The variables in `names` that the command `argv` runs does not read (every one must be a
    BATON_* setting of that command)."""
    command = command_of(argv)
    known = settings_table.variables_of(build_parser(), command)
    where = command or repr(argv)
    return [f"{where}: {name} is not one of its settings" for name in sorted(names - known)]
