"""The `kiln` commands, and the flags the docs (README.md, BENCHMARKS.md, docs/*.md) use with each, for
the tests that check every verb offers and explains them."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from kiln.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _commands(command=None, path: tuple[str, ...] = ()):
    """(path, command) of every `kiln` command that runs something (groups are walked)."""
    command = command or typer.main.get_command(app)
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


COMMANDS = dict(_commands())
# Flags a verb must offer beyond what the docs show (added by an issue before the docs use them).
REQUIRED_FLAGS = {("train",): {"--kernels"}}


def documented_flags() -> dict[tuple[str, ...], set[str]]:
    """The flags README.md, BENCHMARKS.md and docs/*.md write after each `kiln <verb>`."""
    found: dict[tuple[str, ...], set[str]] = {path: set() for path in COMMANDS}
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    for line in (line for page in pages for line in page.read_text().splitlines()):
        # a command runs to the end of its code span, table cell or line, or to the next `kiln `
        for match in re.finditer(r"(?<![\w.-])kiln ((?:[a-z]+ ?)+)((?:(?!kiln )[^`|])*)", line):
            words = tuple(match.group(1).split())
            paths = [words[:n] for n in range(len(words), 0, -1) if words[:n] in COMMANDS]
            if paths:
                found[paths[0]] |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", match.group(2)))
    return found


DOCUMENTED = documented_flags()
