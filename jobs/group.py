"""The `refbank` command group: gives every command `--config FILE` and the exit-status table in its help, and
sends every failure of every command (usage errors, bank and storage errors, Ctrl-C) through the one mapping in
jobs.errors."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import typer
from typer.core import TyperGroup

from jobs.config_files import config_option
from jobs.errors import EXIT_STATUS_HELP, USAGE, report


class RefbankGroup(TyperGroup):
    """A TyperGroup whose commands all read `--config` and whose failures are one line (or a JSON object)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            command.params.append(config_option())
            command.epilog = command.epilog or EXIT_STATUS_HELP
        self._argv: list[str] = []

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Run the command line; exit with its status (or return it when not standalone)."""
        self._argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(self._argv, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # before a command runs: no such command, no arguments at all
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()
                code = USAGE
            else:
                code = self._fail(exc)
        if standalone_mode:
            sys.exit(code or 0)
        return code

    def invoke(self, ctx: typer.Context) -> Any:
        """Run the subcommand; whatever it raises (but an exit status it chose) becomes one line and a status."""
        try:
            return super().invoke(ctx)
        except typer.Exit:
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure is answered by jobs.errors
            raise typer.Exit(self._fail(exc)) from None

    def _fail(self, exc: BaseException) -> int:
        # The words of the command line, not the parsed options: a usage error comes before any parsing.
        return report(exc, as_json="--json" in self._argv, verbose="-v" in self._argv or "--verbose" in self._argv)
