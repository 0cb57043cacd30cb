"""`lavie-train`: train one stage of the cascade in a work directory; rerun the same command to resume.

  lavie-train --config configs/base.py:tiny --workdir runs/base-tiny
  lavie-train --config configs/base.py --workdir gs://bucket/runs/base --config.train.init=ckpt/base-init \\
      --config.data.dataset=video_text --config.mesh.shape=-1 --config.mesh.shape=8 ...
  lavie-train --config configs/vsr.py --workdir runs/vsr --config.train.init=ckpt/vsr-init --distributed

`--config FILE[:variant]` is a stage config (configs/base.py, interpolation.py, vsr.py; `:tiny` is CPU sized) and
`--config.a.b=value` overrides any field (its `train` section documents each one). The work directory gets
`checkpoints/` (orbax), `metrics.jsonl`, `tb/` (TensorBoard) and `config.json`; a rerun resumes from the latest
complete checkpoint, and a rerun with a config that changes the run is refused unless `--overwrite` (which only
ever replaces a directory lavie-train made). SIGTERM (preemption) and Ctrl-C save at the next step and exit 0; a
second Ctrl-C exits at once. On several hosts run the same command on each with `--distributed`
(launch/tpu.py, launch/slurm.py): the cluster is detected on Cloud TPU, SLURM and Open MPI, else pass
--coordinator, --num-processes and --process-id.

Exit status: 0 done (or stopped and saved), 2 bad input (one paragraph on stderr names the field or flag and the
fix; `--traceback` adds the traceback), 3 a NaN / infinite loss (the last good checkpoint is kept), 1 an
unexpected failure.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from lavie_jax.runtime import startup
from lavie_jax.cli.config_flags import ConfigArgError, parse_config_flags

# errors that mean "bad input": one paragraph, exit status 2 (imported lazily with jax, see `_user_errors`)


def _user_errors() -> tuple[type[BaseException], ...]:
    from lavie_jax.io.checkpoints import CheckpointError
    from lavie_jax.io.keycheck import KeyMismatchError
    from lavie_jax.models.arch import ConfigError
    from lavie_jax.io.safe_io import OutputPathError
    from lavie_jax.train.setup import TrainConfigError
    from lavie_jax.io.workdir import ConfigMismatchError

    return (ConfigArgError, TrainConfigError, ConfigMismatchError, OutputPathError, CheckpointError, ConfigError,
            KeyMismatchError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lavie-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--config", metavar="FILE[:variant]", help="stage config, e.g. configs/base.py:tiny (required)")
    p.add_argument("--workdir", required=True, help="work directory: checkpoints, metrics, TensorBoard")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing work directory of lavie-train instead of resuming it")
    p.add_argument("--distributed", action="store_true", help="join a multi-process run (jax.distributed)")
    p.add_argument("--coordinator", help="--distributed: address:port of process 0")
    p.add_argument("--num-processes", type=int, help="--distributed: number of processes")
    p.add_argument("--process-id", type=int, help="--distributed: this process's index")
    p.add_argument("--quiet", action="store_true", help="no progress lines (metrics.jsonl and tb/ are written)")
    p.add_argument("--traceback", action="store_true", help="on an error, print the Python traceback too")
    return p


class UsageError(ValueError):
    """Bad or missing command-line flags."""


def run(argv: Sequence[str]):
    """Parse `argv` (program name first) and train; returns the TrainResult."""
    configs, rest = parse_config_flags(argv, ("config",))
    args = build_parser().parse_args(rest[1:])
    config = configs["config"]
    if config is None:
        raise UsageError("--config is required: a stage config such as configs/base.py or configs/base.py:tiny")
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

    return train(config, args.workdir, overwrite=args.overwrite, console=not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (module docstring)."""
    argv = list(sys.argv if argv is None else argv)
    show_traceback = "--traceback" in argv
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    try:
        import absl.logging  # orbax and tfds log routine lines through absl

        absl.logging.set_verbosity(absl.logging.WARNING)
        run(argv)
    except SystemExit as e:  # argparse: usage errors exit 2 after printing, --help exits 0
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - sorted below: user errors in one paragraph, the rest with details
        from lavie_jax.train.loop import NonFiniteLossError

        if show_traceback:
            traceback.print_exc()
        if isinstance(e, NonFiniteLossError):
            print(f"lavie-train: stopped: {e}", file=sys.stderr)
            return 3
        if isinstance(e, (UsageError, *_user_errors())):
            print(f"lavie-train: error: {e}", file=sys.stderr)
            return 2
        if not show_traceback:
            traceback.print_exc()
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves at the next step and exits 0)
        print("lavie-train: interrupted without saving; rerun the same command to resume from the last complete "
              "checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
