"""Prepares a dataset once, before training (a run over millions of rows belongs here, not in a training launch).

    python -m lavie_jax.data.prepare video_text --csv results_10M_train.csv --video_dir /data/webvid/videos \\
        --storage mp4 --data_dir /data/tfds
    python -m lavie_jax.data.prepare image_text --table laion_part0.parquet --image_dir /data/laion --storage encoded \\
        --min_size 1024
    python -m lavie_jax.data.prepare moving_shapes --num_videos 1024 --height 64 --width 96

Prints progress while decoding and a summary of skipped rows at the end (also saved as prepare_report.json). Use
the same settings in the training config's `data` section so the pipeline finds this dataset.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavie_jax.cli import command
from lavie_jax.data import builder_utils, image_text, moving_shapes, video_text
from lavie_jax.io.interrupts import Terminated, terminate_as_interrupt
from lavie_jax.io.safe_io import OutputPathError, check_location

PROG = "python -m lavie_jax.data.prepare"
_DATASETS = {
    "video_text": (video_text.builder, video_text.VideoTextConfig, video_text.VideoText),
    "image_text": (image_text.builder, image_text.ImageTextConfig, image_text.ImageText),
    "moving_shapes": (moving_shapes.builder, moving_shapes.MovingShapesConfig, moving_shapes.MovingShapes),
}
# folders of the files a table names; the tables themselves are the builder's TABLE_FIELDS
_FOLDER_FIELDS = ("video_dir", "image_dir")
# numbers that must be at least 1 (every other number must be at least 0); sizes of the generated videos too
_POSITIVE = {"num_workers", "num_videos", "num_frames", "max_frames"}
_POSITIVE_BY_DATASET = {"moving_shapes": {"height", "width", "fps"}}


UsageError = command.UsageError  # a bad command line: the message names the flag and what it takes
# bad input (one paragraph, exit status 2); ValueError: the builders' checks of settings and tables (a header,
# every row skipped)
USER_ERRORS = (OutputPathError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


def _parser() -> command.ArgumentParser:
    parser = command.make_parser(PROG, __doc__)
    command.add_common_flags(parser, cache_default=None)  # no compiling here: no cache flags
    sub = parser.add_subparsers(dest="dataset", required=True,
                                help="the dataset to prepare (NAME --help lists its settings)")
    for name, (_, config_cls, _) in _DATASETS.items():
        p = sub.add_parser(name, help=f"{name} (fields of {config_cls.__name__})",
                           description=f"{name}: the fields of {config_cls.__name__}")
        p.add_argument("--data_dir", default=None, help="tfds data_dir (default: tfds' ~/tensorflow_datasets)")
        if name != "moving_shapes":
            p.add_argument("--name", default="webvid" if name == "video_text" else "laion", help="config name prefix")
        for field, default in builder_utils.config_params(config_cls(name="defaults")).items():
            if isinstance(default, tuple):  # e.g. moving_shapes --radius LOW HIGH
                p.add_argument(f"--{field}", nargs=len(default), type=type(default[0]), default=default,
                               metavar=field.upper(), help=f"default: {' '.join(map(str, default))}")
            else:
                p.add_argument(f"--{field}", type=type(default), default=default, help=f"default: {default!r}")
        command.add_common_flags(p, cache_default=None, in_subcommand=True)
    return parser


def _check(dataset: str, args: dict[str, Any]) -> None:
    """Every check that needs no file to be read: required tables, paths that exist, numbers in range."""
    builder_cls = _DATASETS[dataset][2]
    tables = getattr(builder_cls, "TABLE_FIELDS", ()) if issubclass(builder_cls, builder_utils.TableBuilder) else ()
    if tables and not args[tables[0]]:
        raise UsageError(f"{dataset} needs --{tables[0]} PATH, the metadata table (CSV or parquet) of its rows")
    for field in tables:
        path = Path(args[field]) if args[field] else None
        if path is not None and not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise UsageError(f"--{field} {path} {what}; pass the path of the CSV or parquet table")
    for field in _FOLDER_FIELDS:
        if args.get(field) and not Path(args[field]).is_dir():
            what = "is a file" if Path(args[field]).exists() else "does not exist"
            raise UsageError(f"--{field} {args[field]} {what}; pass the folder the table's paths are relative to")
    positive = _POSITIVE | _POSITIVE_BY_DATASET.get(dataset, set())
    for field, value in args.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low = 1 if field in positive else 0
            if value < low:
                raise UsageError(f"--{field} {value}: expected {'a positive' if low else 'a non-negative'} number")
    if args.get("data_dir"):
        check_location(args["data_dir"], flag="--data_dir")


def _prepare(argv: Sequence[str]) -> None:
    args = vars(_parser().parse_args(argv))
    for common in ("traceback", "flagfile"):
        args.pop(common, None)
    dataset = args.pop("dataset")
    _check(dataset, args)
    make = _DATASETS[dataset][0]
    builder = make(args.pop("data_dir"), **args)
    existed = builder_utils.is_prepared(builder)
    builder_utils.prepare(builder)
    print(f"{dataset} ready at {builder.data_dir}", file=sys.stderr)
    if existed:
        print("(it was prepared before with these settings; no rows were read)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare one dataset; returns the exit status: 0 done, 2 bad input (one message on stderr saying what and
    how to fix it; --traceback adds the traceback), 1 an unexpected failure, 130 / 143 interrupted (the
    conventions of every command: lavie_jax.cli.command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return command.run_main(PROG, argv, lambda: _prepare(argv), user_errors=USER_ERRORS,
                            interrupted="run the same command again to prepare the dataset from the start",
                            guard=terminate_as_interrupt, terminated=(Terminated,))


if __name__ == "__main__":
    sys.exit(main())
