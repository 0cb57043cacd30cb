"""`lavie-train`: train one stage of the cascade in a work directory; rerun the same command to resume.

  lavie-train --config base:tiny --workdir runs/base-tiny
  lavie-train --config base --workdir gs://bucket/runs/base --config.train.init=ckpt/base-init \\
      --config.data.dataset=video_text --config.mesh.shape=-1 --config.mesh.shape=8 ...
  lavie-train --config vsr --workdir runs/vsr --config.train.init=ckpt/vsr-init --distributed

`--config` is a stage config by name (base, interpolation, vsr; `:tiny` is CPU sized, `:demo` the demo's) or a
config file (`FILE.py[:variant]`), and
`--config.a.b=value` overrides any field (its `train` section documents each one). The work directory gets
`checkpoints/` (orbax), `metrics.jsonl`, `tb/` (TensorBoard) and `config.json`; a rerun resumes from the latest
complete checkpoint, and a rerun with a config that changes the run is refused unless `--overwrite` (which only
ever replaces a directory lavie-train made). SIGTERM (preemption) and Ctrl-C save at the next step and exit 0; a
second Ctrl-C exits at once. On several hosts run the same command on each with `--distributed`
(launch/tpu.py, launch/slurm.py): the cluster is detected on Cloud TPU, SLURM and Open MPI, else pass
--coordinator, --num-processes and --process-id.

Compiled programs are kept in `WORKDIR/cache/jax`, so a resumed or repeated run skips most of its start
(`--compile-cache DIR` keeps them elsewhere, on storage every host sees; `--no-compile-cache` turns this off;
lavie_jax.runtime.compile_cache). `--flagfile FILE` reads more flags, config overrides included, from a file.

Exit status: 0 done (or stopped and saved), 2 bad input (one paragraph on stderr names the field or flag and the
fix; `--traceback` adds the traceback), 3 a NaN / infinite loss (the last good checkpoint is kept), 1 an
unexpected failure.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lavie_jax.cli import command
from lavie_jax.io import interrupts
from lavie_jax.runtime import compile_cache, startup

PROG = "lavie-train"
UsageError = command.UsageError  # bad or missing command-line flags
NONFINITE_STATUS = 3


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "bad input": one paragraph, exit status 2 (imported lazily: they bring jax)."""
    from lavie_jax.cli.config_flags import ConfigArgError
    from lavie_jax.io.checkpoints import CheckpointError
    from lavie_jax.io.keycheck import KeyMismatchError
    from lavie_jax.models.arch import ConfigError
    from lavie_jax.io.safe_io import OutputPathError
    from lavie_jax.train.setup import TrainConfigError
    from lavie_jax.io.workdir import ConfigMismatchError, DamagedCheckpointError, StateMismatchError

    return (ConfigArgError, TrainConfigError, ConfigMismatchError, OutputPathError, CheckpointError, ConfigError,
            KeyMismatchError, FileNotFoundError, DamagedCheckpointError, StateMismatchError)


def build_parser() -> command.ArgumentParser:
    p = command.make_parser(PROG, __doc__)
    run = p.add_argument_group("the run")
    run.add_argument("--config", metavar="NAME[:variant]",
                     help="stage config, e.g. base or base:tiny (required); override any field with "
                          "--config.a.b=value, e.g. --config.train.num_steps=100")
    run.add_argument("--workdir", metavar="DIR", required=True,
                     help="work directory (local or gs://): checkpoints, metrics, TensorBoard, compiled programs")
    run.add_argument("--overwrite", action=command.BooleanFlag, default=False,
                     help="replace an existing work directory of lavie-train instead of resuming it")
    run.add_argument("--quiet", action=command.BooleanFlag, default=False,
                     help="no progress lines (metrics.jsonl and tb/ are written)")
    cluster = p.add_argument_group("several hosts")
    cluster.add_argument("--distributed", action=command.BooleanFlag, default=False,
                         help="join a multi-process run (jax.distributed; the same command on every host)")
    cluster.add_argument("--coordinator", metavar="HOST:PORT", help="--distributed: address of process 0")
    cluster.add_argument("--num-processes", type=command.bounded_int(1), metavar="N",
                         help="--distributed: number of processes")
    cluster.add_argument("--process-id", type=command.bounded_int(0), metavar="I",
                         help="--distributed: this process's index, 0..N-1")
    command.add_common_flags(p, cache_default=f"WORKDIR/{compile_cache.WORKDIR_SUBDIR}")
    return p


def run(argv: Sequence[str]):
    """Parse `argv` (program name first) and train; returns the TrainResult."""
    args, configs = command.parse_with_configs(build_parser(), argv, ("config",))
    config = configs["config"]
    if config is None:
        raise UsageError("--config is required: a stage config such as base or base:tiny")
    cluster = (args.coordinator, args.num_processes, args.process_id)
    from lavie_jax import parallel  # jax starts here: after the flags are known to be good

    if args.distributed:
        if any(v is not None for v in cluster) and None in cluster:
            raise UsageError("--coordinator, --num-processes and --process-id go together; pass all three or none "
                             "(cluster detection)")
        parallel.initialize_distributed(*cluster)
    elif any(v is not None for v in cluster):
        raise UsageError("--coordinator / --num-processes / --process-id need --distributed")
    from lavie_jax.train.loop import train

    # The default cache lives in the work directory, which must exist (and be ours) first: it is turned on once
    # the work directory is prepared, before the first program of the run compiles.
    choice = command.cache_choice(args, compile_cache.workdir_cache_dir(args.workdir))
    if choice.source != "default":
        compile_cache.configure(choice, prog=PROG)
        on_workdir = None
    else:
        def on_workdir(path: Path) -> None:
            compile_cache.configure(command.cache_choice(args, compile_cache.workdir_cache_dir(path)), prog=PROG)

    return train(config, args.workdir, overwrite=args.overwrite, console=not args.quiet, on_workdir=on_workdir)


def _failure(error: BaseException) -> tuple[str, int]:
    """(message, status) of a failed run: a non-finite loss stops with 3, the rest as every command reports."""
    from lavie_jax.io.save_failures import CheckpointSaveError  # with jax: not needed for --help or a bad flag
    from lavie_jax.train.loop import NonFiniteLossError

    if isinstance(error, NonFiniteLossError):
        return f"stopped: {error}", NONFINITE_STATUS
    if isinstance(error, CheckpointSaveError):  # the machine (a full disk): status 1, said in full
        return f"error: {error}", 1
    return command.failure(error, _user_errors())


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (module docstring; lavie_jax.cli.command for the conventions
    every command shares)."""
    argv = list(sys.argv if argv is None else argv)
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds

    def body() -> None:
        import absl.logging  # orbax and tfds log routine lines through absl

        absl.logging.set_verbosity(absl.logging.WARNING)
        run(argv)

    # The loop handles SIGTERM and the first Ctrl-C itself (it saves at the next step and exits 0). Before and
    # after it, SIGTERM is an interrupt like Ctrl-C (exit 143 rather than a silent death), whose note says what a
    # rerun does (lavie_jax.train.loop.train).
    return command.run_main(PROG, argv[1:], body, handlers=((Exception, _failure),),
                            interrupted="stopped without saving; rerun the same command to resume from the last "
                                        "complete checkpoint",
                            guard=interrupts.terminate_as_interrupt, terminated=(interrupts.Terminated,))


if __name__ == "__main__":
    sys.exit(main())
