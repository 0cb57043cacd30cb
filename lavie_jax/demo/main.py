"""`make demo`: the whole system on a laptop-class CPU, no downloads: data, training of all three stages,
checkpoints, cascade sampling, and a check that the videos show what the prompts say.

    python -m lavie_jax.demo                     # writes outputs/demo/ (a second run only samples again)
    python -m lavie_jax.demo --output DIR

Phases (each prints its progress and time; a phase whose results are on disk is skipped):
  1. data          moving_shapes videos: 1024 at 32x32 and 256 at 128x128, 13 frames each (configs/demo.py)
  2. encoders      train a small KL autoencoder on their frames, draw a random tiny text encoder, write both with
                   the real CLIP tokenizer as the pipeline directory DIR/encoders (lavie_jax.demo.encoders)
  3. precompute    latents + text embeddings of one clip per video, per stage (DIR/data/precomputed_latents)
  4. train         `lavie-train --config STAGE:demo --workdir DIR/runs/STAGE` for base, interpolation
                   and VSR, as three processes at once (`--jobs 1`: one after another); their lines are prefixed
                   with the stage. A rerun resumes from the checkpoints; a finished run is skipped
  5. sample        `lavie-sample` of the cascade for the fixed prompts (PROMPTS) into DIR/{base,interpolation,vsr}/
                   as PROMPT_WITH_UNDERSCORES.{mp4,gif,json}
  6. evaluate      colour / direction / shape accuracy per stage from the decoded frames (lavie_jax.demo.evaluate): the
                   table, DIR/summary.json and DIR/overview.png
  7. fvd           FVD with the real I3D of the interpolation and VSR videos against held-out clips, and of the
                   interpolation run's samples at four points of its training (lavie_jax.demo.fvd): the table,
                   DIR/fvd.json and DIR/fvd_training.png
  8. i2v           image-to-video: the i2v stage fine-tuned from the demo base (DIR/runs/i2v, 60 steps) animates
                   a drawn first frame of the first 8 prompts, checked from pixels (colour, direction, starts from
                   the given frame), and tells a 3-clip story with `lavie-sample --story` (lavie_jax.demo.
                   image_to_video; DIR/i2v/)
  9. long          FreeNoise: the demo base makes 16-frame videos (4x what it trained on), interpolated to 61
                   frames, against plain attention (lavie_jax.demo.long_video; DIR/long/), drawn with the i2v
                   videos in DIR/long_overview.png
 10. personalise   a LoRA teaches the base a colour the data never shows, checked before/after from pixels
                   (lavie_jax.demo.personalise; DIR/personalise/, DIR/runs/base_lora)
Delete DIR (or DIR/runs/STAGE) to train again from scratch. The settings are packaged configs, loaded by name:
`demo` (sources, autoencoder, text encoder width; configs/demo.py) and `STAGE:demo`. Compiled programs are kept in
the user cache (~/.cache/lavie-jax/jax; `--compile-cache DIR` elsewhere, `--no-compile-cache` off), shared by the
demo and its lavie-train runs, so a second demo skips most compiling.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavie_jax.cli import command
from lavie_jax.runtime import compile_cache, startup
from lavie_jax.stages import cascade_after, get_stage

# Held-in prompts (captions of training videos): the first eight name every colour and every direction once, the
# second eight pair them differently.
STAGES = ("base", *(s.name for s in cascade_after("base")))  # the cascade the demo trains and samples
PROMPTS = (
    "a red circle moving left", "a green square moving right", "a blue triangle moving up",
    "a yellow circle moving down", "a purple square moving up-left", "an orange triangle moving up-right",
    "a white circle moving down-left", "a cyan square moving down-right",
    "a red square moving down-right", "a green triangle moving down-left", "a blue circle moving up-right",
    "a yellow square moving up-left", "a purple triangle moving down", "an orange circle moving up",
    "a white square moving right", "a cyan triangle moving left",
)
TARGETS = {"color": 0.9, "direction": 0.8, "shape": 0.8}
TIME_TARGET_S = 15 * 60
YIELDING_NICE = 10  # the nice value of the training runs off the critical path (Demo.train)
PROG = "python -m lavie_jax.demo"


def _rel(path: str | Path) -> str:
    """`path` relative to the working directory when below it (shorter commands to print and store)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class Demo:
    """The phases of the module docstring over one output directory."""

    def __init__(self, output: Path, cache_flags: Sequence[str] = ()):
        from lavie_jax.demo.console import Clock

        self.out = output
        self.cache_flags = list(cache_flags)  # the compilation cache of the lavie-train runs (the demo's own)
        self.data_dir, self.encoders_dir, self.runs = output / "data", output / "encoders", output / "runs"
        self.clock = Clock()
        self.timings_file = output / "timings.json"
        self.built = json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}
        self.skipped: list[str] = []
        self.info: dict[str, Any] = {}
        self._settings = None

    @property
    def settings(self):
        """The packaged `demo` config: moving_shapes sources, autoencoder, text encoder width."""
        if self._settings is None:
            from lavie_jax.cli.config_flags import load_config

            self._settings = load_config("demo")
        return self._settings

    # -------------------------------------------------------------------------------------------- helpers

    def config_arg(self, stage: str) -> str:
        return f"{stage}:demo"

    def overrides(self) -> list[tuple[str, str]]:
        return [("data.data_dir", _rel(self.data_dir)), ("train.encoders", _rel(self.encoders_dir))]

    def config(self, stage: str):
        from lavie_jax.cli.config_flags import load_config

        init = [("train.init", _rel(self.runs / s)) for s in get_stage(stage).init_from[:1]]  # i2v: the demo base
        return load_config(self.config_arg(stage), [*self.overrides(), *init])

    def done(self, phase: str, skipped: bool) -> None:
        """Keep the time of a phase that did its work, so a later run that skips it can still report it."""
        if skipped:
            self.skipped.append(phase)
            return
        self.built[phase] = round(self.clock.phases[phase], 1)
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings_file.write_text(json.dumps(self.built, indent=1) + "\n")

    # -------------------------------------------------------------------------------------------- phases

    def data(self) -> None:
        from lavie_jax.demo import data
        from lavie_jax.demo.console import warn

        sources = self.settings.sources.to_dict()
        with self.clock.phase("data", "moving_shapes videos"):
            skipped = all(data.is_prepared(spec, self.data_dir) for spec in sources.values())
            self.sources = {name: data.prepare(spec, self.data_dir) for name, spec in sources.items()}
            counts = data.caption_counts(self.sources["low"])
            missing = [p for p in PROMPTS if not counts[p]]
            if missing:
                warn(f"prompts that are not training captions (not held-in): {missing}")
            self.info["prompt_videos_in_training_data"] = {p: counts[p] for p in PROMPTS}
        self.done("data", skipped)

    def encoders(self) -> None:
        from lavie_jax.io import checkpoints
        from lavie_jax.demo import data, encoders
        from lavie_jax.demo.console import say
        from lavie_jax.io.text import load_tokenizer

        with self.clock.phase("encoders", "autoencoder (trained here) and text encoder (random)"):
            skipped = (self.encoders_dir / checkpoints.METADATA_FILE).is_file()
            if skipped:
                say(f"found {_rel(self.encoders_dir)}")
                changes = encoders.recipe_changes(checkpoints.read_metadata(self.encoders_dir).get("source", {}),
                                                  self.settings.autoencoder)
                if changes:
                    raise DemoError(f"{_rel(self.encoders_dir)} was trained with a different autoencoder recipe (an "
                                    "older demo?):\n" + "\n".join(f"  {c}" for c in changes) + f"\nDelete "
                                    f"{_rel(self.encoders_dir.parent)} to make the autoencoder, the latents and the "
                                    "stages trained on them again; the demo does not delete it for you.")
            else:
                cfg = self.settings.autoencoder
                low = data.read_frames(self.sources["low"], 512, seed=1)
                high = data.read_frames(self.sources["high"], 64, seed=2)
                say(f"training the autoencoder (block_out_channels {list(cfg.vae.block_out_channels)}, f4) on "
                    f"{len(low)} frames of 32x32 and 32x32 crops of {len(high)} frames of 128x128")
                held_out = {"32x32": data.read_frames(self.sources["low"], 8, seed=3)[::2],
                            "128x128": data.read_frames(self.sources["high"], 4, seed=4)[::4]}
                encoders.make_encoders(self.encoders_dir, cfg, low, high, held_out, self.settings.text_width,
                                       log=say)
            self.vae = checkpoints.load_component(self.encoders_dir, "vae")
            self.text_encoder = checkpoints.load_component(self.encoders_dir, "text_encoder")
            self.tokenizer = load_tokenizer(self.encoders_dir / "tokenizer")
            self.info["encoders"] = checkpoints.read_metadata(self.encoders_dir).get("source", {})
        self.done("encoders", skipped)

    def precompute(self) -> None:
        from lavie_jax.demo import data
        from lavie_jax.demo.console import say
        from lavie_jax.demo.encoders import FrozenEncoders

        with self.clock.phase("precompute", "latents and text embeddings per stage"):
            frozen = FrozenEncoders(self.vae, self.text_encoder, self.tokenizer)
            skipped = True
            for stage in STAGES:
                config = self.config(stage)
                if data.precomputed_exists(config):
                    say(f"{stage}: found {config.data.precomputed.name}")
                    continue
                skipped = False
                d = config.data
                height, width = get_stage(stage).clip_size(d)
                say(f"{stage}: encoding one clip of {d.num_frames} frames of {height}x{width} per video")
                data.precompute_stage(config, frozen.encode_video, frozen.encode_text)
        self.done("precompute", skipped)

    def train(self, jobs: int = len(STAGES)) -> None:
        """`lavie-train` for every stage whose run is not finished, up to `jobs` processes at a time. The stages
        train on the dataset, not on each other's outputs, so they are independent; one run keeps about 1.6 of 2
        cores busy (small kernels), so three at once finish sooner than one after another."""
        from lavie_jax.demo.console import say
        from lavie_jax.demo.parallel_runs import Run, run_all

        runs, self.stage_seconds = [], dict(self.built.get("train_stages", {}))
        configs = {stage: self.config(stage) for stage in STAGES}
        for stage, config in configs.items():
            workdir = self.runs / stage
            latest = finished_run(workdir, config)
            if latest is not None:
                say(f"{stage}: found {_rel(workdir)} at step {latest}")
                continue
            argv = ["lavie-train", "--config", self.config_arg(stage), "--workdir", _rel(workdir),
                    *(f"--config.{k}={v}" for k, v in self.overrides()), *self.cache_flags]
            runs.append(Run(stage, argv, f"{config.train.num_steps} steps of {config.data.global_batch_size} clips"))
        # The run with the most clips to train on (the base) is the critical path; the others yield the CPU to it
        # (nice 10) and take what it leaves. Side by side at one priority the base got ~0.3 of its speed alone for
        # the 7 minutes the others ran, then ran alone on cores it cannot fill (its kernels are small); yielding, it
        # was at step 225 of 600 when they finished, against ~165 (fresh-clone demos, docs/demo_quality.md).
        if len(runs) > 1:
            clips = {r.name: configs[r.name].train.num_steps * configs[r.name].data.global_batch_size for r in runs}
            longest = max(clips, key=clips.get)
            for r in runs:
                r.nice = 0 if r.name == longest else YIELDING_NICE
        what = ", ".join(f"{r.name} ({r.what})" for r in runs) or "nothing left to train"
        with self.clock.phase("train", f"{what}; {min(jobs, max(len(runs), 1))} lavie-train process(es) at a time"):
            self.stage_seconds.update(run_all(runs, jobs, cwd=Path.cwd(), log=say))
        for stage, config in configs.items():
            self.info.setdefault("training", {})[stage] = dict(
                _train_summary(self.runs / stage, config), seconds=self.stage_seconds.get(stage))
        if runs:
            self.built["train_stages"] = {k: round(v, 1) for k, v in self.stage_seconds.items()}
        self.done("train", not runs)

    def sample(self) -> list:
        from lavie_jax.demo.console import say
        from lavie_jax.sampling.cli import run as lavie_sample

        prompt_file = self.out / "prompts.txt"
        prompt_file.write_text("\n".join(PROMPTS) + "\n")
        argv = ["lavie-sample", "--config", self.config_arg("base"), "--checkpoint", _rel(self.runs / "base"),
                "--interpolation", self.config_arg("interpolation"),
                "--interpolation-checkpoint", _rel(self.runs / "interpolation"),
                "--vsr", self.config_arg("vsr"), "--vsr-checkpoint", _rel(self.runs / "vsr"),
                "--prompt-file", _rel(prompt_file), "--output", _rel(self.out), "--overwrite", *self.cache_flags]
        with self.clock.phase("sample", f"the cascade for {len(PROMPTS)} prompts"):
            say(" ".join(shlex.quote(a) for a in argv))
            results = lavie_sample(argv)
        self.done("sample", False)
        return results

    def evaluate(self, results: list) -> dict[str, Any]:
        from lavie_jax.demo import evaluate, fidelity, overview
        from lavie_jax.demo.console import accuracy_table, say

        with self.clock.phase("evaluate", "colour, shape and direction of every video, from its pixels"):
            scores = {r.stage: evaluate.score(list(r.prompts), list(r.frames)) for r in results}
            overview.write(self.out / "overview.png", list(PROMPTS), {r.stage: r.frames for r in results}, scores)
            say(f"wrote {_rel(self.out / 'overview.png')}")
        summary = self.summary(results, scores)
        # each later stage against the video it was given (lavie_jax.demo.fidelity; VSR also against bicubic)
        summary["fidelity"] = {r.stage: fidelity.stage_fidelity(list(given.frames), list(r.frames))
                               for given, r in itertools.pairwise(results)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print("\n" + accuracy_table({s: scores[s] for s in STAGES}, TARGETS), flush=True)
        for stage, f in summary["fidelity"].items():
            extra = (f"; bicubic upscale: {f['bicubic_psnr_to_input']:.1f} dB, {f['bicubic_background_noise']:.2f}"
                     if "bicubic_psnr_to_input" in f else "")
            say(f"{stage} against its input: {f['psnr_to_input']:.1f} dB, background noise "
                f"{f['background_noise']:.2f}{extra}")
        return summary

    def fvd(self, results: list, summary: dict[str, Any]) -> dict[str, Any]:
        from lavie_jax.demo import fvd
        from lavie_jax.demo.console import say

        with self.clock.phase("fvd", "FVD of the cascade and of the interpolation run's samples (real I3D)"):
            measured = fvd.measure(results, self.settings.sources.to_dict(), self.runs, self.out)
        print("\n" + fvd.table(measured), flush=True)
        if "plot" in measured:
            say(f"wrote {_rel(self.out / 'fvd.json')} and {_rel(measured['plot'])}")
        summary["fvd"] = {k: v for k, v in measured.items() if k != "plot"}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    # -------------------------------------------------------------------------------------------- summary

    def summary(self, results: list, scores: dict[str, dict]) -> dict[str, Any]:
        import jax

        phases = {k: round(v, 1) for k, v in self.clock.phases.items()}
        first_run = {k: self.built.get(k, phases.get(k)) for k in phases}
        met = {s: all(scores[s][f"{k}_accuracy"] >= t for k, t in TARGETS.items()) for s in STAGES}
        build_total = sum(v for v in first_run.values() if v is not None)
        return {
            "prompts": list(PROMPTS),
            "targets": {**TARGETS, "seconds": TIME_TARGET_S},
            "accuracy": {s: {k: scores[s][f"{k}_accuracy"] for k in ("color", "direction", "both", "shape")}
                         for s in STAGES},
            "accuracy_targets_met": met,
            "per_prompt": {s: scores[s]["per_prompt"] for s in STAGES},
            "timings_s": {
                "this_run": phases, "this_run_total": round(self.clock.total, 1), "skipped_this_run": self.skipped,
                "when_built": first_run, "when_built_total": round(build_total, 1),
                "note": "when_built: each phase's time in the run that did its work (training skipped on reruns)",
            },
            "training": self.info.get("training", {}),
            "encoders": self.info.get("encoders", {}),
            "sampling": {r.stage: {"sampler": r.options.sampler, "steps": r.options.steps,
                                   "guidance_scale": r.options.guidance_scale, "seed": r.seed,
                                   "video_shape": list(r.frames.shape[1:]), "fps": r.fps} for r in results},
            "prompt_videos_in_training_data": self.info.get("prompt_videos_in_training_data", {}),
            "files": {"videos": {s: _rel(self.out / s) for s in STAGES}, "overview": _rel(self.out / "overview.png"),
                      "summary": _rel(self.out / "summary.json"), "encoders": _rel(self.encoders_dir),
                      "training_runs": {s: _rel(self.runs / s) for s in STAGES}, "data": _rel(self.data_dir)},
            "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind},
        }


class DemoError(RuntimeError):
    """Something on disk the demo will not use or replace by itself; the message says what to do."""


def finished_run(workdir: Path, config) -> int | None:
    """The latest step of the finished run in `workdir`, which must have been trained with `config` (DemoError
    otherwise); None when there is no run or it has not reached `train.num_steps`."""
    from lavie_jax.io import workdir as workdirs

    if not workdirs.is_workdir(workdir):
        return None
    with workdirs.TrainCheckpointer(workdir, save_every=0, read_only=True) as ckpt:
        latest = ckpt.latest_step()
    if latest is None or latest < config.train.num_steps:
        return None
    _check_unchanged(workdir, config)
    return latest


def _check_unchanged(workdir: Path, config) -> None:
    """A finished run is reused only if it was trained with this config (e.g. not by an older version of the demo)."""
    from lavie_jax.io import workdir as workdirs
    from lavie_jax.train.loop import CONFIG_FILE

    stored = workdir / CONFIG_FILE
    try:
        workdirs.check_config(stored.read_text() if stored.is_file() else None, config)
    except workdirs.ConfigMismatchError as e:
        fields = "\n".join(f"  {d}" for d in e.differences)
        raise DemoError(f"{_rel(workdir)} was trained with a different config (an older demo?):\n{fields}\n"
                        f"Delete {_rel(workdir)} (or all of {_rel(workdir.parent.parent)}) to train it again; the "
                        "demo does not delete it for you.") from None


def _train_summary(workdir: Path, config) -> dict[str, Any]:
    """Steps, the last logged losses and the time of a training run, from its metrics.jsonl."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").is_file() else []
    rows = [row for row in map(json.loads, lines) if "loss" in row]  # training lines (not evaluation ones)
    last = rows[-1] if rows else {}
    return {"workdir": _rel(workdir), "steps": last.get("step"), "num_steps": config.train.num_steps,
            "batch": config.data.global_batch_size, "final_loss": last.get("loss"), "lr": config.train.optimizer.lr,
            "clip_shape": [config.data.num_frames, *get_stage(config.stage).clip_size(config.data)]}


def closing(summary: dict[str, Any], demo: Demo) -> None:
    from lavie_jax.demo.console import duration, say
    from lavie_jax.demo.personalise import TOKEN

    t = summary["timings_s"]
    # every phase of this run, the ones after the summary was first written included (fvd, long, personalise)
    t["this_run"] = {k: round(v, 1) for k, v in demo.clock.phases.items()}
    t["this_run_total"] = round(demo.clock.total, 1)
    (demo.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    say("phases this run: " + ", ".join(f"{k} {duration(v)}" for k, v in t["this_run"].items()))
    if t["skipped_this_run"]:
        say(f"found on disk (not redone): {', '.join(t['skipped_this_run'])}; when built, everything took "
            f"{duration(t['when_built_total'])}")
    say(f"total this run: {duration(t['this_run_total'])}")
    say("files:")
    for stage, path in summary["files"]["videos"].items():
        say(f"  {stage:<14} {path}/  (mp4, gif, json per prompt)")
    for what in ("overview", "summary", "encoders", "data"):
        say(f"  {what:<14} {summary['files'][what]}")
    say(f"  {'training runs':<14} {_rel(demo.runs)}/{{base,interpolation,vsr,i2v,base_lora}} (checkpoints, "
        "metrics.jsonl, tb/)")
    say(f"  {'image-to-video':<14} {_rel(demo.out / 'i2v')}/ (overview.png, summary.json, story/)")
    say(f"  {'long videos':<14} {_rel(demo.out / 'long')}/ and {_rel(demo.out / 'long_overview.png')}")
    say(f"  {'personalised':<14} {_rel(demo.out / 'personalise')}/ ({TOKEN}.safetensors: the LoRA; overview_old.png, "
        "overview_new.png, summary.json)")


def build_parser() -> command.ArgumentParser:
    p = command.make_parser(PROG, __doc__)
    p.add_argument("--output", default="outputs/demo", metavar="DIR",
                   help="where everything goes (default: %(default)s)")
    p.add_argument("--jobs", type=command.bounded_int(1), default=len(STAGES), metavar="N",
                   help=f"lavie-train processes at a time (default: {len(STAGES)}, every stage at once)")
    command.add_common_flags(p, cache_default=compile_cache.USER_DIR_HELP)
    return p


def _cache_flags(directory: str | None) -> list[str]:
    """The compilation cache the demo uses, for its lavie-train runs: one cache for every process of the demo."""
    return ["--compile-cache", directory] if directory else ["--no-compile-cache"]


def _run(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    # compiled programs are kept for the next run (which then only samples), and shared with the lavie-train runs
    cache = compile_cache.configure(command.cache_choice(args, compile_cache.user_cache_dir()), prog=PROG)
    import absl.logging

    absl.logging.set_verbosity(absl.logging.WARNING)  # tfds / orbax info lines would drown the progress
    from lavie_jax.demo.console import say

    say(f"lavie-jax demo: data, autoencoder, three stages trained with lavie-train, the cascade sampled with "
        f"lavie-sample, checked from pixels; everything goes to {_rel(out)}/ (compiled programs: "
        f"{cache or 'not kept'})")
    demo = Demo(out, cache_flags=_cache_flags(cache))
    demo.data()
    demo.encoders()
    demo.precompute()
    demo.train(args.jobs)
    results = demo.sample()
    summary = demo.evaluate(results)
    summary = demo.fvd(results, summary)
    from lavie_jax.demo.image_to_video import image_to_video  # 8. docs/image_to_video.md
    from lavie_jax.demo.long_video import PROMPT_COUNT, long_videos  # 9. docs/long_video.md

    i2v = image_to_video(demo, PROMPTS[:PROMPT_COUNT])
    more = i2v.pop("overview")
    summary["image_to_video"] = i2v
    with demo.clock.phase("long", "FreeNoise long videos of the demo base, interpolated, against plain attention"):
        summary["long_video"] = long_videos(out, demo.runs, PROMPTS[:PROMPT_COUNT], demo.cache_flags, more=more)
    demo.done("long", False)
    from lavie_jax.demo.personalise import personalise  # 10. a LoRA teaches the base a colour (docs/lora.md)

    personalise(demo, summary)
    closing(summary, demo)


def _run_failed(error: BaseException) -> tuple[str, int]:
    return f"error: {error}", 1  # a lavie-train run failed; its output's end is in the message


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lavie_jax.demo`; returns the exit status: 0 done, 2 something on disk the demo will not use
    (DemoError: the message says what to delete) or a bad flag, 1 a training run failed or an unexpected error,
    130 / 143 interrupted (the training runs save their checkpoints; a rerun resumes). Messages follow
    lavie_jax.cli.command."""
    from lavie_jax.demo.parallel_runs import RunFailed
    from lavie_jax.io.interrupts import Terminated, terminate_as_interrupt

    argv = list(sys.argv[1:] if argv is None else argv)
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    return command.run_main(PROG, argv, lambda: _run(argv), user_errors=(DemoError,),
                            handlers=((RunFailed, _run_failed),), interrupted="run it again to resume",
                            guard=terminate_as_interrupt, terminated=(Terminated,))
