"""The launchers' dry runs print the exact commands of a deployment (no gcloud / SLURM needed)."""

import io
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
        f"+ gcloud compute tpus tpu-vm ssh lavie --worker=all --command 'cd ~/lavie-jax && nohup .venv/bin/lavie-train "
        f"--config configs/base.py --workdir gs://b/runs/base --distributed > ~/lavie-run.log 2>&1 < /dev/null & "
        f"echo $! > ~/lavie-run.pid' {z}",
        f"+ gcloud compute tpus tpu-vm ssh lavie --worker=0 --command 'tail -n +1 --pid=$(cat ~/lavie-run.pid) -f "
        f"~/lavie-run.log' {z}",
    ]


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
