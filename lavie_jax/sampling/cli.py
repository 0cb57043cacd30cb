"""`lavie-sample`: prompts in, videos out, for one stage or a run of the cascade.

  lavie-sample --config base --checkpoint ckpt/base --prompt "a panda taking a selfie" --output res
  lavie-sample --config base:tiny --checkpoint random --prompt-file prompts.txt --output res \\
      --config.sample.steps=25 --seed 3
  lavie-sample --config base --checkpoint ckpt/base --prompt "a corgi" --output res \\
      --interpolation interpolation --interpolation-checkpoint ckpt/interpolation \\
      --vsr vsr --vsr-checkpoint ckpt/vsr                    # cascade: res/base, res/interpolation, res/vsr
  lavie-sample --config vsr --checkpoint ckpt/vsr --input res/base --output res/vsr
  lavie-sample --config i2v --checkpoint ckpt/i2v --image photo.png --prompt "a boat sailing" --output res
  lavie-sample --config i2v --checkpoint ckpt/i2v --image a.png --image b.png --output res   # a transition
  lavie-sample --config i2v --checkpoint ckpt/i2v --story --image boat.png --prompt "a boat sails" \
      --prompt "the boat turns" --output res               # a story: one clip per prompt, each continuing the last
  lavie-sample --config base --checkpoint ckpt/base --prompt "a corgi" --config.sample.num_frames=64 --output res

A stage config is a packaged config by name (`base`, `base:tiny`, ...) or a config file (`FILE.py[:variant]`).
`--config` is the first stage; `--interpolation` / `--vsr` add the later stages (each with its own
`--STAGE.sample.steps=...` style overrides and `--STAGE-checkpoint`). A base first stage takes prompts
(`--prompt`, repeatable, and/or `--prompt-file`, UTF-8, one per line); an interpolation or vsr first stage takes
`--input` videos (files or directories) and reads each prompt back from its sidecar or file name, as the official
stages do. An i2v first stage (image-to-video) takes `--image FILE` (one image: animate it; two: a transition
from the first to the second) with a `--prompt` (default: the first image's file name up to its first dot,
underscores as spaces, as SEINE), or `--input` videos to continue (prompts from their sidecars, or one `--prompt`
for all). `--story` makes one long video with an i2v first stage: one clip per prompt (`--clips N` of each),
each continuing from the last `sample.context_frames` frames of the one before, from one `--image` or `--input`
video; the later stages run over the whole video, and the sidecars and the console give the seam measure
(docs/long_video.md). `--checkpoint random` samples with random weights (architecture from the config: a smoke
test, noise videos); a `lavie-train` work directory samples its latest checkpoint (EMA params, or `--params raw`),
with the config the run stored when `--config` is left out (`--config.FIELD=...` overrides still apply). A single
stage writes into `--output`; a cascade into `--output/STAGE/`; existing files are refused unless
`--overwrite`. `--lora FILE[:SCALE]` (repeatable; `--STAGE-lora` for a later stage) merges LoRA adapters into
the stage's UNet before it compiles, and puts the learned tokens a file holds into the text encoder (docs/lora.md).
Every input, flag and output path is checked before any model runs, and nothing is created until
there is a video to write. Ctrl-C (or SIGTERM) stops a run within a step: finished videos stay, partial files are
removed (exit status 130, or 143). On several hosts, run the same command on each with `--distributed`
(launch/tpu.py, launch/slurm.py): the mesh spans all hosts and process 0 writes the files.

Compiled programs are kept in a cache (`--compile-cache DIR`, default ~/.cache/lavie-jax/jax; off with
`--no-compile-cache`), so a second run starts sampling in seconds; on several hosts pass a directory they all see
(lavie_jax.runtime.compile_cache). `--flagfile FILE` reads more flags from a file, config overrides included.

Exit status: 0 done, 2 bad input (one line on stderr says what and how to fix it; `--traceback` adds the
traceback), 1 an unexpected failure, 130 / 143 interrupted.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from lavie_jax.cli import command
from lavie_jax.runtime import compile_cache, startup
from lavie_jax.io.checkpoints import CheckpointError
from lavie_jax.io.readback import DamagedCheckpointError
from lavie_jax.cli.config_flags import ConfigArgError, is_run
from lavie_jax.io.keycheck import KeyMismatchError
from lavie_jax.models.arch import ConfigError
from lavie_jax.models.lora import LoRAError
from lavie_jax.convert.torch_files import WeightFileError
from lavie_jax.models.options import ExecutionOptionsError
from lavie_jax.models.options import from_config as options_from_config
from lavie_jax.parallel import failed_processes, initialize_distributed, make_mesh
from lavie_jax.io.interrupts import Terminated, terminate_as_interrupt
from lavie_jax.io.safe_io import OutputPathError
from lavie_jax.sampling.cascade import Cascade
from lavie_jax.sampling.options import SampleConfigError, sample_options
from lavie_jax.sampling.outputs import (OutputError, check_no_overwrite, check_output_dir, read_inputs, unique_stems,
                                        write_result)
from lavie_jax.io.store import Source
from lavie_jax.sampling.pipeline import (RANDOM, PipelineError, apply_lora, check_checkpoint, check_lora,
                                        load_stage_pipeline)
from lavie_jax.sampling.sampler import StageSampler
from lavie_jax.sampling.story import check_story, later_seams, story_length, tell
from lavie_jax.stages import REGISTRY, STAGES, RequestError, get_stage
from lavie_jax.io.video import VideoReadError
from lavie_jax.io.images import ImageReadError, read_images

PROG = "lavie-sample"
LATER_STAGES = tuple(s.name for s in REGISTRY.values() if s.rank > 0)  # stages that refine the one before's video
STAGE_FLAGS = ("config", *LATER_STAGES)  # config-file flags, in cascade order
MAX_SEED = 2 ** 32 - 1
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
INTERRUPT_STATUS, TERMINATE_STATUS = command.INTERRUPT_STATUS, command.TERMINATE_STATUS  # 128 + SIGINT / SIGTERM


def build_parser() -> command.ArgumentParser:
    """The command's flags (a fresh parser, so the command can be parsed more than once in a process).

    The config flags are listed here for --help; `parse_config_flags` takes them (and their `--NAME.field`
    overrides) out of argv before argparse parses the rest."""
    p = command.make_parser(PROG, __doc__, positional_hint=" (a prompt goes in --prompt 'TEXT')")
    stages = p.add_argument_group("stages", "A stage config is NAME[:variant] or FILE[:variant]; override any field "
                                            "of it with "
                                            "--NAME.a.b=value,\ne.g. --config.sample.steps=25 or "
                                            "--vsr.sample.steps=10.")
    stages.add_argument("--config", metavar="NAME[:variant]",
                        help="the first stage: a stage config, e.g. base or base:tiny; override fields with "
                             "--config.a.b=value (required, unless --checkpoint is a lavie-train work directory: "
                             "then its stored config)")
    for name in LATER_STAGES:
        stages.add_argument(f"--{name}", metavar="NAME[:variant]",
                            help=f"then the {name} stage with this config (--{name}.a.b=value overrides)")
    stages.add_argument("--checkpoint", metavar="DIR", help="pipeline directory of the --config stage, a "
                        "lavie-train work directory, or 'random' (required)")
    stages.add_argument("--params", choices=("ema", "raw"), default="ema",
                        help="which params of a lavie-train work directory to sample with: the EMA of the trained "
                             "params, or the raw ones (default: %(default)s)")
    for name in LATER_STAGES:
        stages.add_argument(f"--{name}-checkpoint", metavar="DIR", help=f"pipeline directory of the --{name} stage")
    stages.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA adapter (.safetensors: lavie-jax, diffusers/PEFT or kohya layout; community SD "
                             "1.x files fit the base stage) merged into the --config stage's UNet with multiplier "
                             "SCALE (default 1); repeatable, the changes add up")
    for name in LATER_STAGES:
        stages.add_argument(f"--{name}-lora", action="append", default=[], metavar="FILE[:SCALE]",
                            help=f"a LoRA adapter of the --{name} stage (as --lora)")
    io = p.add_argument_group("prompts, videos and output")
    io.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    io.add_argument("--prompt-file", metavar="FILE",
                    help="a UTF-8 text file with one prompt per line (blank lines skipped)")
    io.add_argument("--input", action="append", default=[], metavar="PATH",
                    help="input videos of an interpolation / vsr first stage: files or directories (repeatable)")
    io.add_argument("--image", action="append", default=[], metavar="FILE",
                    help="i2v first stage: an 8-bit RGB image to animate; twice: a transition from the first image "
                         "to the second")
    io.add_argument("--story", action=command.BooleanFlag, default=False,
                    help="i2v first stage: one long video, one clip per prompt (--prompt, repeatable, or "
                         "--prompt-file, in order), each clip continuing from the last sample.context_frames frames "
                         "of the one before; it starts from one --image (animated) or one --input video (continued)")
    io.add_argument("--clips", type=command.bounded_int(1), metavar="N",
                    help="--story: clips per prompt (default 1): one prompt and --clips 4 make one video of 4 clips")
    io.add_argument("--output", metavar="DIR", help="output directory (required)")
    io.add_argument("--overwrite", action=command.BooleanFlag, default=False,
                    help="replace output files that already exist (default: refuse before sampling)")
    run = p.add_argument_group("sampling")
    run.add_argument("--seed", type=command.bounded_int(0, MAX_SEED), metavar="N",
                     help=f"seed for every stage, 0 to {MAX_SEED} (default: each stage config's sample.seed)")
    run.add_argument("--progress", action=command.BooleanFlag, default=True,
                     help="show a progress bar over denoising steps (default: on)")
    cluster = p.add_argument_group("several hosts")
    cluster.add_argument("--distributed", action=command.BooleanFlag, default=False,
                         help="join a multi-process run (one process per host, the same command on every host): "
                              "the cluster is detected on Cloud TPU / SLURM / MPI, else pass --coordinator, "
                              "--num-processes and --process-id")
    cluster.add_argument("--coordinator", metavar="HOST:PORT", help="--distributed: address of process 0")
    cluster.add_argument("--num-processes", type=command.bounded_int(1), metavar="N",
                         help="--distributed: number of processes")
    cluster.add_argument("--process-id", type=command.bounded_int(0), metavar="I",
                         help="--distributed: this process's index, 0..N-1")
    command.add_common_flags(p, cache_default=compile_cache.USER_DIR_HELP)
    return p


UsageError = command.UsageError  # bad or missing command-line flags

# user errors: reported in one line, without a traceback, exit status 2
ERRORS = (UsageError, ConfigArgError, SampleConfigError, PipelineError, OutputError, OutputPathError, RequestError,
          CheckpointError, ConfigError, KeyMismatchError, VideoReadError, FileNotFoundError, DamagedCheckpointError,
          LoRAError, WeightFileError, ImageReadError)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while sampling, after the partial files were removed: how many videos were finished."""

    def __init__(self, terminated: bool, finished: dict[Path, int]):
        super().__init__(terminated, finished)
        self.terminated, self.finished = terminated, finished

    @property
    def status(self) -> int:
        return TERMINATE_STATUS if self.terminated else INTERRUPT_STATUS

    def __str__(self) -> str:
        total = sum(self.finished.values())
        if not total:
            return f"{_interrupt_name(self.terminated)} before any video was finished; nothing was written"
        where = ", ".join(f"{n} in {d}" for d, n in self.finished.items() if n)
        return (f"{_interrupt_name(self.terminated)}; {total} video{'s were' if total > 1 else ' was'} written "
                f"before it ({where}); partial files were removed")


_interrupt_name = command.interrupt_name


# ------------------------------------------------------------------------------------------------ flags


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, ml_collections.ConfigDict | None]]:
    """Configs (with overrides) and the other flags; UsageError / ConfigArgError on anything malformed. Flag files
    are read first, so config overrides may come from a flag file too."""
    return command.parse_with_configs(build_parser(), _run_config_default(command.expand_flagfiles(argv)),
                                      STAGE_FLAGS)


def _run_config_default(argv: list[str]) -> list[str]:
    """`argv`, given `--config RUN` when it has no --config but a `--checkpoint RUN` that is a lavie-train work
    directory: the run samples with the config it stored (`--config.FIELD=...` overrides still apply)."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = argv[1:end]
    if any(re.fullmatch(r"--?config(=.*)?", a) for a in flags):
        return argv
    for i, a in enumerate(flags):
        run = a.split("=", 1)[1] if a.startswith("--checkpoint=") else \
            flags[i + 1] if a == "--checkpoint" and i + 1 < len(flags) else None
        if run is not None and is_run(Path(run)):
            return [argv[0], "--config", run, *argv[1:]]
    return argv


class _Stage(NamedTuple):
    config: ml_collections.ConfigDict
    checkpoint: str | None
    flag: str  # its config flag: config, interpolation or vsr

    @property
    def checkpoint_flag(self) -> str:
        return "--checkpoint" if self.flag == "config" else f"--{self.flag}-checkpoint"


def _stage_configs(args: argparse.Namespace, configs: dict[str, ml_collections.ConfigDict | None]) -> list[_Stage]:
    """The stages in cascade order, validated: a stage config per flag, consecutive stages, a checkpoint each."""
    if configs["config"] is None:
        raise UsageError("--config is required: the first stage's config, e.g. --config base (or base:tiny); it may be "
                         "left out when --checkpoint is a lavie-train work directory (its stored config is used)")
    stages = [_Stage(configs["config"], args.checkpoint, "config")]
    for name in LATER_STAGES:
        if configs[name] is not None:
            stages.append(_Stage(configs[name], getattr(args, f"{name}_checkpoint"), name))
        elif getattr(args, f"{name}_checkpoint") is not None:
            raise UsageError(f"--{name}-checkpoint given without --{name} CONFIG; add --{name} {name} (the packaged "
                             f"config) or drop --{name}-checkpoint")
    for s in stages:
        stage = s.config.get("stage")
        if stage not in STAGES:
            raise UsageError(f"--{s.flag}: config field stage is {stage!r}, not one of {STAGES}; pass a stage config "
                             "such as base (or base:tiny)")
        if s.flag != "config" and stage != s.flag:
            raise UsageError(f"--{s.flag} was given a {stage} config; pass --{s.flag} {s.flag} (the --{s.flag} flag "
                             f"adds the {s.flag} stage)")
    names = [s.config.stage for s in stages]
    order = [get_stage(n).rank for n in names]
    if order != sorted(set(order)):
        raise UsageError(f"stages {names}: later stages must come after the --config stage ({names[0]}) in the "
                         f"cascade {' -> '.join(STAGES)}")
    if order != list(range(order[0], order[0] + len(order))):
        skipped = [s.name for s in REGISTRY.values() if order[0] < s.rank < order[-1] and s.name not in names]
        raise UsageError(f"stages {names} skip {' and '.join(skipped)}: a cascade runs consecutive stages; add "
                         f"--{skipped[0]} {skipped[0]} --{skipped[0]}-checkpoint DIR, or run the {names[-1]} stage "
                         f"on its own with --config {names[-1]} --input OUTPUT_DIR")
    for s in stages:
        if not s.checkpoint:
            raise UsageError(f"{s.checkpoint_flag} is required for the {s.config.stage} stage (a pipeline directory "
                             "written by lavie-convert, or 'random')")
    return stages


def _cluster(args: argparse.Namespace) -> tuple | None:
    """(coordinator, num_processes, process_id) to join with --distributed (all None: detect), None without it."""
    cluster = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed:
        if any(v is not None for v in cluster):
            raise UsageError("--coordinator / --num-processes / --process-id need --distributed")
        return None
    if any(v is not None for v in cluster) and None in cluster:
        raise UsageError("--coordinator, --num-processes and --process-id go together; pass all three or none "
                         "(cluster detection)")
    coordinator, count, index = cluster
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--coordinator {coordinator!r}: expected HOST:PORT of process 0, e.g. "
                             "10.0.0.2:8476")
        if index >= count:
            raise UsageError(f"--process-id {index} with --num-processes {count}: ids run from 0 to {count - 1}")
    return cluster


def _join(cluster: tuple) -> None:
    try:
        initialize_distributed(*cluster)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--distributed: could not join the run ({e}); outside Cloud TPU / SLURM / Open MPI pass "
                         "--coordinator HOST:PORT --num-processes N --process-id I, the same on every host but "
                         "the id") from e


# ------------------------------------------------------------------------------------------------ inputs


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a UTF-8 text file (BOM and CRLF accepted), one per line, blank lines skipped; UsageError names
    the file, what is wrong and the fix (for undecodable bytes: the line and byte offset)."""
    p = Path(path)
    flag = f"--prompt-file {path}"
    if not p.exists():
        raise UsageError(f"{flag}: no such file; pass a text file with one prompt per line")
    if p.is_dir():
        raise UsageError(f"{flag} is a directory; pass a text file with one prompt per line")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} cannot be read ({e.strerror or e}); check its permissions, e.g. chmod u+r "
                         f"{shlex.quote(str(path))}") from e
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UsageError(f"{flag} is UTF-16 text; save it as UTF-8, e.g. iconv -f utf-16 -t utf-8 "
                         f"{shlex.quote(str(path))} > prompts-utf8.txt")
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start  # in the file
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1)
        raise UsageError(f"{flag} is not UTF-8 text: line {line} has byte 0x{data[offset]:02x} at byte {column} of "
                         f"the line (byte {offset} of the file); save it as UTF-8, e.g. for a Latin-1 / Windows "
                         f"file: iconv -f latin1 -t utf-8 {shlex.quote(str(path))} > prompts-utf8.txt") from None
    if "\0" in text:
        raise UsageError(f"{flag} holds NUL bytes, so it is not a text file; pass a text file with one prompt per "
                         "line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{flag} has no prompts (it is empty or only blank lines); write one prompt per line")
    return prompts


def _prompts(args: argparse.Namespace) -> list[str]:
    for i, prompt in enumerate(args.prompt):
        if not prompt.strip():
            raise UsageError(f"--prompt number {i + 1} is empty; pass the text of the video, e.g. --prompt 'a "
                             "corgi on the beach' (an unset shell variable gives an empty value)")
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        prompts += read_prompt_file(args.prompt_file)
    return prompts


def _check_checkpoint(cfg: ml_collections.ConfigDict, checkpoint: str, flag: str) -> Source:
    """`check_checkpoint` with messages that name the stage's own flag; the checked source (loading it later does not
    check it again)."""
    path = Path(checkpoint)
    if checkpoint != RANDOM and path.is_file():
        if path.suffix.lower() in TORCH_SUFFIXES:
            raise UsageError(f"{flag} {checkpoint} is a PyTorch weight file; convert it first with lavie-convert "
                             f"(it writes a pipeline directory) and pass that directory, or 'random'")
        raise UsageError(f"{flag} {checkpoint} is a file; pass the pipeline directory written by lavie-convert, "
                         f"or 'random' for random weights")
    try:
        return check_checkpoint(cfg, checkpoint)
    except (PipelineError, CheckpointError) as e:
        message = str(e)
        # check_checkpoint names --checkpoint; a later stage's directory comes from its own flag
        message = flag + message[len("--checkpoint"):] if message.startswith("--checkpoint") else \
            f"{flag} {checkpoint}: {message}"
        raise UsageError(message) from e


def _check_model_section(cfg: ml_collections.ConfigDict, flag: str) -> None:
    """The execution options the models will be configured with (`model.dtype`, `model.attention_impl` and its
    platform, `sharding.rules`), before anything loads: a bad one would only fail inside compiled code."""
    try:
        options_from_config(cfg)
    except ExecutionOptionsError as e:
        raise UsageError(f"--{flag}.{e}") from None


class _Plan(NamedTuple):
    output: Path
    sources: list[Source]  # each stage's checked model source, in cascade order
    groups: list[tuple]  # (indices, prompts, videos, fps, sources): one request per input shape and frame rate
    stems: dict[int, str]  # prompt index -> file stem, over the whole run
    directories: dict[str, Path]  # stage -> output directory
    formats: dict[str, tuple[str, ...]]  # stage -> video formats written
    mesh: jax.sharding.Mesh
    adapters: list[list]  # each stage's (AdapterFile, multiplier) pairs, checked against its UNet


def _plan(args: argparse.Namespace, stages: list[_Stage]) -> _Plan:
    """Everything that can be checked on this host before a model is loaded: output paths, prompts or input
    videos, checkpoint directories, the mesh, and that no existing file would be replaced. Creates nothing."""
    if not args.output:
        raise UsageError("--output DIR is required (created when the first video is written)")
    output = check_output_dir(args.output)
    sources = []
    for s in stages:
        _check_model_section(s.config, s.flag)
        sources.append(_check_checkpoint(s.config, s.checkpoint, s.checkpoint_flag))
    first = stages[0].config.stage
    if args.image and not get_stage(first).takes_images:
        raise UsageError(f"--image is for a first stage that animates images (i2v); {first} takes "
                         f"{'--input videos' if get_stage(first).takes_video else 'prompts'}")
    if args.clips is not None and not args.story:
        raise UsageError("--clips N is the number of clips per prompt of a --story; add --story, or drop --clips")
    if args.story:
        groups = _story_group(args, stages)
    elif args.image:
        if args.input:
            raise UsageError("give --image files (animate, transition) or --input videos (continue), not both")
        prompts = _prompts(args)
        if len(prompts) > 1:
            raise UsageError(f"--image makes one video: give one --prompt, not {len(prompts)}")
        frames = read_images(args.image)
        prompt = prompts[0] if prompts else Path(args.image[0]).name.split(".")[0].replace("_", " ")
        groups = [([0], [prompt], [frames], None, [str(args.image[0])])]
    elif not get_stage(first).takes_video:
        if args.input:
            raise UsageError(f"--input videos are for a first stage that refines a video ({', '.join(LATER_STAGES)}); "
                             f"{first} takes prompts (--prompt / --prompt-file)")
        prompts = _prompts(args)
        if not prompts:
            raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompt-file FILE")
        groups = [(list(range(len(prompts))), prompts, None, None, None)]
    else:
        given = _prompts(args) if get_stage(first).takes_images else []
        if (args.prompt or args.prompt_file) and not get_stage(first).takes_images:
            raise UsageError(f"a {first} first stage reads its prompts from the --input videos' sidecars or file "
                             "names; drop --prompt / --prompt-file")
        if len(given) > 1:
            raise UsageError(f"give one --prompt for all --input videos (or none: their sidecars'), not {len(given)}")
        if not args.input:
            images = " or --image files" if get_stage(first).takes_images else ""
            raise UsageError(f"a {first} first stage needs --input videos (files or directories){images}")
        inputs = read_inputs(args.input)
        by_shape: dict[tuple, list[int]] = {}
        for i, v in enumerate(inputs):
            by_shape.setdefault((v.frames.shape, v.fps), []).append(i)
        groups = [(idx, [given[0] if given else inputs[i].prompt for i in idx], [inputs[i].frames for i in idx],
                   inputs[idx[0]].fps, [inputs[i].path for i in idx]) for idx in by_shape.values()]
    # file stems over the whole run: a prompt repeated across request groups still gets -2, -3, ...
    prompt_of = {i: p for group_indices, group_prompts, *_ in groups for i, p in zip(group_indices, group_prompts)}
    stems = dict(zip(sorted(prompt_of), unique_stems([prompt_of[i] for i in sorted(prompt_of)])))
    names = [s.config.stage for s in stages]
    directories = {n: output if len(stages) == 1 else output / n for n in names}
    formats = {s.config.stage: sample_options(s.config.stage, s.config.sample).formats for s in stages}
    if get_stage(first).takes_video and not args.image and args.input:
        _check_inputs_survive(groups, directories, stems, formats)
    for n in names:
        check_no_overwrite(directories[n], list(stems.values()), formats[n], args.overwrite)
    shape = tuple(stages[0].config.mesh.shape)
    try:
        mesh = make_mesh(shape)
    except ValueError as e:
        raise UsageError(f"--config.mesh.shape={shape}: {e}; -1 takes the remaining devices, e.g. "
                         "--config.mesh.shape=(-1,1,1,1)") from e
    adapters = [check_lora(s.config, getattr(args, "lora" if s.flag == "config" else f"{s.flag}_lora"),
                           "--lora" if s.flag == "config" else f"--{s.flag}-lora") for s in stages]
    for name in LATER_STAGES:
        if getattr(args, f"{name}_lora") and name not in [s.flag for s in stages]:
            raise UsageError(f"--{name}-lora given without --{name} CONFIG; add the {name} stage or drop the flag")
    return _Plan(output, sources, groups, stems, directories, formats, mesh, adapters)


def _story_group(args: argparse.Namespace, stages: list[_Stage]) -> list[tuple]:
    """The one request of `--story`: (indices [0], the prompt of every clip, [start frames], fps, [source]); each
    input mistake is a UsageError naming the fix, before any model loads."""
    config = stages[0].config
    if not get_stage(config.stage).takes_images:
        raise UsageError(f"--story continues clips with the image-to-video stage (--config i2v); the {config.stage} "
                         "stage does not continue a video from its last frames")
    if args.image and args.input:
        raise UsageError("--story starts from one --image (animated) or one --input video (continued), not both")
    if not args.image and not args.input:
        raise UsageError("--story needs a start: --image FILE (the first clip animates it) or --input VIDEO (the "
                         "first clip continues it)")
    if len(args.image) > 1:
        raise UsageError(f"--story starts from one --image, got {len(args.image)} (a transition between two images "
                         "is a run without --story)")
    if config.sample.mask_type != "auto":
        raise UsageError(f"--story chooses the masks itself (first1 from an image, first{{n}} to continue, n = "
                         f"sample.context_frames); drop --config.sample.mask_type={config.sample.mask_type}")
    prompts = _prompts(args)
    if args.image:
        frames, source, fps = read_images(args.image), str(args.image[0]), None
        prompts = prompts or [Path(args.image[0]).name.split(".")[0].replace("_", " ")]
    else:
        inputs = read_inputs(args.input)
        if len(inputs) > 1:
            raise UsageError(f"--story continues one --input video, got {len(inputs)}; tell one story per run")
        frames, source, fps = inputs[0].frames, inputs[0].path, inputs[0].fps
        prompts = prompts or [inputs[0].prompt]
    clips = [p for p in prompts for _ in range(args.clips or 1)]
    try:
        check_story(config, len(clips), int(config.sample.context_frames))
    except RequestError as e:
        raise UsageError(f"--story: {e}") from None
    return [([0], clips, [frames], fps, [source])]


def _check_inputs_survive(groups: list[tuple], directories: dict[str, Path], stems: dict[int, str],
                          formats: dict[str, tuple[str, ...]]) -> None:
    """Refuse an --output that would write over the --input videos (or their sidecars), even with --overwrite:
    they are the only copy of what the run starts from."""
    inputs = {Path(p).resolve() for *_, sources in groups for p in sources}
    inputs |= {p.with_suffix(".json") for p in inputs}
    clash = sorted(str(f) for stage, d in directories.items() for stem in stems.values()
                   for f in (d / f"{stem}.{ext}" for ext in (*formats[stage], "json")) if f.resolve() in inputs)
    if clash:
        more = f" and {len(clash) - 2} more" if len(clash) > 2 else ""
        raise UsageError(f"--output would write over the --input files {', '.join(clash[:2])}{more}; choose "
                         "another --output (e.g. res/vsr for inputs in res/base)")


# ------------------------------------------------------------------------------------------------ interrupts


class _Before(NamedTuple):
    """What the output locations held before sampling, so an interrupted run removes only its own partial files."""
    files: dict[Path, int]  # existing output file -> st_mtime_ns
    directories: set[Path]


def _output_files(plan: _Plan) -> list[tuple[Path, Path, list[Path]]]:
    """(directory, sidecar, videos) of every video the run would write."""
    return [(d, d / f"{stem}.json", [d / f"{stem}.{ext}" for ext in plan.formats[stage]])
            for stage, d in plan.directories.items() for stem in plan.stems.values()]


def _before(plan: _Plan) -> _Before:
    files = {}
    for _, sidecar, videos in _output_files(plan):
        for p in (sidecar, *videos):
            if p.exists():
                files[p] = p.stat().st_mtime_ns
    dirs = {d for d in (plan.output, *plan.directories.values()) if d.exists()}
    return _Before(files, dirs)


def _after_interrupt(plan: _Plan, before: _Before) -> dict[Path, int]:
    """Finished videos per directory (a sidecar is written after its videos, so a new sidecar means done); the
    videos this run started but did not finish are removed, and so are directories it made that stay empty."""
    finished: dict[Path, int] = {d: 0 for d in plan.directories.values()}
    for directory, sidecar, videos in _output_files(plan):
        if sidecar.exists() and before.files.get(sidecar) != sidecar.stat().st_mtime_ns:
            finished[directory] += 1
            continue
        for video in videos:
            if video.exists() and video not in before.files:  # never a file that was there before the run
                video.unlink()
    for directory in sorted({*plan.directories.values(), plan.output}, key=lambda p: -len(p.parts)):
        if directory not in before.directories and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    return finished


def _settle() -> None:
    """Let the step that was running when the interrupt came finish before the process exits: tearing the runtime
    down under a running computation can crash the interpreter on its way out."""
    try:
        for array in jax.live_arrays():
            array.block_until_ready()
        jax.effects_barrier()
    except BaseException:  # a second Ctrl-C, or a runtime already failing: exit anyway
        pass


# ------------------------------------------------------------------------------------------------ run


def run(argv: Sequence[str]) -> list:
    """Parse `argv` (program name first) and sample; returns the StageResults of the last request group.

    Raises one of ERRORS on bad input, before any model is loaded, and RunInterrupted (a KeyboardInterrupt) when
    Ctrl-C / SIGTERM stops the sampling."""
    args, configs = _parse(argv)
    stages = _stage_configs(args, configs)
    cluster = _cluster(args)
    if cluster is not None:
        _join(cluster)
    compile_cache.configure(command.cache_choice(args, compile_cache.user_cache_dir()), prog=PROG)  # before compiling
    # hosts may differ (files, paths): every process learns whether any failed its checks, and all stop together
    plan, error = None, None
    try:
        plan = _plan(args, stages)
    except ERRORS as e:
        error = e
    failed = failed_processes(error is not None)
    if error is not None:
        raise error
    if failed:
        raise UsageError(f"process(es) {failed} of {jax.process_count()} failed their checks before sampling (their "
                         "own error says why); every process stops")

    ema = args.params == "ema"
    cascade = Cascade([StageSampler(s.config, apply_lora(load_stage_pipeline(s.config, source, plan.mesh, ema=ema),
                                                         adapters), plan.mesh)
                       for s, source, adapters in zip(stages, plan.sources, plan.adapters)])
    for indices, prompts, videos, fps, _ in plan.groups:
        _check_story(cascade, prompts, videos[0], fps) if args.story else cascade.check(prompts, videos, fps)
    before = _before(plan)
    writer = jax.process_index() == 0
    if writer:
        print(f"{PROG}: sampling {len(plan.stems)} video(s): {' -> '.join(cascade.stages)} (Ctrl-C stops; finished "
              "videos are kept)", file=sys.stderr, flush=True)
        first = stages[0].config.sample
        if args.image and (frames := plan.groups[0][2][0]).shape[1:3] != (first.height, first.width):
            print(f"{PROG}: resizing --image {frames.shape[2]}x{frames.shape[1]} to {first.width}x{first.height} "
                  "(sample.width x sample.height; bilinear, aspect ratio not kept, as SEINE)", file=sys.stderr,
                  flush=True)
    try:
        results = []
        for indices, prompts, videos, fps, sources in plan.groups:
            stems = [plan.stems[i] for i in indices]
            if args.story:
                results = _tell_story(args, plan, cascade, writer)
            elif len(cascade.samplers) == 1:
                sampler = cascade.samplers[0]
                results = [sampler.sample(prompts, videos, seed=args.seed, fps=fps, indices=indices,
                                          progress=args.progress)]
                write_result(results[0], plan.output, config=sampler.config, indices=indices, sources=sources,
                             stems=stems, overwrite=args.overwrite)
            else:
                results = cascade.run(prompts, videos, seed=args.seed, fps=fps, indices=indices,
                                      output_dir=plan.output, sources=sources, stems=stems, overwrite=args.overwrite,
                                      progress=args.progress)
            for result in results if writer else ():
                for stem in stems:
                    print(f"wrote {plan.directories[result.stage] / stem}.{{{','.join(result.options.formats)},json}}",
                          flush=True)
    except KeyboardInterrupt as e:
        finished = {}
        if writer:
            try:
                finished = _after_interrupt(plan, before)
            except OSError as cleanup:  # best effort: the interrupt is what the user needs to hear about
                print(f"{PROG}: could not remove partial files: {cleanup}", file=sys.stderr)
        raise RunInterrupted(isinstance(e, Terminated), finished) from e
    return results


def _check_story(cascade: Cascade, prompts: list[str], start: np.ndarray, fps: float | None) -> None:
    """The story's first clip as a request of the first stage, and the later stages given the story's length."""
    first = cascade.samplers[0]
    first.check_request(prompts[:1], [start], fps)
    if len(cascade.samplers) > 1:
        o = first.options
        frames = story_length(o.num_frames, len(prompts), int(first.config.sample.context_frames))
        stand_in = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (frames, o.height, o.width, 3))  # no memory
        try:
            Cascade(cascade.samplers[1:]).check(prompts[:1], [stand_in], o.fps or fps)
        except RequestError as e:
            raise RequestError(f"the story's {frames} frames of {o.height}x{o.width}: {e}") from e


def _tell_story(args: argparse.Namespace, plan: _Plan, cascade: Cascade, writer: bool) -> list:
    """`--story`: the i2v stage tells it (`sampling.story.tell`), the later stages run over the whole video; every
    sidecar holds the clips and the seam measure of its own video, which the console prints too."""
    _, prompts, videos, _, sources = plan.groups[0]
    first, stem = cascade.samplers[0], plan.stems[0]
    told = tell(first.config, first.pipeline, prompts, videos[0], context=int(first.config.sample.context_frames),
                seed=args.seed, mesh=first.mesh, progress=args.progress)
    story = told.summary()
    written = write_result(told.result, plan.directories[first.stage], config=first.config, indices=[0],
                           sources=sources, stems=[stem], overwrite=args.overwrite, extra={"story": story})
    results = [told.result]
    if len(cascade.samplers) > 1:
        results += Cascade(cascade.samplers[1:]).run(
            prompts[:1], [told.frames], seed=args.seed, fps=told.result.fps, indices=[0], output_dir=plan.output,
            sources=[str(written[0].with_suffix("." + told.result.options.formats[0]))], stems=[stem],
            overwrite=args.overwrite, progress=args.progress,
            sidecar=lambda r: {"story": {**story, **(later_seams(told, r.frames[0]) or {"seams": None})}})
    for result in results if writer else ():
        measured = story if result is told.result else later_seams(told, result.frames[0])
        if measured:
            m = measured["seams"]
            print(f"{PROG}: story of {len(prompts)} clip(s), {result.frames.shape[1]} {result.stage} frames: pixel "
                  f"change {m['seam']:.1f} at the seams vs {m['inside']:.1f} inside the clips (ratio "
                  f"{m['ratio']:.2f}; about 1: the seams do not show)", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`lavie-sample`): every failure is one line on stderr (see the module docstring for the
    exit statuses, and lavie_jax.cli.command for the conventions every command shares); SIGTERM is handled as
    Ctrl-C. Returns after --help; exits (SystemExit) with the status otherwise, unless the run succeeded.

    As the command (`argv` None), an interrupted run leaves with `os._exit` once its message is out: tearing down
    a JAX runtime that was interrupted mid-step now and then crashes the interpreter on its way out (SIGSEGV after
    the message, so the shell would see -11, not 130). Its files are complete and closed by then; an in-process
    caller passing `argv` gets SystemExit as for any other failure."""
    console = argv is None
    argv = list(sys.argv if argv is None else argv)
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    show_traceback = command.wants_traceback(argv[1:])
    logging.set_verbosity(logging.WARNING)  # absl's INFO lines (backend probing) would drown the progress bar

    def fail(message: str, status: int, interrupted: bool = False) -> None:
        command.report(PROG, message, show_traceback=show_traceback)
        if interrupted and console:
            sys.stdout.flush()
            os._exit(status)
        sys.exit(status)

    with terminate_as_interrupt():
        try:
            run(argv)
        except SystemExit as e:  # --help printed the flags
            if e.code:
                raise
        except RunInterrupted as e:
            _settle()
            fail(str(e), e.status, interrupted=True)
        except KeyboardInterrupt as e:  # before sampling began: nothing was written
            _settle()
            terminated = isinstance(e, Terminated)
            fail(f"{_interrupt_name(terminated)} before sampling began; nothing was written",
                 command.interrupt_status(terminated), interrupted=True)
        except Exception as e:  # noqa: BLE001 - one line and a status (ERRORS: bad input, 2)
            fail(*command.failure(e, ERRORS))


if __name__ == "__main__":
    main()
