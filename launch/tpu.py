#!/usr/bin/env python3
"""Run `lavie-train` / `lavie-sample` on a Cloud TPU VM slice, or on several slices (multislice), with one command.

    python launch/tpu.py --name lavie --zone us-east5-a --type v5p-32 -- \\
        lavie-train --config configs/base.py --workdir gs://BUCKET/runs/base --config.train.init=gs://...
    python launch/tpu.py --name lavie --zone us-east5-a --type v5p-32 --slices 2 --spot -- lavie-train ...
    python launch/tpu.py --name lavie --zone us-east5-a --stop        # SIGTERM every worker: save and exit 0
    python launch/tpu.py --name lavie --zone us-east5-a --delete      # give the TPUs back
    add --dry-run to any of them: print every command instead of running it

What a run does, in order:
  1. create the TPU VM (`gcloud compute tpus tpu-vm create`) or, with `--slices N > 1`, a queued resource of N
     slices (`gcloud compute tpus queued-resources create`, waited for until ACTIVE); an existing one is reused;
  2. copy this checkout (`git archive HEAD`, so only committed files) to every worker of every slice and install it
     in ~/lavie-jax/.venv with the TPU build of jax (`--no-setup` skips this for a worker set up before);
  3. start the command on all workers of all slices, with `--distributed` appended (each process joins the run:
     jax.distributed.initialize detects the TPU workers, and the slices on multislice), detached, logging to
     ~/lavie-run.log on each worker (its pid in ~/lavie-run.pid);
  4. stream worker 0's log until the command ends, and exit with its exit status; Ctrl-C here stops cleanly: SIGTERM
     to every worker, which saves a checkpoint at the next step and exits 0 (lavie-train's preemption path);
     rerunning resumes.
Only the Python standard library and the `gcloud` CLI are needed here.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from command_line import split_command  # launch/ is on sys.path: the script's own folder

REPO = Path(__file__).resolve().parents[1]
REMOTE_DIR = "~/lavie-jax"
LOG, PID = "~/lavie-run.log", "~/lavie-run.pid"  # the program's output and pid (what --stop signals)
WRAPPER_PID, STATUS = "~/lavie-run.wrapper.pid", "~/lavie-run.status"  # the shell that records its exit status
TARBALL = "/tmp/lavie-jax.tar.gz"
DEFAULT_VERSION = "tpu-ubuntu2204-base"
JAX_TPU = "jax[tpu]==0.10.2"  # the jax the package is pinned to, with libtpu
PROGRAMS = ("lavie-train", "lavie-sample")


class Launcher:
    """Runs (or, dry, prints) the gcloud commands of one TPU deployment."""

    def __init__(self, args: argparse.Namespace, out=sys.stdout):
        self.a, self.out = args, out
        self.nodes = [args.name] if args.slices == 1 else [f"{args.name}-{i}" for i in range(args.slices)]

    # ---- command plumbing

    def _gcloud(self, *parts: str) -> list[str]:
        cmd = ["gcloud", "compute", "tpus", *parts, "--zone", self.a.zone]
        return cmd + (["--project", self.a.project] if self.a.project else [])

    def run(self, cmd: list[str], *, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
        print("+ " + shlex.join(cmd), file=self.out, flush=True)
        if self.a.dry_run:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.run(cmd, check=check, text=True, capture_output=capture)

    def ssh(self, node: str, command: str, *, worker: str = "all", check: bool = True):
        return self.run(self._gcloud("tpu-vm", "ssh", node, f"--worker={worker}", "--command", command), check=check)

    # ---- steps

    def exists(self) -> bool:
        if self.a.dry_run:
            return False
        what = (["tpu-vm", "describe", self.a.name] if self.a.slices == 1
                else ["queued-resources", "describe", self.a.name])
        return self.run(self._gcloud(*what), check=False, capture=True).returncode == 0

    def create(self) -> None:
        a = self.a
        if self.exists():
            print(f"reusing {a.name}", file=self.out)
            return
        tier = ["--spot"] if a.spot else (["--reserved"] if a.reserved else [])
        if a.slices == 1:
            self.run(self._gcloud("tpu-vm", "create", a.name, "--accelerator-type", a.type, "--version", a.version,
                                  *tier))
            return
        self.run(self._gcloud("queued-resources", "create", a.name, "--accelerator-type", a.type,
                              "--runtime-version", a.version, "--node-count", str(a.slices), "--node-prefix", a.name,
                              *tier))
        self.wait_active()

    def wait_active(self, poll_s: float = 30.0) -> None:
        cmd = self._gcloud("queued-resources", "describe", self.a.name, "--format=value(state.state)")
        while True:
            state = self.run(cmd, capture=True).stdout.strip() or ("ACTIVE" if self.a.dry_run else "")
            if state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED"):
                raise SystemExit(f"queued resource {self.a.name} is {state}")
            time.sleep(poll_s)

    def setup(self) -> None:
        self.run(["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", TARBALL, "HEAD"])
        install = (f"mkdir -p {REMOTE_DIR} && tar -xzf ~/lavie-jax.tar.gz -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
                   f"python3 -m venv .venv && .venv/bin/pip install -q -e . {shlex.quote(JAX_TPU)}")
        for node in self.nodes:
            self.run(self._gcloud("tpu-vm", "scp", TARBALL, f"{node}:~/lavie-jax.tar.gz", "--worker=all"))
            self.ssh(node, install)

    def remote_command(self, command: list[str]) -> str:
        """The shell line each worker runs: the command with --distributed, detached, logging to LOG; a wrapper
        shell writes its exit status to STATUS (what `follow` exits with)."""
        if not command or command[0] not in PROGRAMS:
            raise SystemExit(f"the command must start with one of {PROGRAMS}, got {command[:1]}")
        args = [*command[1:], *([] if "--distributed" in command else ["--distributed"])]
        wrapper = f".venv/bin/{command[0]} {shlex.join(args)} & echo $! > {PID}; wait $!; echo $? > {STATUS}"
        # only the wrapper goes to the background (braces: `&` would take the whole && list): the log exists and
        # the old status is gone before `follow` starts
        return (f"cd {REMOTE_DIR} && rm -f {STATUS} && : > {LOG} && {{ nohup sh -c {shlex.quote(wrapper)} > {LOG} "
                f"2>&1 < /dev/null & echo $! > {WRAPPER_PID}; }}")

    def start(self, command: list[str]) -> None:
        line = self.remote_command(command)
        for node in self.nodes:
            self.ssh(node, line)

    def follow(self, program: str = "the program") -> int:
        """Stream worker 0's log until its program exits, and return the program's exit status (`tail --pid` itself
        returns 0; a status that was never written, the worker's shell killed too, is 1). Ctrl-C stops every worker
        cleanly."""
        try:
            status = self.ssh(self.nodes[0], self.follow_command(), worker="0", check=False).returncode
            if status:
                print(f"launch/tpu.py: {program} exited with status {status} on worker 0 (its log: {LOG})",
                      file=self.out)
            return status
        except KeyboardInterrupt:
            print("stopping: SIGTERM to every worker (each saves a checkpoint and exits)", file=self.out)
            self.stop()
            return 130

    @staticmethod
    def follow_command() -> str:
        """The shell line that streams a worker's log and exits with its program's status."""
        return (f"tail -n +1 --pid=$(cat {WRAPPER_PID}) -f {LOG}; if [ -f {STATUS} ]; then exit $(cat {STATUS}); "
                f"fi; echo 'launch/tpu.py: the program left no exit status (its worker shell was killed)' >&2; exit 1")

    def stop(self) -> None:
        for node in self.nodes:
            self.ssh(node, f"kill -TERM $(cat {PID}) 2>/dev/null || true", check=False)

    def delete(self) -> None:
        if self.a.slices == 1:
            self.run(self._gcloud("tpu-vm", "delete", self.a.name, "--quiet"))
        else:
            self.run(self._gcloud("queued-resources", "delete", self.a.name, "--force", "--quiet"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu.py", usage="%(prog)s --name NAME --zone ZONE [options] [-- COMMAND]",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", help="gcloud project (default: gcloud's)")
    p.add_argument("--type", default="v5p-8", help="accelerator type of one slice, e.g. v5p-32, v6e-64")
    p.add_argument("--slices", type=int, default=1, help="number of slices (> 1: multislice via queued resources)")
    p.add_argument("--version", default=DEFAULT_VERSION, help="TPU runtime version")
    tier = p.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    tier.add_argument("--reserved", action="store_true", help="reserved capacity")
    p.add_argument("--no-setup", action="store_true", help="skip copying and installing the package")
    p.add_argument("--stop", action="store_true", help="SIGTERM the running program on every worker and exit")
    p.add_argument("--delete", action="store_true", help="delete the TPU VM / queued resource and exit")
    p.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    return p


def main(argv: list[str] | None = None, out=sys.stdout) -> int:
    argv, command = split_command(argv)
    args = build_parser().parse_args(argv)
    if args.slices < 1:
        raise SystemExit("--slices must be >= 1")
    launcher = Launcher(args, out)
    if args.stop:
        launcher.stop()
        return 0
    if args.delete:
        launcher.delete()
        return 0
    launcher.remote_command(command)  # checked before anything is created
    launcher.create()
    if not args.no_setup:
        launcher.setup()
    launcher.start(command)
    return launcher.follow(command[0])


if __name__ == "__main__":
    sys.exit(main())
