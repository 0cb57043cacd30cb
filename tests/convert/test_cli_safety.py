"""lavie-convert never destroys what it did not write (whatever --overwrite says), checks every path and number
before any work with a message naming the flag, and leaves nothing behind when killed (SIGTERM cleans up at once;
the leftovers of a SIGKILL are cleared by the next run)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lavie_jax.convert import export
from lavie_jax.convert.cli import main
from tests.convert.helpers import save_state_dict
from tests.models.tiny_configs import SD_SMALL, random_state_dict
from tests.conftest import child_env

# Every path here is about files, not numerics: the smallest two-level UNet.
SMALL = dict(SD_SMALL, attention_head_dim=[1, 1], block_out_channels=[32, 32])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(LaVie base checkpoint file with random weights, UNet config file) of a small UNet."""
    root = tmp_path_factory.mktemp("source")
    (root / "unet.json").write_text(json.dumps(SMALL))
    _, state = random_state_dict(dict(SMALL, stage="base"))
    return save_state_dict(state, root / "ckpt", "safetensors"), root / "unet.json"


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """One of our UNet directories."""
    out = tmp_path_factory.mktemp("converted") / "unet"
    assert _lavie(source, out) == 0
    return out


def _lavie(source, output, *extra):
    checkpoint, config = source
    return main(["lavie", "--stage", "base", "--checkpoint", str(checkpoint), "--unet-config", str(config),
                 "--output", str(output), "--quiet", *extra])


def _tree(root):
    """Every path under `root` with its content (files) or None, to show nothing was touched."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p)
                                       if p.is_symlink() else None) for p in sorted(Path(root).rglob("*"))}


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------ never replace theirs

@pytest.mark.parametrize("case", ["user folder", "ours plus a user file", "plain file", "symlink to ours",
                                  "current directory", "parent of the current directory", "home directory"])
def test_overwrite_never_replaces_what_is_not_ours(case, source, converted, tmp_path, monkeypatch, capsys):
    work = tmp_path / "home" / "projects" / "work"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    output, reason = {
        "user folder": (tmp_path / "papers", "it has no lavie_checkpoint.json"),
        "plain file": (work / "thesis.tex", "it is a file"),
        "ours plus a user file": (tmp_path / "ckpt", "holds notes.txt, which lavie-convert did not write"),
        "symlink to ours": (tmp_path / "link", "it is a symbolic link"),
        "current directory": (".", "it is the current directory"),
        "parent of the current directory": ("..", "the current directory is inside it"),
        "home directory": (tmp_path / "home", "it is your home directory"),
    }[case]
    if case == "user folder":
        shutil.copytree(work, output)
    if case in ("ours plus a user file", "symlink to ours"):
        shutil.copytree(converted, tmp_path / "ckpt")
        (tmp_path / "ckpt" / "notes.txt").write_text("what I trained it on")
        (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    before = _tree(tmp_path)
    assert _lavie(source, output, "--overwrite") == 1
    err = _err(capsys)
    assert reason in err and "lavie-convert never replaces it, even with --overwrite" in err, err
    assert err.count("\n") == 1  # one line
    assert _tree(tmp_path) == before  # nothing touched, no temporaries


def test_output_under_a_file_names_the_file(source, tmp_path, capsys):
    (tmp_path / "notes").write_text("x")
    assert _lavie(source, tmp_path / "notes" / "ckpt" / "base") == 1
    err = _err(capsys)
    assert f"{tmp_path / 'notes'} is a file, not a directory; choose another --output" in err
    assert "File exists" not in err


# ------------------------------------------------------------------------------------------ checks before work

@pytest.mark.parametrize("argv,message", [
    (["--group-mb", "0"], "argument --group-mb: must be from 1 to 65536 (MB per group), got 0"),
    (["--group-mb", "-5"], "argument --group-mb: must be from 1 to 65536 (MB per group), got -5"),
    (["--group-mb", "100000"], "argument --group-mb: must be from 1 to 65536 (MB per group), got 100000"),
    (["--group-mb", "1.5"], "argument --group-mb: expected a whole number (MB per group), got '1.5'"),
])
def test_numbers_are_validated(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lavie", "--stage", "base", "--checkpoint", "x.pt", "--output", str(tmp_path / "o"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["sd", "--stage", "base", "--model-dir", "m", "--output", str(tmp_path / "o"), "--seed", "-1"])
    assert exit_.value.code == 2 and "argument --seed: must be from 0 to 2147483647, got -1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _paths_case(tmp_path, case):
    """(argv, expected message) of a command whose path argument `case` is wrong."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    out = ["--output", str(tmp_path / "out")]
    return {
        "missing checkpoint": (["lavie", "--stage", "base", "--checkpoint", str(tmp_path / "no.pt"), *out],
                               f"--checkpoint {tmp_path / 'no.pt'}: no such file"),
        "checkpoint is a folder": (["lavie", "--stage", "base", "--checkpoint", str(tmp_path / "empty"), *out],
                                   f"--checkpoint {tmp_path / 'empty'} is a directory, not a file"),
        "missing unet config": (["lavie", "--stage", "base", "--checkpoint", str(tmp_path / "file"), "--unet-config",
                                 str(tmp_path / "u.json"), *out], f"--unet-config {tmp_path / 'u.json'}: no such file"),
        "missing model dir": (["sd", "--stage", "base", "--model-dir", str(tmp_path / "sd"), *out],
                              f"--model-dir {tmp_path / 'sd'}: no such directory"),
        "model dir is a file": (["x4", "--model-dir", str(tmp_path / "file"), *out],
                                f"--model-dir {tmp_path / 'file'} is a file, not a directory"),
        "model dir without models": (["x4", "--model-dir", str(tmp_path / "empty"), *out],
                                     f"--model-dir {tmp_path / 'empty'} has no unet/, vae/, text_encoder/: pass the "
                                     "x4-upscaler folder"),
        "missing sd dir": (["pipeline", "--stage", "base", "--checkpoint", str(tmp_path / "file"), "--sd-dir",
                            str(tmp_path / "sd"), *out], f"--sd-dir {tmp_path / 'sd'}: no such directory"),
        "export of a file": (["export", "--checkpoint", str(tmp_path / "file"), "--output", str(tmp_path / "o.pt")],
                             f"--checkpoint {tmp_path / 'file'} is a file, not a directory"),
        "export under a file": (["export", "--checkpoint", str(tmp_path / "empty"), "--output",
                                 str(tmp_path / "file" / "o.safetensors")],
                                f"{tmp_path / 'file'} is a file, not a directory; choose another --output"),
        "output under a file": (["x4", "--model-dir", str(tmp_path / "empty"), "--output", str(tmp_path / "file/o")],
                                "has no unet/"),  # inputs first
    }[case]


@pytest.mark.parametrize("case", ["missing checkpoint", "checkpoint is a folder", "missing unet config",
                                  "missing model dir", "model dir is a file", "model dir without models",
                                  "missing sd dir", "export of a file", "export under a file", "output under a file"])
def test_every_path_is_checked_first(case, tmp_path, capsys):
    argv, message = _paths_case(tmp_path, case)
    before = _tree(tmp_path)
    assert main([*argv, "--quiet"]) == 1
    err = _err(capsys)
    assert message in err and err.count("\n") == 1, err
    assert _tree(tmp_path) == before


# ------------------------------------------------------------------------------------------ export outputs

def test_export_replaces_only_its_own_files(converted, source, tmp_path, monkeypatch, capsys):
    import torch

    def export_(output, *extra):
        return main(["export", "--checkpoint", str(converted), "--output", str(output), "--quiet", *extra])

    for name in ("w.safetensors", "w.pt"):
        assert export_(tmp_path / name) == 0
        assert export.EXPORTS.why_not(tmp_path / name) is None  # carries our mark
        assert export_(tmp_path / name) == 1 and "already exists; pass --overwrite" in _err(capsys)
    assert export_(tmp_path / "w.pt", "--overwrite") == 0  # ours: replaced
    assert sorted(torch.load(tmp_path / "w.pt", weights_only=True)) == ["ema"]  # our record does not disturb torch

    # the rest is refused before any work: nothing is read from the checkpoint
    def no_work(*args, **kwargs):
        raise AssertionError("the export started before its output was checked")

    monkeypatch.setattr(export, "torch_state_stream", no_work)
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "dir.safetensors" / "keep").write_text("mine")
    torch.save({"ema": {"w": torch.zeros(2)}}, tmp_path / "official.pt")
    os.link(source[0], tmp_path / "original.safetensors")  # e.g. the file the checkpoint was converted from
    (tmp_path / "notes.bin").write_text("not weights")
    before = _tree(tmp_path)
    for name, reason in [("dir.safetensors", "it is a directory"),
                         ("official.pt", "it is a torch archive without our lavie_export.json record"),
                         ("original.safetensors", "its safetensors header has no lavie-jax metadata"),
                         ("notes.bin", "it is neither a safetensors file nor a torch zip archive")]:
        assert export_(tmp_path / name, "--overwrite") == 1
        err = _err(capsys)
        assert f"it already exists and is not a file written by lavie-convert export ({reason})" in err, err
        assert "never replaces it, even with --overwrite" in err
    assert _tree(tmp_path) == before


# ------------------------------------------------------------------------------------------ signals

# Runs lavie-convert with every tensor read slowed down, and touches a file once writing has begun, so the test
# can signal it mid-conversion (test-only: nothing in the package slows down).
SLOW_CONVERT = """
import sys, time
from pathlib import Path
from lavie_jax.convert import torch_files
read, started = torch_files.LazyTensor.read, Path(sys.argv[1])
def slow_read(self):
    started.touch()
    time.sleep(0.05)
    return read(self)
torch_files.LazyTensor.read = slow_read
from lavie_jax.convert.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _start_slow_conversion(source, out, started):
    checkpoint, config = source
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(started), "lavie", "--stage", "base",
                             "--checkpoint", str(checkpoint), "--unet-config", str(config), "--output", str(out),
                             "--quiet"], stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.monotonic() + 90
    while not started.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    assert [p.name for p in out.parent.glob(f".{out.name}.tmp-*")], "no temporary directory while writing"
    return proc


def test_sigterm_mid_conversion_cleans_up(source, tmp_path):
    """SIGTERM (a scheduler's kill, `timeout`) cleans up as Ctrl-C does: exit 143, one line, nothing left. The
    leftovers of an uncatchable SIGKILL are cleared by the next run: tests/test_safe_io.py."""
    out = tmp_path / "out"
    proc = _start_slow_conversion(source, out, tmp_path / "started")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err == "lavie-convert: terminated (SIGTERM); no partial output was left behind\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started"]  # no output, no temporaries
