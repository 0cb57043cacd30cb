"""What every command shares (lavie_jax.cli.command): flag files, `--flag` / `--no-flag` booleans, unknown flags,
bounded numbers, the exit statuses and one-paragraph messages, --traceback even when parsing fails, and a --help
that lists the flags, for lavie-sample, lavie-train, lavie-convert, the demo and data.prepare."""

import re
from pathlib import Path

import pytest

from lavie_jax.cli import command
from lavie_jax.io.interrupts import Terminated

ROOT = Path(__file__).resolve().parents[1]


def parser():
    p = command.make_parser("prog", "One line.\n\nThe rest.", positional_hint=" (a prompt goes in --name)")
    p.add_argument("--name", action="append", default=[])
    p.add_argument("--count", type=command.bounded_int(1))
    p.add_argument("--seed", type=command.bounded_int(0, 9, " (a digit)"))
    p.add_argument("--progress", action=command.BooleanFlag, default=True)
    command.add_common_flags(p, cache_default="/somewhere")
    return p


# ------------------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("argv, progress", [([], True), (["--no-progress"], False), (["--noprogress"], False),
                                            (["--noprogress", "--progress"], True), (["--progress=false"], False),
                                            (["--progress=1"], True), (["--noprogress=true"], False)])
def test_booleans(argv, progress):
    assert parser().parse_args(argv).progress is progress


@pytest.mark.parametrize("argv, message", [
    (["--progress=maybe"], r"^--progress=maybe: expected true or false \(or --progress / --no-progress\)$"),
    (["--nmae", "x"], r"^unrecognized arguments: --nmae x; did you mean --name\? \(see prog --help\)$"),
    (["x y"], r"^unexpected argument 'x y': every value needs its flag \(a prompt goes in --name\); quote values "
              r"that contain spaces \(see prog --help\)$"),
    (["--count", "0"], r"^argument --count: must be at least 1, got 0 \(see prog --help\)$"),
    (["--seed", "10"], r"^argument --seed: must be from 0 to 9 \(a digit\), got 10"),
    (["--seed", "1.5"], r"^argument --seed: expected a whole number \(a digit\), got '1.5'"),
    (["--prog"], r"unrecognized arguments: --prog; did you mean --progress\?"),  # no abbreviations
])
def test_bad_flags_are_one_paragraph(argv, message):
    with pytest.raises(command.UsageError) as error:
        parser().parse_args(argv)
    assert re.search(message, str(error.value)), str(error.value)


def test_flag_files_nest_skip_comments_and_keep_order(tmp_path):
    inner = tmp_path / "inner.txt"
    inner.write_text("--name=from inner\n")
    outer = tmp_path / "outer.txt"
    outer.write_text(f"# a comment\n\n  --name=a b  \n// another\n--flagfile={inner}\n--noprogress\n--count\n3\n")
    args = parser().parse_args(["--name", "first", "--flagfile", str(outer), "--name=last"])
    assert args.name == ["first", "a b", "from inner", "last"] and args.progress is False and args.count == 3
    assert command.expand_flagfiles(["p", "--", f"--flagfile={outer}"]) == ["p", "--", f"--flagfile={outer}"]


def test_bad_flag_files(tmp_path):
    with pytest.raises(command.UsageError, match=r"^--flagfile: Unable to open flagfile: \[Errno 2\] No such file"):
        command.expand_flagfiles([f"--flagfile={tmp_path / 'none.txt'}"])
    loop = tmp_path / "loop.txt"
    loop.write_text(f"--flagfile={loop}\n")
    with pytest.raises(command.UsageError, match="includes itself"):
        command.expand_flagfiles(["--flagfile", str(loop)])
    with pytest.raises(command.UsageError, match="--flagfile needs a value"):
        command.expand_flagfiles(["--flagfile"])


@pytest.mark.parametrize("argv, wanted", [(["--traceback"], True), (["--traceback=false"], False),
                                          (["--traceback", "--no-traceback"], False), (["--", "--traceback"], False),
                                          (["--notraceback", "--traceback=1"], True), ([], False)])
def test_traceback_is_found_before_parsing(argv, wanted):
    assert command.wants_traceback(["--bad-flag", *argv]) is wanted


# ------------------------------------------------------------------------------------------------ failures

class Mine(ValueError):
    pass


def _noted(error: BaseException, note: str) -> BaseException:
    error.add_note(note)  # a command's own word on what an interrupt kept replaces run_main's `interrupted`
    return error


@pytest.mark.parametrize("error, status, line", [
    (command.UsageError("--x 1: too big"), 2, "prog: error: --x 1: too big"),
    (Mine("the input is wrong; fix it"), 2, "prog: error: the input is wrong; fix it"),
    (OSError(28, "No space left on device", "/out/x"), 1,
     "prog: error: No space left on device: /out/x (--traceback shows where)"),
    (RuntimeError("broken"), 1, "prog: unexpected error: RuntimeError: broken (a bug if the inputs are fine: please "
                                "report it with the output of --traceback)"),
    (KeyboardInterrupt(), 130, "prog: interrupted (Ctrl-C); nothing was kept"),
    (Terminated(), 143, "prog: terminated (SIGTERM); nothing was kept"),
    (_noted(Terminated(), "checkpoint 4 is kept"), 143, "prog: terminated (SIGTERM); checkpoint 4 is kept"),
])
def test_statuses_and_messages(error, status, line, capsys):
    def body():
        raise error

    for show in (False, True):
        assert command.run_main("prog", ["--traceback"] if show else [], body, user_errors=(Mine,),
                                interrupted="nothing was kept", terminated=(Terminated,)) == status
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == line and ("Traceback (most recent call last)" in err) == show


# ------------------------------------------------------------------------------------------------ the commands

def _mains():
    from lavie_jax.convert import cli as convert
    from lavie_jax.data import prepare
    from lavie_jax.demo import main as demo
    from lavie_jax.sampling import cli as sample
    from lavie_jax.train import cli as train

    def exit_status(main, argv):  # lavie-sample exits (SystemExit) on failure, the others return the status
        try:
            return main(argv) or 0
        except SystemExit as e:
            return e.code

    return {
        "lavie-sample": lambda argv: exit_status(sample.main, ["lavie-sample", *argv]),
        "lavie-train": lambda argv: exit_status(train.main, ["lavie-train", *argv]),
        "lavie-convert": lambda argv: exit_status(convert.main, argv),
        "python -m lavie_jax.demo": lambda argv: exit_status(demo.main, argv),
        "python -m lavie_jax.data.prepare": lambda argv: exit_status(prepare.main, argv),
    }


COMMANDS = ["lavie-sample", "lavie-train", "lavie-convert", "python -m lavie_jax.demo",
            "python -m lavie_jax.data.prepare"]


@pytest.mark.parametrize("prog", COMMANDS)
def test_help(prog, capsys):
    assert _mains()[prog](["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} ") and "flags of every lavie-jax command:" in out
    assert re.search(r"^  --traceback, --no-traceback$", out, re.M) and "--flagfile FILE" in out
    if prog in ("lavie-sample", "lavie-train"):  # the stage configs and how to override their fields
        assert re.search(r"^  --config NAME\[:variant\]$", out, re.M) and "--config.a.b=value" in out
    if prog != "python -m lavie_jax.data.prepare":  # it compiles nothing
        assert "--compile-cache DIR" in out and "--no-compile-cache" in out


@pytest.mark.parametrize("prog", COMMANDS)
def test_a_bad_flag_is_one_line_with_status_2_and_traceback_is_honoured(prog, capsys):
    argv = {"lavie-train": ["--workdir", "w"], "lavie-convert": ["export", "--checkpoint", "c", "--output", "o.pt"],
            "python -m lavie_jax.data.prepare": ["moving_shapes"]}.get(prog, [])
    for extra, shown in (([], False), (["--traceback"], True)):
        assert _mains()[prog]([*argv, "--bogus-flag", *extra]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.startswith(prog)]
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "--bogus-flag" in lines[0], err
        assert ("Traceback (most recent call last)" in err) == shown, err
        assert shown or len(err.strip().splitlines()) == 1, err
