"""The launchers' dry runs print the exact commands of a deployment (no gcloud / SLURM needed)."""

import io
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))

import slurm  # noqa: E402
import tpu  # noqa: E402

TRAIN = ["--", "lavie-train", "--config", "configs/base.py", "--workdir", "gs://b/runs/base"]


def dry(module, argv):
    out = io.StringIO()
    assert module.main(argv + ["--dry-run"] if "--" not in argv else
                       argv[:argv.index("--")] + ["--dry-run"] + argv[argv.index("--"):], out=out) == 0
    return out.getvalue()


def test_tpu_v5p_32_slice():
    out = dry(tpu, ["--name", "lavie", "--zone", "us-east5-a", "--type", "v5p-32", *TRAIN])
    q = "'\"'\"'"  # a single quote inside a single-quoted shell word
    z = "--zone us-east5-a"
    assert out.splitlines() == [
        f"+ gcloud compute tpus tpu-vm create lavie --accelerator-type v5p-32 --version tpu-ubuntu2204-base {z}",
        f"+ git -C {tpu.REPO} archive --format=tar.gz -o /tmp/lavie-jax.tar.gz HEAD",
        f"+ gcloud compute tpus tpu-vm scp /tmp/lavie-jax.tar.gz 'lavie:~/lavie-jax.tar.gz' --worker=all {z}",
        f"+ gcloud compute tpus tpu-vm ssh lavie --worker=all --command 'mkdir -p ~/lavie-jax && tar -xzf "
        f"~/lavie-jax.tar.gz -C ~/lavie-jax && cd ~/lavie-jax && python3 -m venv .venv && .venv/bin/pip install -q "
        f"-e . {q}jax[tpu]==0.10.2{q}' {z}",
        f"+ gcloud compute tpus tpu-vm ssh lavie --worker=all --command 'cd ~/lavie-jax && rm -f ~/lavie-run.status && "
        f": > ~/lavie-run.log && {{ nohup sh -c {q}.venv/bin/lavie-train --config configs/base.py --workdir "
        f"gs://b/runs/base --distributed & "
        f"echo $! > ~/lavie-run.pid; wait $!; echo $? > ~/lavie-run.status{q} > ~/lavie-run.log 2>&1 < /dev/null & "
        f"echo $! > ~/lavie-run.wrapper.pid; }}' {z}",
        f"+ gcloud compute tpus tpu-vm ssh lavie --worker=0 --command 'tail -n +1 --pid=$(cat ~/lavie-run.wrapper.pid) "
        f"-f ~/lavie-run.log; if [ -f ~/lavie-run.status ]; then exit $(cat ~/lavie-run.status); fi; echo {q}launch/"
        f"tpu.py: the program left no exit status (its worker shell was killed){q} >&2; exit 1' {z}",
    ]


@pytest.mark.parametrize("status", [0, 3])
def test_tpu_exits_with_the_status_of_the_program_on_the_workers(status, tmp_path):
    """The worker's shell lines, run here with HOME=tmp_path and a stand-in program: following the log ends with the
    program's exit status, not tail's 0; the program's own pid is kept for --stop."""
    import os
    import subprocess

    program = tmp_path / "lavie-jax" / ".venv" / "bin" / "lavie-train"
    program.parent.mkdir(parents=True)
    program.write_text(f"#!/bin/sh\necho \"args: $*\"\nsleep 1\nexit {status}\n")
    program.chmod(0o755)
    launcher = tpu.Launcher(tpu.build_parser().parse_args(["--name", "x", "--zone", "z"]))
    env = {**os.environ, "HOME": str(tmp_path)}
    start = launcher.remote_command(["lavie-train", "--workdir", "a b"])
    subprocess.run(["bash", "-c", start], env=env, check=True, timeout=30)
    follow = subprocess.run(["bash", "-c", launcher.follow_command()], env=env, capture_output=True, text=True,
                            timeout=60)
    assert follow.returncode == status and follow.stdout == "args: --workdir a b --distributed\n", follow
    assert (tmp_path / "lavie-run.pid").read_text().strip().isdigit()  # what --stop sends SIGTERM to
    (tmp_path / "lavie-run.status").unlink()  # the worker's shell killed before it wrote one
    follow = subprocess.run(["bash", "-c", launcher.follow_command()], env=env, capture_output=True, text=True,
                            timeout=60)
    assert follow.returncode == 1 and "left no exit status" in follow.stderr


def test_tpu_says_when_the_program_failed(monkeypatch):
    out = io.StringIO()
    launcher = tpu.Launcher(tpu.build_parser().parse_args(["--name", "x", "--zone", "z"]), out=out)
    monkeypatch.setattr(launcher, "ssh", lambda *a, **k: tpu.subprocess.CompletedProcess(a, 3))
    assert launcher.follow("lavie-train") == 3
    assert "lavie-train exited with status 3 on worker 0" in out.getvalue()


def test_tpu_two_slices_queue_and_run_on_both():
    out = dry(tpu, ["--name", "ms", "--zone", "us-east5-a", "--type", "v5p-32", "--slices", "2", "--spot", *TRAIN])
    lines = out.splitlines()
    assert lines[0] == ("+ gcloud compute tpus queued-resources create ms --accelerator-type v5p-32 "
                        "--runtime-version tpu-ubuntu2204-base --node-count 2 --node-prefix ms --spot "
                        "--zone us-east5-a")
    assert lines[1] == ("+ gcloud compute tpus queued-resources describe ms '--format=value(state.state)' "
                        "--zone us-east5-a")
    starts = [line for line in lines if "nohup" in line]
    assert [line.split(" ")[6] for line in starts] == ["ms-0", "ms-1"]  # the command runs on both slices
    assert all("--distributed" in line for line in starts)
    assert sum("tpu-vm scp" in line for line in lines) == 2
    stop = dry(tpu, ["--name", "ms", "--zone", "us-east5-a", "--slices", "2", "--stop"]).splitlines()
    assert [line.split(" ")[6] for line in stop] == ["ms-0", "ms-1"] and all("kill -TERM" in s for s in stop)


def test_tpu_refuses_other_commands():
    with pytest.raises(SystemExit, match="must start with one of"):
        dry(tpu, ["--name", "x", "--zone", "z", "--", "python", "train.py"])


def test_slurm_two_node_batch_script():
    out = dry(slurm, ["sbatch", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00",
                      "--requeue", "--repo", "/shared/lavie-jax", "--venv", "/shared/lavie-jax/.venv",
                      "--log-dir", "/shared/logs", *TRAIN])
    assert out.splitlines() == [
        "#!/bin/bash", "#SBATCH --job-name=lavie", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=16", "#SBATCH --time=04:00:00",
        "#SBATCH --signal=TERM@120", "#SBATCH --output=/shared/logs/%x-%j.out", "#SBATCH --partition=gpu",
        "#SBATCH --requeue", "set -euo pipefail", "cd /shared/lavie-jax",
        "# SIGTERM reaches every task: each saves at the next step boundary and exits 0",
        "srun --kill-on-bad-exit=1 --cpu-bind=none /shared/lavie-jax/.venv/bin/lavie-train --config configs/base.py "
        "--workdir gs://b/runs/base --distributed",
    ]
    srun = dry(slurm, ["srun", "--nodes", "2", "--venv", "/v", *TRAIN])
    assert srun == ("+ srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --kill-on-bad-exit=1 --cpu-bind=none "
                    "/v/bin/lavie-train --config configs/base.py --workdir gs://b/runs/base --distributed\n")


@pytest.mark.parametrize("flag,message", [
    ("--job-name=my job", r"--job-name: 'my job' is not a SLURM name: letters, digits and \. _ \+ - \(no spaces\)"),
    ("--time=x", r"--time: 'x' is not a SLURM time limit: minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S or UNLIMITED"),
    ("--cpus-per-task=0", r"--cpus-per-task: '0' is not a whole number >= 1"),
    ("--nodes=two", r"--nodes: 'two' is not a whole number >= 1"),
    ("--partition=gpu\n#SBATCH --x", r"--partition: 'gpu\\n#SBATCH --x' is not a SLURM name"),
    ("--log-dir=/shared/my logs", r"--log-dir: '/shared/my logs': an #SBATCH --output path may not hold spaces"),
])
def test_slurm_refuses_values_an_sbatch_line_cannot_hold(flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        dry(slurm, ["sbatch", flag, *TRAIN])
    assert e.value.code == 2 and re.search(f"error: argument {message}", capsys.readouterr().err)


def test_slurm_takes_every_time_form_and_partition_lists():
    for limit in ("30", "30:00", "24:00:00", "2-12", "2-12:30", "2-12:30:00", "UNLIMITED"):
        assert f"#SBATCH --time={limit}\n" in dry(slurm, ["sbatch", f"--time={limit}", *TRAIN])
    assert "#SBATCH --partition=gpu,a100\n" in dry(slurm, ["sbatch", "--partition=gpu,a100", *TRAIN])


def test_environment_variables_reach_jax_distributed(monkeypatch):
    import jax

    from lavie_jax import parallel

    seen = {}
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a: seen.setdefault("args", a))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    parallel.initialize_distributed()
    assert seen["args"] == ("host0:1234", 4, 3)
