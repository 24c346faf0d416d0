"""The `agent-vm` command group: one-line usage errors, Ctrl-C as shells expect, and
command families imported only when one of their commands runs.

This module imports nothing but click: `agent-vm --help` and the start-up of
every command before its first RPC pay only for what that command uses
(docs/BENCHMARKS.md, "What the user feels").
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import click

# The exit status of a command ended by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"agent-vm: error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """A usage error (bad option value, unknown command) as one line, exit 2."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # the help text itself
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "agent-vm"
        fail(f"{exc.format_message()} (see `{where} --help`)")


class Group(click.Group):
    """The `agent-vm` group: usage errors anywhere below it are one line."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with one_line_usage_errors():
                return super().invoke(ctx)
        except KeyboardInterrupt:
            # Ctrl-C: every `finally` below has run (a `vm run` VM is destroyed, a
            # one-shot run's call cancelled, which ends its sandbox); exit as shells expect.
            click.echo("agent-vm: interrupted", err=True)
            sys.exit(INTERRUPTED)


class LazyGroup(Group):
    """A group whose commands are ``"module:attribute"`` names, imported when run.

    ``lazy`` maps each command's name to its location and the first line of
    its help, which `--help` lists without importing anything
    (tests/unit/test_cli_conventions.py checks that line against the command's).
    """

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, _, attr = self.lazy[cmd_name][0].partition(":")
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module}:{attr} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click lists commands, with the lazy ones' lines from ``lazy``."""
        names = [
            n
            for n in self.list_commands(ctx)
            if n not in self.commands or not self.commands[n].hidden
        ]
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            if name in self.commands:
                line = self.commands[name].get_short_help_str(limit)
            else:
                # The line click would make of that help (a bare stand-in command).
                line = click.Command(name, help=self.lazy[name][1]).get_short_help_str(limit)
            rows.append((name, line))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
