"""What every lavie-jax command shares: one argparse parser style, the flags all of them take, flag files, and one
way of reporting failures.

    parser = command.make_parser("lavie-train", __doc__)          # description: the first paragraph; epilog: the rest
    command.add_common_flags(parser, cache_default="WORKDIR/cache/jax")
    return command.run_main("lavie-train", argv, lambda: run(argv), user_errors=(...))

Flags of every command: `--traceback`, `--flagfile FILE` (more flags from a file, one per line; blank lines and
`#` comments skipped; config overrides too), `--compile-cache DIR` and `--no-compile-cache`
(lavie_jax.runtime.compile_cache). Booleans are `--flag` / `--no-flag` (absl's `--noflag` and `--flag=true|false`
are accepted too, so older flag files keep working). Abbreviated flags are refused: `--over` is not `--overwrite`.

Failures (stderr, one paragraph each; `--traceback` adds the traceback first, even when parsing fails):
  PROG: error: WHAT IS WRONG AND THE FIX    bad input, exit status 2 (before any work where it can be checked)
  PROG: interrupted (Ctrl-C); ...           Ctrl-C 130, SIGTERM 143
  PROG: error: ... (--traceback shows where)  the machine failed (an OSError: disk full, a vanished path), 1
  PROG: unexpected error: TYPE: MESSAGE (a bug if the inputs are fine: ...)   anything else, 1
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ContextManager, NoReturn

from lavie_jax.runtime import compile_cache

INTERRUPT_STATUS = 130  # 128 + SIGINT, what shells report for Ctrl-C
TERMINATE_STATUS = 143  # 128 + SIGTERM
USAGE_STATUS = 2
_TRUE, _FALSE = ("true", "t", "yes", "y", "1"), ("false", "f", "no", "n", "0")
_HELP = ("-h", "--help")


class UsageError(ValueError):
    """A bad command line; the message names the flag, what is wrong and the fix."""


# ------------------------------------------------------------------------------------------------ parser


class BooleanFlag(argparse.Action):
    """`--NAME` sets True, `--no-NAME` (and absl's `--noNAME`, not shown in --help) False."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: bool = False, help: str | None = None):
        name = option_strings[0].removeprefix("--")
        if name.startswith("no"):
            raise ValueError(f"boolean flag --{name}: a name starting with 'no' reads as its own negation")
        super().__init__([f"--{name}", f"--no-{name}", f"--no{name}"], dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings[:2])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Docstring layout kept as written; flag help wrapped at spaces only (not inside `lavie-train` or a path);
    a boolean shows as `--flag, --no-flag`."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BooleanFlag):
            return ", ".join(action.option_strings[:2])
        return super()._format_action_invocation(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with this project's conventions: a bad command line raises UsageError (one paragraph, ending in
    'see PROG --help') instead of printing the usage block and exiting; flag files are read; absl-style boolean
    values are taken; an unknown flag gets a did-you-mean; abbreviations are refused."""

    def __init__(self, *args: Any, positional_hint: str = "", **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.positional_hint = positional_hint  # said after 'every value needs its flag' for a stray value

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(_boolean_values(expand_flagfiles(args), self._booleans()), namespace)

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unexpected(extras))
        return parsed

    def _booleans(self) -> list[BooleanFlag]:
        return [a for a in self._actions if isinstance(a, BooleanFlag)]

    def _options(self) -> list[str]:
        """Every long flag of this parser and of its subcommands (for did-you-mean)."""
        names = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                names += [n for sub in action.choices.values() for n in sub._options()]
        return names

    def _unexpected(self, extras: list[str]) -> str:
        first = extras[0]
        if first.startswith("-") and first != "-":
            flag = first.split("=", 1)[0]
            close = difflib.get_close_matches(flag, sorted(set(self._options())), n=1, cutoff=0.6)
            return f"unrecognized arguments: {' '.join(extras)}" + (f"; did you mean {close[0]}?" if close else "")
        return (f"unexpected argument {first!r}: every value needs its flag{self.positional_hint}; quote values that "
                "contain spaces")


def make_parser(prog: str, doc: str, *, positional_hint: str = "", **kwargs: Any) -> ArgumentParser:
    """A parser whose --help shows the first paragraph of `doc` (a module docstring) above the flags and the rest
    of it below them, as written."""
    head, _, rest = (doc or "").strip().partition("\n\n")
    return ArgumentParser(prog=prog, description=head, epilog=rest or None, positional_hint=positional_hint,
                          **kwargs)


def add_common_flags(parser: argparse.ArgumentParser, *, cache_default: str | None,
                     in_subcommand: bool = False) -> None:
    """`--traceback`, `--flagfile`, and (when the command compiles: `cache_default` names its default directory)
    `--compile-cache DIR` / `--no-compile-cache`. `in_subcommand`: the flags of a subcommand's parser whose parent
    has them too (no defaults there, so a value given before the subcommand is kept)."""
    suppress = {"default": argparse.SUPPRESS} if in_subcommand else {}
    group = parser.add_argument_group("flags of every lavie-jax command")
    group.add_argument("--traceback", action=BooleanFlag, help="on an error, print the Python traceback too",
                       **suppress)
    group.add_argument("--flagfile", metavar="FILE", action="append",
                       help="read more flags from FILE, one per line (blank lines and # comments skipped)")
    if cache_default is None:
        return
    cache = group.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR", default=None if not in_subcommand else argparse.SUPPRESS,
                       help=f"keep compiled programs in DIR (local or gs://) so the next run starts fast (default: "
                            f"$JAX_COMPILATION_CACHE_DIR if set, else {cache_default})")
    cache.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh and keep nothing",
                       **suppress)


def cache_choice(args: argparse.Namespace, default: str | Path | None) -> compile_cache.CacheChoice:
    """The compilation cache `args` ask for (`add_common_flags`), `default` when they name none."""
    return compile_cache.choose(getattr(args, "compile_cache", None),
                                enabled=not getattr(args, "no_compile_cache", False), default=default)


def bounded_int(low: int, high: int | None = None, unit: str = "") -> Callable[[str], int]:
    """An argparse `type` for whole numbers in [low, high] (no upper bound when None); argparse names the flag in
    the error ('argument --seed: must be from 0 to 4294967295, got -1')."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number{unit}, got {text!r}") from None
        if high is None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{unit}, got {value}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}{unit}, got {value}")
        return value

    return parse


# ------------------------------------------------------------------------------------------------ argv


def expand_flagfiles(argv: Sequence[str], _seen: tuple[Path, ...] = ()) -> list[str]:
    """`argv` with every `--flagfile FILE` / `--flagfile=FILE` replaced by the flags in FILE (one argument per line,
    stripped; blank lines and lines starting with # or // skipped; nested flag files read in place). Scanning
    stops at '--'. UsageError names an unreadable or looping file."""
    out: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        if arg in ("--flagfile", "-flagfile") or arg.startswith(("--flagfile=", "-flagfile=")):
            if "=" in arg:
                path = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                i, path = i + 1, argv[i + 1]
            else:
                raise UsageError("--flagfile needs a value: a text file with one flag per line")
            out += _read_flagfile(path, _seen)
        else:
            out.append(arg)
        i += 1
    return out


def _read_flagfile(path: str, seen: tuple[Path, ...]) -> list[str]:
    resolved = Path(path).expanduser().resolve()
    if resolved in seen:
        raise UsageError(f"--flagfile {path} includes itself (through {' -> '.join(str(p) for p in seen)}); remove "
                         "the loop")
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--flagfile: Unable to open flagfile: {e}; pass a UTF-8 text file with one flag per "
                         "line") from e
    lines = [line.strip() for line in text.splitlines()]
    return expand_flagfiles([line for line in lines if line and not line.startswith(("#", "//"))],
                            seen + (resolved,))


def _boolean_values(argv: list[str], flags: Iterable[BooleanFlag]) -> list[str]:
    """absl's `--flag=true` / `--flag=false` (and 1/0, yes/no) as `--flag` / `--no-flag`."""
    names = {s: f for f in flags for s in f.option_strings}
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        if eq and name in names:
            flag = names[name]
            positive, negative = flag.option_strings[:2]
            if value.strip().lower() not in _TRUE + _FALSE:
                raise UsageError(f"{name}={value}: expected true or false (or {positive} / {negative})")
            wanted = (value.strip().lower() in _TRUE) != name.startswith("--no")
            arg = positive if wanted else negative
        out.append(arg)
    return out


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in _HELP for a in _before_dashes(argv))


def wants_traceback(argv: Sequence[str]) -> bool:
    """`--traceback` on the command line (or in a flag file), looked up before parsing so a parse error honours it
    too; the last of --traceback / --no-traceback wins."""
    try:
        argv = expand_flagfiles(argv)
    except UsageError:
        pass
    wanted = False
    for arg in _before_dashes(argv):
        name, eq, value = arg.partition("=")
        if name in ("--traceback", "-traceback"):
            wanted = not eq or value.strip().lower() in _TRUE
        elif name in ("--no-traceback", "--notraceback"):
            wanted = False
    return wanted


def _before_dashes(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    return argv[:argv.index("--")] if "--" in argv else argv


def parse_with_configs(parser: argparse.ArgumentParser, argv: Sequence[str], names: Sequence[str]):
    """(args, {name: config or None}) of a command taking stage configs (`lavie_jax.cli.config_flags`): flag files
    are read first (so they may hold config overrides), --help is answered before any config is loaded, and argv
    starts with the program name."""
    from lavie_jax.cli.config_flags import parse_config_flags

    argv = expand_flagfiles(argv)
    if wants_help(argv[1:]):
        parser.parse_args(["--help"])  # prints the help and exits 0
    configs, rest = parse_config_flags(argv, names)
    return parser.parse_args(rest[1:]), configs


# ------------------------------------------------------------------------------------------------ failures


def interrupt_name(terminated: bool) -> str:
    return "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"


def interrupt_status(terminated: bool) -> int:
    return TERMINATE_STATUS if terminated else INTERRUPT_STATUS


def report(prog: str, message: str, *, show_traceback: bool = False) -> None:
    """`PROG: message` on stderr, after the traceback of the exception being handled when `show_traceback`."""
    if show_traceback:
        traceback.print_exc()
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def failure(error: BaseException, user_errors: tuple[type[BaseException], ...] = (),
            user_status: int = USAGE_STATUS) -> tuple[str, int]:
    """(message, exit status) of an exception a command did not handle itself (the module docstring's table)."""
    if isinstance(error, UsageError):
        return f"error: {error}", USAGE_STATUS
    if isinstance(error, user_errors):
        return f"error: {error}", user_status
    if isinstance(error, OSError):  # the machine, not the input: disk full, a path that vanished while writing
        where = f": {error.filename}" if error.filename else ""
        return f"error: {error.strerror or error}{where} (--traceback shows where)", 1
    return (f"unexpected error: {type(error).__name__}: {error} (a bug if the inputs are fine: please report it "
            "with the output of --traceback)", 1)


def run_main(prog: str, argv: Sequence[str], body: Callable[[], Any], *,
             user_errors: tuple[type[BaseException], ...] = (), user_status: int = USAGE_STATUS,
             handlers: Sequence[tuple[type[BaseException], Callable[[Any], tuple[str, int]]]] = (),
             interrupted: str = "", guard: Callable[[], ContextManager[Any]] | None = None,
             terminated: tuple[type[BaseException], ...] = ()) -> int:
    """Run `body` (a command's work, parsing included) and return the exit status, reporting any failure as the
    module docstring says. `handlers`: (exception type, error -> (message, status)) pairs checked first;
    `interrupted`: what to add after 'interrupted (Ctrl-C); ' (a note the command added to the interrupt, e.g.
    which checkpoint a rerun resumes from, is said instead); `guard`: a context `body` runs in (e.g.
    lavie_jax.io.interrupts.terminate_as_interrupt, which raises SIGTERM as an interrupt); `terminated`: the interrupt
    types that mean SIGTERM (143 rather than 130)."""
    show = wants_traceback(argv)
    try:
        with guard() if guard is not None else contextlib.nullcontext():
            body()
    except SystemExit as e:  # --help (0), or a command's own exit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt as e:
        is_term = isinstance(e, terminated)
        said = (getattr(e, "__notes__", None) or [interrupted])[-1]  # the command's own word on what was kept
        report(prog, interrupt_name(is_term) + (f"; {said}" if said else ""), show_traceback=show)
        return interrupt_status(is_term)
    except Exception as e:  # noqa: BLE001 - every failure becomes one paragraph and a status
        for kind, handle in handlers:
            if isinstance(e, kind):
                message, status = handle(e)
                break
        else:
            message, status = failure(e, user_errors, user_status)
        report(prog, message, show_traceback=show)
        return status
    return 0
