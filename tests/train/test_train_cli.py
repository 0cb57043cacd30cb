"""`lavie-train` as a user meets it before the first step: a rejected config leaves nothing behind, a mesh that
does not fit is one paragraph, a work directory without checkpoints takes a corrected config, and one with
checkpoints accepts only the changes a resumed run may make. No model is built or compiled here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lavie_jax.io.workdir import ConfigMismatchError
from lavie_jax.train import loop
from tests.train.conftest import tiny_train_config

REPO = Path(__file__).resolve().parents[2]
VIDEO_TEXT = "--config.data.global_batch_size=8 --config.data.dataset=video_text"  # 8 devices here


def _train(argv: list[str], capsys) -> tuple[int, str]:
    from lavie_jax.train import cli

    status = cli.main(["lavie-train", "--config", "base:tiny", *argv])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("--config.data.global_batch_size=3", r"data.global_batch_size: each micro-batch \(3 / 1 = 3 examples\) must "
                                          r"split over the 8 batch devices"),
    ("--config.train.num_steps=-5", "train.num_steps: expected a positive integer, got -5"),
    ("--config.mesh.shape=(16,1,1,1)", r"mesh.shape \[16, 1, 1, 1\] needs 16 devices but 8 are available; -1 takes "
                                       "the remaining devices"),
    # a dataset built from files must be given them (moving_shapes, procedural, is generated where data_dir says)
    (f"{VIDEO_TEXT}", r"data.video_text.csv: is empty: the video_text dataset is built from this table \(CSV or "
                      r"parquet\), and its prepared copy is found by it; set --config.data.video_text.csv=PATH"),
    (f"{VIDEO_TEXT} --config.data.video_text.csv=TMP/webvid.csv --config.data.data_dir=TMP/data",
     r"data.video_text.csv: TMP/webvid.csv does not exist, and data.data_dir=TMP/data does not exist either"),
])
def test_a_rejected_config_is_one_paragraph_and_writes_nothing(override, message, tmp_path, capsys):
    status, err = _train(["--workdir", str(tmp_path / "run"), *override.replace("TMP", str(tmp_path)).split()],
                         capsys)
    message = message.replace("TMP", re.escape(str(tmp_path)))
    assert status == 2 and re.match(f"lavie-train: error: config field {message}", err), err
    assert len(err.strip().splitlines()) == 1, err  # no traceback, no orbax thread failing at exit
    assert not (tmp_path / "run").exists()  # so the corrected rerun is not refused as "the config differs"


def test_a_config_error_is_one_line_when_the_process_exits(tmp_path):
    """A real process: nothing left running in the background (orbax's threads once failed at interpreter shutdown
    with a second traceback after the message)."""
    import subprocess
    import sys

    from tests.conftest import child_env

    out = subprocess.run([sys.executable, "-m", "lavie_jax.train.cli", "--config", "base:tiny", "--workdir",
                          str(tmp_path / "run"), "--config.train.num_steps=-5"], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == "lavie-train: error: config field train.num_steps: expected a positive integer, got -5\n"


def test_config_changes_before_and_after_the_first_checkpoint(tmp_path, capsys):
    path = tmp_path / "run"

    def prepare(config):
        loop.prepare_workdir(path, config, overwrite=False)[1].release()

    prepare(tiny_train_config("base", num_steps=4))
    # no checkpoint yet (say the first run failed before saving): a corrected config simply replaces the stored one
    prepare(tiny_train_config("base", num_steps=4, seed=5))
    assert json.loads((path / "config.json").read_text())["train"]["seed"] == 5
    assert "holds no checkpoint yet" in capsys.readouterr().out
    (path / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(ConfigMismatchError, match=r"train.seed: 5 -> 6"):
        prepare(tiny_train_config("base", num_steps=4, seed=6))
    prepare(tiny_train_config("base", num_steps=10, seed=5))
    assert "resuming with changed settings: train.num_steps: 4 -> 10" in capsys.readouterr().out
    assert json.loads((path / "config.json").read_text())["train"]["num_steps"] == 10
    # what a run that diverged advises: a lower learning rate (any optimizer setting) resumes
    prepare(tiny_train_config("base", num_steps=10, seed=5, **{"optimizer.lr": 1e-4}))
    assert "resuming with changed settings: train.optimizer.lr: 0.001 -> 0.0001" in capsys.readouterr().out
    assert sorted(p.name for p in path.iterdir()) == ["checkpoints", "config.json", "lavie_workdir.json"]


def _output(proc, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of `proc` once it exits; past `timeout` seconds, the test fails with every thread's stack
    (the child runs with PYTHONFAULTHANDLER: SIGABRT makes it print them) and what it printed."""
    import signal
    import subprocess

    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"pid {proc.pid} still running after {timeout} s; its stacks and output:\nstdout:\n{out}\n"
                    f"stderr:\n{err}")


def test_a_second_trainer_is_refused_and_sigterm_before_the_first_step_says_what_a_rerun_does(tmp_path):
    """Two real `lavie-train` processes on one work directory: the second is refused at once, naming the first;
    SIGTERM then stops the first before its first step, saying that nothing was saved."""
    import signal
    import socket
    import subprocess
    import sys

    from tests.conftest import child_env

    argv = [sys.executable, "-m", "lavie_jax.train.cli", "--config", "base:tiny", "--workdir", str(tmp_path / "run"),
            f"--config.data.data_dir={tmp_path / 'data'}"]
    env = child_env(PYTHONFAULTHANDLER="1")
    first = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().startswith("[lavie-train] base stage on")  # it holds the work directory
        first.send_signal(signal.SIGSTOP)  # it stays before its first step while the second one starts
        second = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            _, second_err = _output(second, 300)
        finally:
            second.kill()
        assert second.returncode == 2, second_err
        assert re.fullmatch(rf"lavie-train: error: --workdir \S+ is in use by another lavie-train: pid {first.pid} on "
                            rf"host {re.escape(socket.gethostname())} \(started .*\)\. Two trainers .*\n",
                            second_err), second_err
        first.send_signal(signal.SIGTERM)
        first.send_signal(signal.SIGCONT)
        out, err = _output(first, 300)
    finally:
        first.kill()
    assert first.returncode == 143, f"exit {first.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert err.strip().splitlines()[-1] == ("lavie-train: terminated (SIGTERM); nothing was saved: rerun the same "
                                            "command to start from the beginning"), err
    assert not (tmp_path / "run" / "lavie-train.lock").exists()  # released on the way out
