"""What `pip install lavie-jax` gives a user: a wheel built from this checkout holds the stage configs as
`lavie_jax.configs`, and its console scripts train and sample `base:tiny`, found by name, from a folder that is not
the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import child_env
from tests.train.conftest import SMALL_UNET_ARGS

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "lavie_jax", "configs")
PROMPT = "a red circle moving left"
# tiny clips and two steps: seconds, not minutes (the sizes and the UNet tests/train/test_loop.py trains)
TRAIN = [*SMALL_UNET_ARGS, "--config.data.global_batch_size=2", "--config.data.num_frames=2",
         "--config.data.images.per_clip=1", "--config.data.height=32", "--config.data.width=48",
         "--config.data.read_threads=1", "--config.data.moving_shapes.num_videos=16",
         "--config.data.moving_shapes.num_validation=4", "--config.data.moving_shapes.num_frames=24",
         "--config.data.moving_shapes.height=32", "--config.data.moving_shapes.width=48", "--config.train.num_steps=2",
         "--config.train.log_every=1", "--config.train.checkpoint_every=2"]
SAMPLE = [*SMALL_UNET_ARGS, "--config.sample.steps=2", "--config.sample.num_frames=2", "--config.sample.height=32",
          "--config.sample.width=48"]


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, f"{command}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def _build_wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a copy of the build inputs (an in-place build would leave build/ in the checkout, and files
    deleted here would linger there into later wheels). No index, no build isolation: this environment's setuptools."""
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
          "--wheel-dir", tmp_path / "wheels", source])
    (wheel,) = (tmp_path / "wheels").glob("lavie_jax-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> tuple[Path, Path]:
    """A new virtual environment holding the wheel alone, its dependencies taken from this test environment through
    a .pth line. The line is written after the install (pip sees an empty environment), and a .pth line only adds a
    folder to sys.path: the .pth files in it, such as the editable install's finder, are not run."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    (site / "test_environment.pth").write_text("".join(f"{folder}\n" for folder in ours))
    return venv, site


@pytest.mark.slow
def test_the_installed_wheel_trains_and_samples_a_packaged_config_by_name(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {f"lavie_jax/configs/{name}.py" for name in ("__init__", "common", "base", "interpolation", "vsr",
                                                             "demo")}
    assert packaged <= names, sorted(packaged - names)
    assert not [n for n in names if n.split("/")[0] in ("configs", "tests", "bench")]

    venv, site = _fresh_venv(tmp_path, wheel)
    work = tmp_path / "elsewhere"  # neither the checkout nor below it
    work.mkdir()
    env = child_env()
    env.pop("PYTHONPATH", None)
    where = _run([venv / "bin" / "python", "-c", "import lavie_jax, lavie_jax.configs.base as b; "
                  "print(lavie_jax.__file__); print(b.__file__)"], cwd=work, env=env).stdout.split()
    assert len(where) == 2 and all(Path(p).is_relative_to(site) for p in where), where  # not the editable checkout

    _run([venv / "bin" / "lavie-train", "--config", "base:tiny", "--workdir", "run",
          "--config.data.data_dir=data", *TRAIN], cwd=work, env=env)
    assert (work / "run" / "metrics.jsonl").is_file() and (work / "run" / "config.json").is_file()
    _run([venv / "bin" / "lavie-sample", "--config", "base:tiny", "--checkpoint", "run", "--prompt", PROMPT,
          "--output", "res", *SAMPLE], cwd=work, env=env)
    assert (work / "res" / f"{PROMPT.replace(' ', '_')}.mp4").is_file()
