"""Commands whose modes are sub-commands (``stainmil synth patches|slides|serial``, ``stainmil bench
training|scale|feed``), and the route that keeps their old one-command spellings working for a release.

An old call names no mode (``stainmil synth patches --out c --section-mm 8``); :func:`mode_group` gives the command a
click group that asks the command's *route* which mode those arguments meant and how they are spelled there,
prints the one deprecation line and runs the mode.
"""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Callable, Sequence

import typer
from typer.core import TyperGroup

# old arguments -> (mode, the same arguments as that mode spells them)
Route = Callable[[list[str]], tuple[str, list[str]]]
HELP_FLAGS = ("--help", "-h")


def mode_group(name: str, route: Route, notice: Callable[[str, str], None]) -> type[TyperGroup]:
    """A click group class for ``stainmil <name>`` whose calls without a mode go where ``route`` sends them;
    ``notice(old, new)`` prints the deprecation line."""

    class ModeGroup(TyperGroup):
        def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
            old = args[0] not in self.commands and args[0] not in HELP_FLAGS if args else not self.no_args_is_help
            if old:  # no mode named: an old call (with no_args_is_help off, no arguments at all is one too)
                mode, spelled = route(list(args))
                if args and spelled[:1] == args[:1] and not args[0].startswith("-"):
                    refuse(f"'{args[0]}' is not a mode of stainmil {name}; choose one of {', '.join(self.commands)}.")
                spelled, dropped = self.only_options_of(mode, spelled)
                new = shlex.join(["stainmil", name, mode, *spelled])
                if dropped:  # the one command took every mode's options and ignored the others'
                    new += f" (without {shlex.join(dropped)}: {mode} has no such options)"
                notice(shlex.join(["stainmil", name, *args]), new)
                args = [mode, *spelled]
            return super().parse_args(ctx, args)

        def only_options_of(self, mode: str, args: list[str]) -> tuple[list[str], list[str]]:
            """(``args`` without the options of this group's other modes that ``mode`` does not take, those)."""
            own = {opt for param in self.commands[mode].params for opt in param.opts}
            others = {opt: not param.is_flag for command in self.commands.values() for param in command.params
                      for opt in param.opts if opt.startswith("--") and opt not in own}
            return split_options(args, others)

    return ModeGroup


def refuse(sentence: str) -> None:
    """A call no mode can take: one sentence on stderr, exit status 2 (as a usage error)."""
    typer.echo(f"error: {sentence}", err=True)
    raise typer.Exit(2)


def option_given(args: Sequence[str], flag: str) -> bool:
    """``--flag`` or ``--flag=value`` among ``args``."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def split_options(args: list[str], flags: dict[str, bool]) -> tuple[list[str], list[str]]:
    """(``args`` without the options ``flags`` names, those options): ``flags`` maps each to whether it takes a
    value (``--flag value`` or ``--flag=value``)."""
    kept, taken, skip = [], [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in flags:
            skip = flags[flag] and "=" not in arg and i + 1 < len(args)
            taken += [arg, args[i + 1]] if skip else [arg]
        else:
            kept.append(arg)
    return kept, taken


def drop_option(args: list[str], flag: str, takes_value: bool) -> list[str]:
    """``args`` without ``flag`` (and its value)."""
    return split_options(args, {flag: takes_value})[0]


def rename_option(args: list[str], old: str, new: str) -> list[str]:
    """``args`` with ``old`` spelled ``new`` (both ``--old v`` and ``--old=v``)."""
    return [new if a == old else new + a[len(old):] if a.startswith(old + "=") else a for a in args]


def without_parameter(fn: Callable, name: str, value) -> Callable:
    """``fn`` as a command without its parameter ``name``, which is always ``value`` (one body for two modes
    that differ by one option)."""
    signature = inspect.signature(fn, eval_str=True)

    def command(**kwargs):
        return fn(**kwargs, **{name: value})

    kept = [p for p in signature.parameters.values() if p.name != name]
    command.__signature__ = signature.replace(parameters=kept)
    command.__annotations__ = {p.name: p.annotation for p in kept}  # evaluated: this module's names differ
    command.__doc__, command.__module__, command.__name__ = fn.__doc__, fn.__module__, fn.__name__
    return command
