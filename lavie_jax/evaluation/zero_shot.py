"""The LaVie paper's zero-shot protocols, end to end: `lavie-eval ucf101` and `lavie-eval msrvtt`.

    lavie-eval ucf101 --checkpoint ckpt/base --real UCF-101/ --per-class 100 --workdir eval/ucf101 [--c3d c3d.pt]
    lavie-eval msrvtt --checkpoint ckpt/base --captions msrvtt_test.csv --clip clip-vit-base-patch32/ --workdir eval/m

`ucf101`: the 101 UCF-101 class names as prompts (CamelCase split into lower-case words: "ApplyEyeMakeup" ->
"apply eye makeup"; the paper says only "class names"), `--per-class` videos each (the paper: 100, 10,100 videos
of 16 x 320 x 512), sampled with the checkpoint over the mesh into `WORKDIR/videos` (named `KKK_ClassName.mp4`, so
the first N in sorted order cover every class evenly), then FVD against the real clips (`--real`: a folder of UCF-101
videos, e.g. the .avi files, or a stats file; every video of both sets by default) and, with `--c3d`, the IS.
`msrvtt`: one video per row of a `video,caption` CSV (the paper: the 2,990 test captions), then CLIPSIM.
Each video's noise comes from its position in the protocol (`StageSampler.sample(indices=...)`), so a killed
evaluation rerun with the same flags samples only the missing videos, gets the same ones it would have, and reads
the features it already computed (`WORKDIR/cache`).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

UCF101_CLASSES = (
    "ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching", "BaseballPitch",
    "Basketball", "BasketballDunk", "BenchPress", "Biking", "Billiards", "BlowDryHair", "BlowingCandles",
    "BodyWeightSquats", "Bowling", "BoxingPunchingBag", "BoxingSpeedBag", "BreastStroke", "BrushingTeeth",
    "CleanAndJerk", "CliffDiving", "CricketBowling", "CricketShot", "CuttingInKitchen", "Diving", "Drumming",
    "Fencing", "FieldHockeyPenalty", "FloorGymnastics", "FrisbeeCatch", "FrontCrawl", "GolfSwing", "Haircut",
    "Hammering", "HammerThrow", "HandstandPushups", "HandstandWalking", "HeadMassage", "HighJump", "HorseRace",
    "HorseRiding", "HulaHoop", "IceDancing", "JavelinThrow", "JugglingBalls", "JumpingJack", "JumpRope", "Kayaking",
    "Knitting", "LongJump", "Lunges", "MilitaryParade", "Mixing", "MoppingFloor", "Nunchucks", "ParallelBars",
    "PizzaTossing", "PlayingCello", "PlayingDaf", "PlayingDhol", "PlayingFlute", "PlayingGuitar", "PlayingPiano",
    "PlayingSitar", "PlayingTabla", "PlayingViolin", "PoleVault", "PommelHorse", "PullUps", "Punch", "PushUps",
    "Rafting", "RockClimbingIndoor", "RopeClimbing", "Rowing", "SalsaSpin", "ShavingBeard", "Shotput",
    "SkateBoarding", "Skiing", "Skijet", "SkyDiving", "SoccerJuggling", "SoccerPenalty", "StillRings",
    "SumoWrestling", "Surfing", "Swing", "TableTennisShot", "TaiChi", "TennisSwing", "ThrowDiscus",
    "TrampolineJumping", "Typing", "UnevenBars", "VolleyballSpiking", "WalkingWithDog", "WallPushups",
    "WritingOnBoard", "YoYo",
)


class ZeroShotError(ValueError):
    """A zero-shot protocol cannot run with these inputs; the message names the flag and the fix."""


def class_prompt(name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup', 'YoYo' -> 'yo yo'."""
    return " ".join(w.lower() for w in re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", name))


def ucf101_requests(per_class: int) -> tuple[list[str], list[str]]:
    """(prompts, file stems) of the protocol, round-robin over the classes: `KKK_ClassName` for k < per_class."""
    prompts, stems = [], []
    for k in range(per_class):
        for name in UCF101_CLASSES:
            prompts.append(class_prompt(name))
            stems.append(f"{k:03d}_{name}")
    return prompts, stems


def msrvtt_requests(path: str | Path) -> tuple[list[str], list[str]]:
    """(captions, stems) of a `video,caption` CSV; the stem is the video column without its suffix."""
    path = Path(path)
    if not path.is_file():
        raise ZeroShotError(f"--captions {path}: no such file; give a CSV with the columns video,caption")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"video", "caption"} <= set(rows[0]):
        raise ZeroShotError(f"--captions {path}: expected a header row with the columns video,caption")
    stems = [Path(r["video"].strip()).stem or f"row{i}" for i, r in enumerate(rows)]
    if len(set(stems)) != len(stems):
        raise ZeroShotError(f"--captions {path}: the video column repeats a name; each row needs its own video")
    return [r["caption"] for r in rows], stems


# ------------------------------------------------------------------------------------------------ sampling

def _config(args: argparse.Namespace):
    from lavie_jax.cli.config_flags import apply_overrides, is_run, load_config, run_config

    overrides = [tuple(o.split("=", 1)) for o in args.set]
    if any(len(o) != 2 for o in overrides):
        raise ZeroShotError("--set takes FIELD=VALUE, e.g. --set sample.steps=25")
    if args.config is None and is_run(Path(args.checkpoint)):
        config = run_config(Path(args.checkpoint))
        apply_overrides(config, overrides)
        return config
    return load_config(args.config or "base", overrides)


def generate(args: argparse.Namespace, prompts: Sequence[str], stems: Sequence[str], directory: Path) -> int:
    """Sample the videos of `stems` missing in `directory` (module docstring); returns how many were sampled."""
    from lavie_jax import parallel
    from lavie_jax.evaluation import report
    from lavie_jax.sampling.outputs import write_result
    from lavie_jax.sampling.pipeline import load_stage_pipeline
    from lavie_jax.sampling.sampler import StageSampler

    _check_same_request(args, directory.parent)
    missing = [i for i, stem in enumerate(stems) if not (directory / f"{stem}.json").is_file()]
    if not missing:
        return 0
    config = _config(args)
    mesh = parallel.make_mesh((-1, 1, 1, 1))
    sampler = StageSampler(config, load_stage_pipeline(config, args.checkpoint, mesh), mesh)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"lavie-eval: sampling {len(missing)} of {len(stems)} videos into {directory}", file=sys.stderr)
    with report.progress(len(missing), "sampling", args.progress) as bar:
        for start in range(0, len(missing), args.sample_batch):
            rows = missing[start:start + args.sample_batch]
            result = sampler.sample([prompts[i] for i in rows], seed=args.seed, indices=rows)
            write_result(result, directory, config=config, indices=rows, stems=[stems[i] for i in rows],
                         overwrite=True)  # a video cut short by a kill has no sidecar yet: written again
            bar.update(len(rows))
    return len(missing)


REQUEST_FILE = "request.json"


def _check_same_request(args: argparse.Namespace, work: Path) -> None:
    """A work directory holds the videos of one request (checkpoint, config, overrides, seed): a rerun with the same
    flags continues it; other flags would mix videos of two models, so they are refused."""
    import json

    request = {"checkpoint": str(args.checkpoint), "config": args.config, "set": list(args.set), "seed": args.seed}
    path = work / REQUEST_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != request:
            changed = [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in request.items() if stored.get(k) != v]
            raise ZeroShotError(f"--workdir {work} holds videos sampled with other flags ({'; '.join(changed)}); "
                                "rerun with the same flags to continue it, or use another --workdir")
        return
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(request, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ commands

def add_subcommands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add `ucf101` and `msrvtt` to lavie-eval's parser (`add(name, help)` makes a subcommand with the shared
    flags)."""
    from lavie_jax.cli import command
    from lavie_jax.evaluation.fvd import FVD_PROTOCOLS

    def sampling(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, metavar="DIR",
                       help="base-stage pipeline directory (lavie-convert), lavie-train work directory or 'random'")
        p.add_argument("--config", metavar="NAME[:variant]", help="stage config (default: the work directory's, "
                                                                  "else base)")
        p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a config field, e.g. --set sample.steps=25 (repeatable)")
        p.add_argument("--workdir", required=True, metavar="DIR", help="videos, features and the report go here")
        p.add_argument("--seed", type=command.bounded_int(0), default=0, metavar="N")
        p.add_argument("--sample-batch", type=command.bounded_int(1), default=4, metavar="N",
                       help="prompts per sampling call (default %(default)s)")

    p = add("ucf101", "zero-shot UCF-101: class names as prompts -> FVD against real clips (+ IS with --c3d)")
    sampling(p)
    p.add_argument("--real", required=True, metavar="DIR|STATS", help="UCF-101 videos or their stats file")
    p.add_argument("--per-class", type=command.bounded_int(1), default=100, metavar="N")
    p.add_argument("--protocol", choices=sorted(FVD_PROTOCOLS), default="fvd_ucf101_zeroshot",
                   help="FVD protocol (default %(default)s: StyleGAN-V's pixels and statistics, LaVie's 10,100 "
                        "clips; docs/evaluation.md)")
    p.add_argument("--i3d", metavar="FILE")
    p.add_argument("--num-videos", type=command.bounded_int(0), default=0, metavar="N",
                   help="videos per set for FVD (default 0: all of each set)")
    p.add_argument("--c3d", metavar="FILE", help="also the IS under this UCF-101 C3D")
    p = add("msrvtt", "zero-shot MSR-VTT: one video per caption -> CLIPSIM")
    sampling(p)
    p.add_argument("--captions", required=True, metavar="CSV", help="video,caption table")
    p.add_argument("--clip", required=True, metavar="DIR|FILE", help="CLIP ViT-B/32 (HF folder or OpenAI .pt)")


def run_ucf101(args: argparse.Namespace) -> None:
    from lavie_jax.evaluation import folders
    from lavie_jax.evaluation import report as report_lib
    from lavie_jax.evaluation.fvd import I3DFeatures, VideoStats, fvd
    from lavie_jax.evaluation.videos import list_videos
    from lavie_jax.parallel import make_mesh

    work = Path(args.workdir)
    output = Path(args.output) if args.output else work / "report.json"
    report_lib.check_report_path(output)
    real_is_stats = Path(args.real).is_file()
    if not real_is_stats:
        list_videos(args.real)  # a bad --real fails before hours of sampling
    started = time.monotonic()
    prompts, stems = ucf101_requests(args.per_class)
    sampled = generate(args, prompts, stems, work / "videos")
    mesh = make_mesh((-1, 1, 1, 1))
    i3d = I3DFeatures(args.i3d, protocol=args.protocol, batch_size=args.batch_size, mesh=mesh)
    generated = list_videos(work / "videos")
    limit = args.num_videos or None
    fake, _ = folders.fvd_stats(generated, i3d, real=False, num_videos=limit or len(generated),
                                cache_dir=work / "cache", progress=args.progress)
    if real_is_stats:
        real = VideoStats.load(args.real)
    else:
        paths = list_videos(args.real)
        real, _ = folders.fvd_stats(paths, i3d, real=True, num_videos=limit or len(paths), seed=args.seed,
                                    cache_dir=work / "cache", progress=args.progress, source=args.real)
    result = {"fvd": float(fvd(real, fake)), "protocol": args.protocol, "generated": int(fake.count),
              "real": int(real.count), "per_class": args.per_class, "sampled_now": sampled,
              "checkpoint": args.checkpoint}
    rows = [["FVD", result["fvd"]]]
    if args.c3d:
        from lavie_jax.evaluation.inception_score import C3DProbabilities

        c3d = C3DProbabilities(args.c3d, batch_size=args.batch_size, mesh=mesh)
        mean, std, _ = folders.inception_score(generated, c3d, batch_size=args.batch_size,
                                               num_videos=limit or len(generated),
                                               cache_dir=work / "cache", progress=args.progress)
        result |= {"is": mean, "is_std": std}
        rows.append(["IS", mean])
    result["seconds"] = round(time.monotonic() - started, 2)
    print(report_lib.table(["metric", "value"], rows), flush=True)
    print(f"lavie-eval: wrote {report_lib.write_report(output, result)}", file=sys.stderr)


def run_msrvtt(args: argparse.Namespace) -> None:
    from lavie_jax.evaluation import folders
    from lavie_jax.evaluation import report as report_lib
    from lavie_jax.evaluation.clipsim import CLIPScorer
    from lavie_jax.parallel import make_mesh

    work = Path(args.workdir)
    output = Path(args.output) if args.output else work / "report.json"
    report_lib.check_report_path(output)
    captions, stems = msrvtt_requests(args.captions)
    started = time.monotonic()
    sampled = generate(args, captions, stems, work / "videos")
    scorer = CLIPScorer(args.clip, batch_size=max(16, args.batch_size), mesh=make_mesh((-1, 1, 1, 1)))
    paths = [work / "videos" / f"{s}.mp4" for s in stems]
    mean, _ = folders.clipsim(paths, captions, scorer, cache_dir=work / "cache", progress=args.progress)
    result = {"clipsim": mean, "videos": len(paths), "sampled_now": sampled, "checkpoint": args.checkpoint,
              "clip": args.clip, "seconds": round(time.monotonic() - started, 2)}
    print(report_lib.table(["metric", "value"], [["CLIPSIM", mean]]), flush=True)
    print(f"lavie-eval: wrote {report_lib.write_report(output, result)}", file=sys.stderr)


HANDLERS = {"ucf101": run_ucf101, "msrvtt": run_msrvtt}


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors of the protocols that are bad input (one line, exit status 2)."""
    from lavie_jax.cli.config_flags import ConfigArgError
    from lavie_jax.io.checkpoints import CheckpointError
    from lavie_jax.sampling.outputs import OutputError
    from lavie_jax.sampling.pipeline import PipelineError
    from lavie_jax.stages import RequestError

    return ZeroShotError, ConfigArgError, CheckpointError, OutputError, PipelineError, RequestError
