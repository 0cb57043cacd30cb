"""What the launchers share: splitting `LAUNCHER ARGS -- COMMAND ...` (the scripts run standalone, from this folder)."""

from __future__ import annotations

import sys


def split_command(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(launcher arguments, the command after '--')."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
