"""Personalisation data (DreamBooth style) for a LoRA run: a folder of short clips and/or images of a new subject,
style or motion, captioned from a template holding a rare token, optionally mixed with prior-preservation samples
(videos the base model itself made for the class prompt), written as the tables the `video_text` / `image_text`
datasets read.

    python -m lavie_jax.data.personal --instance shots/ --caption "a video of a sks teapot spinning" \\
        --prior prior/ --prior-caption "a video of a teapot spinning" --output data/teapot
    lavie-train --config base --config.train.init=ckpt/base \\
        --config.train.lora.rules="((r'attn[12]\\.to_(q|k|v|out)$', 8),)" \\
        --config.data.dataset=video_text --config.data.video_text.csv=data/teapot/videos.csv \\
        --config.data.images.source=image_text --config.data.image_text.table=data/teapot/images.csv ...

Clips (`VIDEO_SUFFIXES`) go to `videos.csv`, images (`IMAGE_SUFFIXES`) to `images.csv`, each row `path,caption`
with absolute paths. The caption template may use `{stem}` (the file's name without suffix). Prior samples are
captioned by `--prior-caption`, else by the prompt in their `lavie-sample` JSON sidecar. DreamBooth's prior loss
(weight 1 over batches with as many prior as instance examples) becomes a mixing ratio here: the rows are repeated
so that prior examples are `prior_weight` times as many as instance ones (the loss is a mean over the batch).
"""

from __future__ import annotations

import argparse
import csv
import json
from fractions import Fraction
import os
from collections.abc import Sequence
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PersonalDataError(ValueError):
    """A personalisation folder or caption cannot make a dataset; the message names the flag and the fix."""


def _files(folder: Path, flag: str) -> tuple[list[Path], list[Path]]:
    if not folder.is_dir():
        raise PersonalDataError(f"{flag} {folder}: no such directory")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    videos = [p.resolve() for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    images = [p.resolve() for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not videos and not images:
        raise PersonalDataError(f"{flag} {folder} holds no clips ({', '.join(VIDEO_SUFFIXES)}) or images "
                                f"({', '.join(IMAGE_SUFFIXES)})")
    return videos, images


def _caption(template: str, path: Path, flag: str) -> str:
    try:
        text = template.format(stem=path.stem.replace("_", " "))
    except (KeyError, IndexError, ValueError) as e:
        raise PersonalDataError(f"{flag} {template!r}: only {{stem}} may be filled in ({e})") from None
    if not text.strip():
        raise PersonalDataError(f"{flag} is empty for {path.name}; write a caption with the rare token")
    return text


def _prior_caption(path: Path, caption: str | None) -> str:
    if caption:
        return caption
    sidecar = path.with_suffix(".json")
    try:
        prompt = json.loads(sidecar.read_text()).get("prompt") if sidecar.is_file() else None
    except (OSError, ValueError):
        prompt = None
    if not prompt:
        raise PersonalDataError(f"--prior {path.parent}: {path.name} has no lavie-sample sidecar with its prompt; "
                                "pass --prior-caption CLASS_PROMPT")
    return str(prompt)


def build_tables(instance: str | os.PathLike, caption: str, output: str | os.PathLike, *,
                 prior: str | os.PathLike | None = None, prior_caption: str | None = None,
                 prior_weight: float = 1.0, token: str | None = None) -> dict[str, int]:
    """Write `output/videos.csv` and/or `output/images.csv` (module docstring); returns rows per table. `token`,
    when given, must be a word of every instance caption (one without it teaches the class, not the subject)."""
    if prior is not None and not prior_weight > 0:
        raise PersonalDataError(f"--prior-weight must be > 0, got {prior_weight}")
    videos, images = _files(Path(instance), "--instance")
    rows = {"videos": [(p, _caption(caption, p, "--caption")) for p in videos],
            "images": [(p, _caption(caption, p, "--caption")) for p in images]}
    lacking = [c for table in rows.values() for _, c in table if token and token not in c.split()]
    if lacking:
        raise PersonalDataError(f"--caption {caption!r} gives {lacking[0]!r}, without the rare token {token!r}: "
                                "put the token in the template (or in the file names, with {stem})")
    if prior is not None:
        pv, pi = _files(Path(prior), "--prior")
        for name, found in (("videos", pv), ("images", pi)):
            own = rows[name]
            if not found or not own:
                continue
            # repeat each side a whole number of times so that prior / instance rows come near prior_weight
            ratio = Fraction(prior_weight * len(own) / len(found)).limit_denominator(8)
            reps_own, reps_prior = ratio.denominator, max(1, ratio.numerator)
            rows[name] = own * reps_own + [(p, _prior_caption(p, prior_caption)) for p in found] * reps_prior
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, table in rows.items():
        if not table:
            continue
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "caption"])
            writer.writerows((str(p), c) for p, c in table)
        counts[name] = len(table)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lavie_jax.data.personal", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instance", required=True, metavar="DIR", help="clips and/or images of the new concept")
    p.add_argument("--caption", required=True, metavar="TEXT", help="caption template with the rare token "
                                                                     "({stem}: the file name)")
    p.add_argument("--token", metavar="WORD", help="the rare token: checked to be in every instance caption")
    p.add_argument("--prior", metavar="DIR", help="prior-preservation samples of the class (lavie-sample output)")
    p.add_argument("--prior-caption", metavar="TEXT", help="their caption (default: each sidecar's prompt)")
    p.add_argument("--prior-weight", type=float, default=1.0, help="prior examples per instance example")
    p.add_argument("--output", required=True, metavar="DIR", help="where videos.csv / images.csv are written")
    args = p.parse_args(argv)
    try:
        counts = build_tables(args.instance, args.caption, args.output, prior=args.prior,
                              prior_caption=args.prior_caption, prior_weight=args.prior_weight, token=args.token)
    except PersonalDataError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    for name, n in counts.items():
        print(f"wrote {Path(args.output) / name}.csv: {n} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
