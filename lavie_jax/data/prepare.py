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

import argparse
import sys
from collections.abc import Sequence

from lavie_jax.data import builder_utils, image_text, moving_shapes, video_text

_DATASETS = {
    "video_text": (video_text.builder, video_text.VideoTextConfig),
    "image_text": (image_text.builder, image_text.ImageTextConfig),
    "moving_shapes": (moving_shapes.builder, moving_shapes.MovingShapesConfig),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lavie_jax.data.prepare", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    for name, (_, config_cls) in _DATASETS.items():
        p = sub.add_parser(name, help=f"{name} (fields of {config_cls.__name__})")
        p.add_argument("--data_dir", default=None, help="tfds data_dir (default: tfds' ~/tensorflow_datasets)")
        if name != "moving_shapes":
            p.add_argument("--name", default="webvid" if name == "video_text" else "laion", help="config name prefix")
        for field, default in builder_utils.config_params(config_cls(name="defaults")).items():
            p.add_argument(f"--{field}", type=type(default), default=default, help=f"default: {default!r}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    dataset = args.pop("dataset")
    make, _ = _DATASETS[dataset]
    builder = make(args.pop("data_dir"), **args)
    existed = builder_utils.is_prepared(builder)
    builder_utils.prepare(builder)
    print(f"{dataset} ready at {builder.data_dir}", file=sys.stderr)
    if existed:
        print("(it was prepared before with these settings; no rows were read)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
