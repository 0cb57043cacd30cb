"""Ctrl-C and SIGTERM during `lavie-sample`: one line saying how many videos were finished, exit status 130 / 143,
finished videos kept, partial files of this run removed, nothing that was there before touched.

The in-process tests stand fakes in for the samplers (no model); the last test sends real signals to real
`lavie-sample` processes that are sampling the tiny config.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lavie_jax.io.interrupts import Terminated
from lavie_jax.sampling import cli
from tests.conftest import child_env

ROOT = Path(__file__).resolve().parents[2]


class FakeSampler:
    def __init__(self, config, pipeline, mesh):
        self.config, self.stage = config, config.stage


class FakeCascade:
    """Writes every base video, then starts the first interpolation video and is interrupted while writing it."""

    interrupt: type[BaseException] = KeyboardInterrupt

    def __init__(self, samplers):
        self.samplers, self.stages = samplers, [s.stage for s in samplers]

    def check(self, *args):
        pass

    def run(self, prompts, videos, *, output_dir, stems, **kwargs):
        base = Path(output_dir) / "base"
        base.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            (base / f"{stem}.mp4").write_bytes(b"video")
            (base / f"{stem}.json").write_text("{}")
        interpolation = Path(output_dir) / "interpolation"
        interpolation.mkdir(exist_ok=True)
        for stem in stems:
            (interpolation / f"{stem}.mp4").write_bytes(b"half a vid")
        raise self.interrupt()


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(cli, "load_stage_pipeline", lambda config, checkpoint, mesh, **kw: None)
    monkeypatch.setattr(cli, "StageSampler", FakeSampler)
    monkeypatch.setattr(cli, "Cascade", FakeCascade)
    return FakeCascade


def cascade_args(output, *extra):
    return ["lavie-sample", "--config", f"{ROOT}/configs/base.py:tiny", "--checkpoint", "random",
            "--interpolation", f"{ROOT}/configs/interpolation.py:tiny", "--interpolation-checkpoint", "random",
            "--prompt", "a cat", "--prompt", "a dog", "--output", str(output), "--noprogress", *extra]


@pytest.mark.parametrize("interrupt, status, name", [(KeyboardInterrupt, 130, "interrupted (Ctrl-C)"),
                                                     (Terminated, 143, "terminated (SIGTERM)")])
def test_interrupt_keeps_finished_videos_and_removes_partial_ones(fakes, tmp_path, capsys, monkeypatch,
                                                                  interrupt, status, name):
    monkeypatch.setattr(fakes, "interrupt", interrupt)
    out = tmp_path / "res"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cascade_args(out))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == status
    assert err[-1] == (f"lavie-sample: {name}; 2 videos were written before it (2 in {out / 'base'}); partial "
                       "files were removed")
    assert sorted(p.name for p in (out / "base").iterdir()) == ["a_cat.json", "a_cat.mp4", "a_dog.json", "a_dog.mp4"]
    assert not (out / "interpolation").exists()  # its only files were partial, and this run made the directory


def test_interrupt_never_removes_what_was_there_before(fakes, tmp_path, capsys):
    out = tmp_path / "res"
    (out / "interpolation").mkdir(parents=True)
    (out / "interpolation" / "notes.txt").write_text("mine")
    # an earlier run's video, replaced under --overwrite and then cut short: still not this run's to delete
    (out / "interpolation" / "a_dog.mp4").write_bytes(b"an older video")
    (out / "interpolation" / "a_dog.json").write_text(json.dumps({"prompt": "a dog", "stage": "interpolation",
                                                                  "files": ["a_dog.mp4"]}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cascade_args(out, "--overwrite"))
    assert exit_info.value.code == 130
    assert sorted(p.name for p in (out / "interpolation").iterdir()) == ["a_dog.json", "a_dog.mp4", "notes.txt"]
    assert "2 videos were written before it" in capsys.readouterr().err


def test_interrupt_before_sampling_writes_nothing(tmp_path, monkeypatch, capsys):
    def loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_stage_pipeline", loading)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cascade_args(tmp_path / "res"))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == ("lavie-sample: interrupted (Ctrl-C) before sampling began; nothing "
                                               "was written")
    assert not (tmp_path / "res").exists()


def _start(output: Path) -> tuple[subprocess.Popen, threading.Event, list[str]]:
    """A real `lavie-sample` on the tiny config with far more steps than the test waits for (one device).

    The child takes SIGINT as a terminal's foreground job does. A job a shell starts in the background without job
    control (`make test &` in a script) inherits SIGINT ignored, and lavie-sample rightly keeps it ignored
    (`interrupts.terminate_as_interrupt`), so without this the SIGINT run would sample on and the test would hang."""
    env = child_env(PYTHONPATH=str(ROOT))
    program = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "from lavie_jax.sampling.cli import main; main()")
    argv = [sys.executable, "-c", program,
            "--config", f"{ROOT}/configs/base.py:tiny", "--checkpoint", "random", "--prompt", "a cat",
            # steps slow enough (~0.1 s each) that the run is still denoising when the signal comes
            "--config.sample.steps=1000", "--config.sample.num_frames=16", "--config.sample.height=64",
            "--config.sample.width=96", "--output", str(output)]  # with the progress bar: the test waits for step 1
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    started, lines = threading.Event(), []

    def read():
        for line in proc.stderr:  # text mode: the bar's carriage returns end lines too
            lines.append(line)
            done = re.search(r"(\d+)/1000", line)
            if done and int(done.group(1)) >= 1:  # denoising has begun (compiled, stepping)
                started.set()
        started.set()  # the process ended: stop waiting

    threading.Thread(target=read, daemon=True).start()
    return proc, started, lines


@pytest.mark.slow
def test_signals_stop_a_real_run_within_steps(tmp_path):
    """Both signals at once (two processes side by side). 1000 steps take minutes on CPU; each process must stop
    within seconds of its signal (control returns to Python between steps), say so and exit 130 / 143."""
    runs = {sig: _start(tmp_path / sig.name) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig, (proc, started, lines) in runs.items():
            assert started.wait(120) and proc.poll() is None, "".join(lines)
        sent = time.monotonic()
        for sig, (proc, _, _) in runs.items():
            proc.send_signal(sig)
        for sig, (proc, _, lines) in runs.items():
            proc.wait(timeout=60)
            assert time.monotonic() - sent < 60
            name, status = ("interrupted (Ctrl-C)", 130) if sig == signal.SIGINT else ("terminated (SIGTERM)", 143)
            assert proc.returncode == status, "".join(lines)
            time.sleep(0.1)  # the reader thread takes the last line
            assert lines[-1].strip() == (f"lavie-sample: {name} before any video was finished; nothing was "
                                         "written"), "".join(lines)
            assert not any("Traceback" in line or "Exception ignored" in line for line in lines), "".join(lines)
            assert not (tmp_path / sig.name).exists()
    finally:
        for proc, _, _ in runs.values():
            proc.kill()
