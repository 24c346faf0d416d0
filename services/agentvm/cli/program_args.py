"""Commands that run a program (`run`, `vm run`, `vm exec`): our options, then the program's.

Every option-looking word before ``--`` is one of ours; a word we do not
know is an error (exit 2, with click's suggestion), never a program
argument: a mistyped ``--timout`` must not run the program without its
limit. The program's own options go after ``--``.
"""

from __future__ import annotations

import difflib
from typing import Any

import click

# `-h` as well as `--help` (a program's `-h` goes after `--` like its other options).
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


class ProgramCommand(click.Command):
    """A command whose trailing arguments are a program's: unknown options are errors."""

    def __init__(self, *args: Any, example: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", {}).update(HELP_OPTIONS)
        super().__init__(*args, **kwargs)
        # How the program's own options are given, for the error message.
        self.example = example

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            msg = f"no such option {exc.option_name}"
            best = difflib.get_close_matches(exc.option_name, exc.possibilities or [], 1, 0)
            if best:
                msg += f"; did you mean {best[0]}?"
            hint = f", e.g. {self.example}" if self.example else ""
            raise click.UsageError(
                f"{msg} (a program's own options go after `--`{hint})", ctx
            ) from None
