#!/usr/bin/env python3
"""Run `lavie-train` / `lavie-sample` on a GPU cluster: a SLURM batch job, an `srun` inside an allocation, or any
scheduler that can set three environment variables.

    python launch/slurm.py sbatch --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 -- \\
        lavie-train --config configs/base.py --workdir /shared/runs/base --config.train.init=/shared/ckpt/base-init
    python launch/slurm.py srun --nodes 2 -- lavie-train ...        # inside `salloc`: run now, in the foreground
    add --dry-run to print the batch script / command instead of submitting or running it

Every node runs one process that drives all of its GPUs; the command gets `--distributed`, and each process calls
`jax.distributed.initialize()`, which reads SLURM's variables (process id, count, coordinator = the first node). The
batch script asks SLURM to send SIGTERM two minutes before the time limit (`--signal=TERM@120`): lavie-train saves a
checkpoint at the next step and exits 0, and with `--requeue` the job comes back and resumes from it.

Other schedulers (Kubernetes, LSF, plain ssh): start the same command on every host with `--distributed` and set
    JAX_COORDINATOR_ADDRESS=host0:1234  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i   (0 .. N-1, host0 being 0)
which `lavie_jax.parallel.initialize_distributed` passes to jax.distributed.initialize.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from command_line import split_command  # launch/ is on sys.path: the script's own folder

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("lavie-train", "lavie-sample")


# What an #SBATCH line may hold: sbatch reads those lines itself (not a shell), so a value with a space or a quote
# would be cut or misread there; values are checked instead of quoted.
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_WORDS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*(,[A-Za-z0-9][A-Za-z0-9._+-]*)*")  # a partition list
# SLURM's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or UNLIMITED / infinite
_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|unlimited|infinite|INFINITE")


def _checked(pattern: re.Pattern, what: str, example: str):
    def parse(value: str) -> str:
        if not pattern.fullmatch(value):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what} (e.g. {example})")
        return value
    return parse


def _path(value: str) -> str:
    if re.search(r"[\s'\"\\%]", value) or not value:
        raise argparse.ArgumentTypeError(f"{value!r}: an #SBATCH --output path may not hold spaces, quotes, "
                                         "backslashes or %; pick a plain path, e.g. /shared/logs")
    return value


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 1")
    return n


def program_argv(command: list[str], venv: str) -> list[str]:
    if not command or command[0] not in PROGRAMS:
        raise SystemExit(f"the command must start with one of {PROGRAMS}, got {command[:1]}")
    argv = [f"{venv}/bin/{command[0]}", *command[1:]]
    return argv if "--distributed" in argv else argv + ["--distributed"]


def batch_script(args: argparse.Namespace, command: list[str]) -> str:
    """The sbatch script: one task per node, all the node's GPUs per task, SIGTERM before the time limit."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={args.job_name}", f"#SBATCH --nodes={args.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={args.gpus_per_node}",
             f"#SBATCH --cpus-per-task={args.cpus_per_task}", f"#SBATCH --time={args.time}",
             "#SBATCH --signal=TERM@120", f"#SBATCH --output={args.log_dir}/%x-%j.out"]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    if args.requeue:
        lines.append("#SBATCH --requeue")
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(args.repo))}",
              "# SIGTERM reaches every task: each saves at the next step boundary and exits 0",
              f"srun --kill-on-bad-exit=1 --cpu-bind=none {shlex.join(program_argv(command, args.venv))}"]
    return "\n".join(lines) + "\n"


def srun_command(args: argparse.Namespace, command: list[str]) -> list[str]:
    return ["srun", f"--nodes={args.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={args.gpus_per_node}",
            "--kill-on-bad-exit=1", "--cpu-bind=none", *program_argv(command, args.venv)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/slurm.py", usage="%(prog)s {sbatch,srun} [options] -- COMMAND",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    word = "a SLURM name: letters, digits and . _ + - (no spaces)"
    p.add_argument("mode", choices=("sbatch", "srun"))
    p.add_argument("--nodes", type=_positive, default=1)
    p.add_argument("--gpus-per-node", type=_positive, default=8)
    p.add_argument("--cpus-per-task", type=_positive, default=16)
    p.add_argument("--time", default="24:00:00", type=_checked(_TIME, "a SLURM time limit: minutes, M:S, H:M:S, "
                                                                    "D-H, D-H:M, D-H:M:S or UNLIMITED", "24:00:00"))
    p.add_argument("--partition", type=_checked(_WORDS, f"{word}, or a comma-separated list", "gpu"))
    p.add_argument("--account", type=_checked(_WORD, word, "my-project"))
    p.add_argument("--job-name", default="lavie", type=_checked(_WORD, word, "lavie-base"))
    p.add_argument("--requeue", action="store_true", help="requeue after preemption / the time limit")
    p.add_argument("--repo", default=str(REPO), help="the checkout on the shared file system")
    p.add_argument("--venv", default=str(REPO / ".venv"), help="virtualenv with lavie-jax installed")
    p.add_argument("--log-dir", default=str(REPO / "logs"), type=_path)
    p.add_argument("--dry-run", action="store_true", help="print instead of submitting / running")
    return p


def main(argv: list[str] | None = None, out=sys.stdout) -> int:
    argv, command = split_command(argv)
    args = build_parser().parse_args(argv)
    if args.mode == "srun":
        cmd = srun_command(args, command)
        print("+ " + shlex.join(cmd), file=out, flush=True)
        return 0 if args.dry_run else subprocess.run(cmd, cwd=args.repo).returncode
    script = batch_script(args, command)
    if args.dry_run:
        print(script, end="", file=out)
        return 0
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
    print(f"+ sbatch {f.name}", file=out, flush=True)
    return subprocess.run(["sbatch", f.name]).returncode


if __name__ == "__main__":
    sys.exit(main())
