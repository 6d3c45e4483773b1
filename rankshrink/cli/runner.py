"""What every command runs inside: consoles, the error and interrupt boundary, progress display.

:func:`errors` turns the project's error types into one red line and an exit code (2 bad input,
3 gate failed, 130/143 interrupted) and says what, if anything, was written before a signal
arrived. :class:`Command` reports bad flags and arguments in one line as well, so every bad input
looks the same (SPEC §6).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from rankshrink.errors import RankshrinkError
from rankshrink.train.rare_config import StepStats

# click's UsageError (typer vendors click and exports only this subclass of it)
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]


class _OneLineUsageError(_UsageError):  # type: ignore[misc,valid-type]
    """A usage error shown as one line, like every other bad input (SPEC §6), not click's
    four-line usage block."""

    def show(self, file: Any = None) -> None:
        ctx = getattr(self, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"error: {self.format_message()}{hint}", err=True)


class Command(TyperCommand):
    """A command whose bad flags and arguments are reported in one line (exit 2)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # help was asked for, in effect
                raise
            raise _OneLineUsageError(exc.format_message(), ctx) from None  # type: ignore[attr-defined]


def stdout_console(quiet: bool = False) -> Console:
    """The console for results (stdout)."""
    return Console(quiet=quiet, highlight=False, width=width())


def stderr_console() -> Console:
    """The console for errors and interrupts (stderr)."""
    return Console(stderr=True, highlight=False, width=width())


def width() -> int | None:
    """A terminal's own width; off a terminal (a pipe, a CI log) the width the tables are laid
    out for, where rich would otherwise assume 80 columns."""
    from rankshrink.cli.grid import WIDTH

    return None if sys.stdout.isatty() else WIDTH


class _Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way up (the exporters have many) turns it into an ordinary failure."""


@dataclass
class _Run:
    """What a command has done so far, for an honest message when it is interrupted."""

    written: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def errors(console: Console) -> Iterator[_Run]:
    """Map the project's errors and interrupts to one line and an exit code."""
    previous = signal.getsignal(signal.SIGTERM)
    previous_int = signal.getsignal(signal.SIGINT)
    run = _Run()

    def on_term(_signum: int, _frame: Any) -> None:
        _PENDING.append(_Terminated)
        raise _Terminated()

    def on_int(_signum: int, _frame: Any) -> None:
        _PENDING.append(KeyboardInterrupt)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if previous_int is signal.default_int_handler:  # not when SIGINT is ignored (background jobs)
        signal.signal(signal.SIGINT, on_int)
    try:
        yield run
    except RankshrinkError as exc:
        # the message quotes user paths, which may contain [markup]
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _forget_unhandled_interrupt()
        console.print(f"[red]interrupted[/red]: {_stopped(run)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except _Terminated:
        console.print(f"[red]terminated[/red]: {_stopped(run)}", highlight=False, soft_wrap=True)
        raise typer.Exit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        _PENDING.clear()


def _forget_unhandled_interrupt() -> None:
    """Clear CPython's "KeyboardInterrupt went unhandled" flag, so that exit 130 stays 130.

    When Ctrl-C lands inside an ``exec`` of a string (dataclasses and namedtuples build their
    methods that way, so any lazy import can be in one), CPython sets that flag as the exception
    leaves the ``exec``, and never clears it when we catch the exception further up. Under
    ``python -m`` the interpreter checks the flag after a normal ``sys.exit`` and kills itself
    with SIGINT, so the caller saw "killed by signal 2" in place of our exit code. Every ``exec``
    of a string resets the flag first; an empty one does nothing else.
    """
    exec("")  # a constant empty string, run only for its side effect above


#: Signals already raised as exceptions. Python runs a handler wherever the main thread happens
#: to be; when that is a weakref or import-lock callback, the exception is printed and dropped
#: ("Exception ignored in ...") and the run would go on. Every training step and every stage
#: change re-raises a pending one (:func:`_raise_pending`).
_PENDING: list[type[BaseException]] = []


def _raise_pending(*_args: Any) -> None:
    if _PENDING:
        raise _PENDING[0]()


def _checked(callback: Callable[..., None] | None) -> Callable[..., None]:
    """``callback`` (or nothing) after re-raising a signal some callback swallowed."""

    def call(*args: Any) -> None:
        _raise_pending()
        if callback is not None:
            callback(*args)

    return call


def _stopped(run: _Run) -> str:
    if not run.written:
        return "stopped cleanly, nothing was written"
    # The signal came while the outputs were being renamed into place; that step is held back
    # from interrupts (see outputs.signals_deferred), so they are complete.
    names = ", ".join(escape(str(p)) for p in run.written)
    return f"stopped after writing {names} (complete)"


def run_with_progress(
    console: Console, quiet: bool, fn: Callable[..., Any], steps: int, stages: bool = False
) -> Any:
    """``fn(progress, stage)``, its callbacks shown on ``console`` (a bar on a terminal, a line
    every 10% off one) and re-raising any signal a callback swallowed."""

    def run(progress: Callable[..., None] | None, stage: Callable[[str], None]) -> Any:
        return fn(_checked(progress), _checked(stage))

    return _show_progress(console, quiet, run, steps, stages)


def _show_progress(
    console: Console, quiet: bool, fn: Callable[..., Any], steps: int, stages: bool
) -> Any:
    if quiet and stages:  # no per-step progress, but say which phase is running
        return fn(None, lambda msg: console.print(f"[dim]{msg}…[/dim]"))
    if quiet or (not console.is_terminal and not console.file.isatty()):
        last = [0]

        def plain(stats: StepStats) -> None:  # one line every 10% when not on a terminal
            from rankshrink.cli.render_compress import progress_line

            if (not quiet and stats.step >= last[0] + max(1, steps // 10)) or stats.step == steps:
                last[0] = stats.step
                console.print(progress_line(stats))

        return fn(plain, lambda msg: console.print(f"[dim]{msg}…[/dim]"))
    from rankshrink.cli.render_compress import progress_fields, training_progress

    with training_progress(console) as bar:
        task = bar.add_task("fine-tuning", total=steps, loss=0.0, size=1.0, fusions=0)

        def update(stats: StepStats) -> None:
            bar.update(task, completed=stats.step, **progress_fields(stats))

        return fn(update, lambda msg: console.print(f"[dim]{msg}…[/dim]"))
