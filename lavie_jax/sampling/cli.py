"""`lavie-sample`: prompts in, videos out, for one stage or a run of the cascade.

  lavie-sample --config configs/base.py --checkpoint ckpt/base --prompt "a panda taking a selfie" --output res
  lavie-sample --config configs/base.py:tiny --checkpoint random --prompt-file prompts.txt --output res \\
      --config.sample.steps=25 --seed 3
  lavie-sample --config configs/base.py --checkpoint ckpt/base --prompt "a corgi" --output res \\
      --interpolation configs/interpolation.py --interpolation-checkpoint ckpt/interpolation \\
      --vsr configs/vsr.py --vsr-checkpoint ckpt/vsr                  # cascade: res/base, res/interpolation, res/vsr
  lavie-sample --config configs/vsr.py --checkpoint ckpt/vsr --input res/base --output res/vsr

`--config` is the first stage; `--interpolation` / `--vsr` add the later stages (each with its own
`--STAGE.sample.steps=...` style overrides and `--STAGE-checkpoint`). A base first stage takes prompts
(`--prompt`, repeatable, and/or `--prompt-file`, UTF-8, one per line); an interpolation or vsr first stage takes
`--input` videos (files or directories) and reads each prompt back from its sidecar or file name, as the official
stages do. `--checkpoint random` samples with random weights (architecture from the config: a smoke test, noise
videos); a `lavie-train` work directory samples its latest checkpoint (EMA params, or `--params raw`). A single
stage writes into `--output`; a cascade into `--output/STAGE/`; existing files are refused unless
`--overwrite`. Every input, flag and output path is checked before any model runs, and nothing is created until
there is a video to write. Ctrl-C (or SIGTERM) stops a run within a step: finished videos stay, partial files are
removed (exit status 130, or 143). On several hosts, run the same command on each with `--distributed`
(launch/tpu.py, launch/slurm.py): the mesh spans all hosts and process 0 writes the files.

Exit status: 0 done, 2 bad input (one line on stderr says what and how to fix it; `--traceback` adds the
traceback), 1 an unexpected failure, 130 / 143 interrupted.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
from absl import flags, logging

from lavie_jax.runtime import startup
from lavie_jax.io.checkpoints import CheckpointError
from lavie_jax.cli.config_flags import ConfigArgError, parse_config_flags
from lavie_jax.io.keycheck import KeyMismatchError
from lavie_jax.models.arch import ConfigError
from lavie_jax.models.attention_kernels import AttentionImplError, check_attention_impl
from lavie_jax.parallel import failed_processes, initialize_distributed, make_mesh
from lavie_jax.io.safe_io import OutputPathError, Terminated, terminate_as_interrupt
from lavie_jax.sampling.cascade import Cascade
from lavie_jax.sampling.options import SampleConfigError, sample_options
from lavie_jax.sampling.outputs import (OutputError, check_no_overwrite, check_output_dir, read_inputs, unique_stems,
                                        write_result)
from lavie_jax.sampling.pipeline import RANDOM, PipelineError, check_checkpoint, load_stage_pipeline
from lavie_jax.sampling.sampler import StageSampler
from lavie_jax.stages import REGISTRY, STAGES, RequestError, get_stage
from lavie_jax.io.video import VideoReadError

PROG = "lavie-sample"
LATER_STAGES = tuple(s.name for s in REGISTRY.values() if s.rank > 0)  # stages that refine the one before's video
STAGE_FLAGS = ("config", *LATER_STAGES)  # config-file flags, in cascade order
MAX_SEED = 2 ** 32 - 1
DTYPES = ("float32", "bfloat16")  # computation dtypes of the models (params stay float32)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
INTERRUPT_STATUS = 130  # 128 + SIGINT, what shells report for Ctrl-C
TERMINATE_STATUS = 143  # 128 + SIGTERM
REDELIVER_S = 1.0  # an interrupt not caught by then was swallowed (see `_interrupts`) and is sent again


def define_flags() -> flags.FlagValues:
    """The command's flags on a fresh FlagValues, so the command can be parsed more than once in a process.

    The config flags are listed here for `--help`; `parse_config_flags` takes them (and their `--NAME.field`
    overrides) out of argv before absl parses the rest."""
    fv = flags.FlagValues()
    helps = {"config": "First stage: configs/STAGE.py[:variant]; override fields with --config.a.b=value.",
             **{n: f"Then the {n} stage with this config (--{n}.a.b=value overrides)." for n in LATER_STAGES}}
    for name in STAGE_FLAGS:
        flags.DEFINE_string(name, None, helps[name], flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "Pipeline directory of the --config stage, a lavie-train work directory, "
                        "or 'random'.", flag_values=fv)
    flags.DEFINE_enum("params", "ema", ("ema", "raw"), "Which params of a lavie-train work directory to sample with: "
                      "the EMA of the trained params, or the raw ones.", flag_values=fv)
    for name in LATER_STAGES:
        flags.DEFINE_string(f"{name}-checkpoint", None, f"Pipeline directory of the --{name} stage.", flag_values=fv)
    flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).", flag_values=fv)
    flags.DEFINE_string("prompt-file", None, "A UTF-8 text file with one prompt per line (blank lines skipped).",
                        flag_values=fv)
    flags.DEFINE_multi_string("input", [], "Input videos of an interpolation / vsr first stage (files or "
                              "directories).", flag_values=fv)
    flags.DEFINE_string("output", None, "Output directory.", flag_values=fv)
    flags.DEFINE_integer("seed", None, "Seed for every stage (default: each stage config's sample.seed).",
                         lower_bound=0, upper_bound=MAX_SEED, flag_values=fv)
    flags.DEFINE_boolean("progress", True, "Show a progress bar over denoising steps.", flag_values=fv)
    flags.DEFINE_boolean("distributed", False, "Join a multi-process run (one process per host, the same command "
                         "on every host): the cluster is detected on Cloud TPU / SLURM / MPI, else pass "
                         "--coordinator, --num-processes and --process-id.", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "--distributed: HOST:PORT of process 0.", flag_values=fv)
    flags.DEFINE_integer("num-processes", None, "--distributed: number of processes.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("process-id", None, "--distributed: this process's index, 0..N-1.", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "Replace output files that already exist (default: refuse before "
                         "sampling).", flag_values=fv)
    flags.DEFINE_boolean("traceback", False, "On an error, print the Python traceback too.", flag_values=fv)
    return fv


class UsageError(ValueError):
    """Bad or missing command-line flags."""


# user errors: reported in one line, without a traceback, exit status 2
ERRORS = (UsageError, ConfigArgError, SampleConfigError, PipelineError, OutputError, OutputPathError, RequestError,
          CheckpointError, ConfigError, KeyMismatchError, VideoReadError, FileNotFoundError)


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


def _interrupt_name(terminated: bool) -> str:
    return "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"


# ------------------------------------------------------------------------------------------------ flags


def _parse(argv: Sequence[str]) -> tuple[flags.FlagValues, dict[str, ml_collections.ConfigDict | None]]:
    """Configs (with overrides) and the other flags; UsageError / ConfigArgError on anything malformed."""
    fv = define_flags()
    try:  # --flagfile contents first, so config overrides may come from a flag file too
        argv = fv.read_flags_from_files(list(argv), force_gnu=False)
    except flags.Error as e:
        raise UsageError(f"--flagfile: {re.sub(r'^ERROR:+ *', '', str(e))}") from e
    configs, rest = parse_config_flags(argv, STAGE_FLAGS)
    try:
        leftover = fv(rest)
    except flags.Error as e:
        raise UsageError(_flag_error(fv, e)) from e
    if leftover[1:]:
        raise UsageError(f"unexpected argument {leftover[1]!r}: every value needs its flag (a prompt goes in "
                         f"--prompt 'TEXT'); quote values that contain spaces. See {PROG} --help")
    return fv, configs


def _flag_error(fv: flags.FlagValues, error: flags.Error) -> str:
    """absl's message about a flag, reworded to say what the flag takes."""
    message = str(error)
    match = re.match(r"flag --([\w-]+)=(.*?): ", message, re.DOTALL)
    if match and match.group(1) in fv:
        name, value = match.group(1), match.group(2)
        kind = fv[name].flag_type()
        if kind == "bool":
            return f"--{name}={value}: expected true or false (or --{name} / --no{name})"
        if kind == "int":
            detail = message[match.end():]
            if detail.startswith("invalid literal"):
                return f"--{name} {value}: expected an integer"
            return f"--{name} {value}: {detail}"  # a bound: absl says which
    return f"{message.rstrip('. ')} (see {PROG} --help)"


class _Stage(NamedTuple):
    config: ml_collections.ConfigDict
    checkpoint: str | None
    flag: str  # its config flag: config, interpolation or vsr

    @property
    def checkpoint_flag(self) -> str:
        return "--checkpoint" if self.flag == "config" else f"--{self.flag}-checkpoint"


def _stage_configs(fv: flags.FlagValues, configs: dict[str, ml_collections.ConfigDict | None]) -> list[_Stage]:
    """The stages in cascade order, validated: a stage config per flag, consecutive stages, a checkpoint each."""
    if configs["config"] is None:
        raise UsageError("--config is required: the first stage's config file, e.g. --config configs/base.py "
                         "(or configs/base.py:tiny)")
    stages = [_Stage(configs["config"], fv.checkpoint, "config")]
    for name in LATER_STAGES:
        if configs[name] is not None:
            stages.append(_Stage(configs[name], fv[f"{name}-checkpoint"].value, name))
        elif fv[f"{name}-checkpoint"].value is not None:
            raise UsageError(f"--{name}-checkpoint given without --{name} CONFIG; add --{name} configs/{name}.py "
                             f"or drop --{name}-checkpoint")
    for s in stages:
        stage = s.config.get("stage")
        if stage not in STAGES:
            raise UsageError(f"--{s.flag}: config field stage is {stage!r}, not one of {STAGES}; pass a stage config "
                             "such as configs/base.py")
        if s.flag != "config" and stage != s.flag:
            raise UsageError(f"--{s.flag} was given a {stage} config; pass configs/{s.flag}.py (the --{s.flag} flag "
                             f"adds the {s.flag} stage)")
    names = [s.config.stage for s in stages]
    order = [get_stage(n).rank for n in names]
    if order != sorted(set(order)):
        raise UsageError(f"stages {names}: later stages must come after the --config stage ({names[0]}) in the "
                         f"cascade {' -> '.join(STAGES)}")
    if order != list(range(order[0], order[0] + len(order))):
        skipped = [s.name for s in REGISTRY.values() if order[0] < s.rank < order[-1] and s.name not in names]
        raise UsageError(f"stages {names} skip {' and '.join(skipped)}: a cascade runs consecutive stages; add "
                         f"--{skipped[0]} configs/{skipped[0]}.py --{skipped[0]}-checkpoint DIR, or run the "
                         f"{names[-1]} stage on its own with --config configs/{names[-1]}.py --input OUTPUT_DIR")
    for s in stages:
        if not s.checkpoint:
            raise UsageError(f"{s.checkpoint_flag} is required for the {s.config.stage} stage (a pipeline directory "
                             "written by lavie-convert, or 'random')")
    return stages


def _cluster(fv: flags.FlagValues) -> tuple | None:
    """(coordinator, num_processes, process_id) to join with --distributed (all None: detect), None without it."""
    cluster = (fv.coordinator, fv["num-processes"].value, fv["process-id"].value)
    if not fv.distributed:
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


def _prompts(fv: flags.FlagValues) -> list[str]:
    for i, prompt in enumerate(fv.prompt):
        if not prompt.strip():
            raise UsageError(f"--prompt number {i + 1} is empty; pass the text of the video, e.g. --prompt 'a "
                             "corgi on the beach' (an unset shell variable gives an empty value)")
    prompts = list(fv.prompt)
    if fv["prompt-file"].value is not None:
        prompts += read_prompt_file(fv["prompt-file"].value)
    return prompts


def _check_checkpoint(cfg: ml_collections.ConfigDict, checkpoint: str, flag: str) -> None:
    """`check_checkpoint` with messages that name the stage's own flag."""
    path = Path(checkpoint)
    if checkpoint != RANDOM and path.is_file():
        if path.suffix.lower() in TORCH_SUFFIXES:
            raise UsageError(f"{flag} {checkpoint} is a PyTorch weight file; convert it first with lavie-convert "
                             f"(it writes a pipeline directory) and pass that directory, or 'random'")
        raise UsageError(f"{flag} {checkpoint} is a file; pass the pipeline directory written by lavie-convert, "
                         f"or 'random' for random weights")
    try:
        check_checkpoint(cfg, checkpoint)
    except (PipelineError, CheckpointError) as e:
        message = str(e)
        # check_checkpoint names --checkpoint; a later stage's directory comes from its own flag
        message = flag + message[len("--checkpoint"):] if message.startswith("--checkpoint") else \
            f"{flag} {checkpoint}: {message}"
        raise UsageError(message) from e


def _check_model_section(cfg: ml_collections.ConfigDict, flag: str) -> None:
    """The `model` fields the pipeline hands to jax unchecked (a bad one would only fail inside compiled code)."""
    model = cfg.get("model") or {}
    dtype, impl = model.get("dtype"), model.get("attention_impl")
    if dtype not in DTYPES:
        raise UsageError(f"--{flag}.model.dtype={dtype}: choose one of {DTYPES} (the computation dtype)")
    try:
        check_attention_impl(impl)  # the name, and the platform it needs
    except AttentionImplError as e:
        raise UsageError(f"--{flag}.model.{e}") from None


class _Plan(NamedTuple):
    output: Path
    groups: list[tuple]  # (indices, prompts, videos, fps, sources): one request per input shape and frame rate
    stems: dict[int, str]  # prompt index -> file stem, over the whole run
    directories: dict[str, Path]  # stage -> output directory
    formats: dict[str, tuple[str, ...]]  # stage -> video formats written
    mesh: jax.sharding.Mesh


def _plan(fv: flags.FlagValues, stages: list[_Stage]) -> _Plan:
    """Everything that can be checked on this host before a model is loaded: output paths, prompts or input
    videos, checkpoint directories, the mesh, and that no existing file would be replaced. Creates nothing."""
    if not fv.output:
        raise UsageError("--output DIR is required (created when the first video is written)")
    output = check_output_dir(fv.output)
    for s in stages:
        _check_model_section(s.config, s.flag)
        _check_checkpoint(s.config, s.checkpoint, s.checkpoint_flag)
    first = stages[0].config.stage
    if not get_stage(first).takes_video:
        if fv.input:
            raise UsageError(f"--input videos are for a first stage that refines a video ({', '.join(LATER_STAGES)}); "
                             f"{first} takes prompts (--prompt / --prompt-file)")
        prompts = _prompts(fv)
        if not prompts:
            raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompt-file FILE")
        groups = [(list(range(len(prompts))), prompts, None, None, None)]
    else:
        if fv.prompt or fv["prompt-file"].value:
            raise UsageError(f"a {first} first stage reads its prompts from the --input videos' sidecars or file "
                             "names; drop --prompt / --prompt-file")
        if not fv.input:
            raise UsageError(f"a {first} first stage needs --input videos (files or directories)")
        inputs = read_inputs(fv.input)
        by_shape: dict[tuple, list[int]] = {}
        for i, v in enumerate(inputs):
            by_shape.setdefault((v.frames.shape, v.fps), []).append(i)
        groups = [(idx, [inputs[i].prompt for i in idx], [inputs[i].frames for i in idx], inputs[idx[0]].fps,
                   [inputs[i].path for i in idx]) for idx in by_shape.values()]
    # file stems over the whole run: a prompt repeated across request groups still gets -2, -3, ...
    prompt_of = {i: p for group_indices, group_prompts, *_ in groups for i, p in zip(group_indices, group_prompts)}
    stems = dict(zip(sorted(prompt_of), unique_stems([prompt_of[i] for i in sorted(prompt_of)])))
    names = [s.config.stage for s in stages]
    directories = {n: output if len(stages) == 1 else output / n for n in names}
    formats = {s.config.stage: sample_options(s.config.stage, s.config.sample).formats for s in stages}
    if get_stage(first).takes_video:
        _check_inputs_survive(groups, directories, stems, formats)
    for n in names:
        check_no_overwrite(directories[n], list(stems.values()), formats[n], fv.overwrite)
    shape = tuple(stages[0].config.mesh.shape)
    try:
        mesh = make_mesh(shape)
    except ValueError as e:
        raise UsageError(f"--config.mesh.shape={shape}: {e}; -1 takes the remaining devices, e.g. "
                         "--config.mesh.shape=(-1,1,1,1)") from e
    return _Plan(output, groups, stems, directories, formats, mesh)


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


_pending: dict[str, int | None] = {"signal": None}  # an interrupt raised but not yet caught by run() / main()


def _caught() -> None:
    _pending["signal"] = None


def _redeliver(signum: int) -> None:
    if _pending["signal"] == signum:
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _interrupts() -> Iterator[None]:
    """`safe_io.terminate_as_interrupt` (SIGTERM and Ctrl-C raise KeyboardInterrupt), made reliable.

    CPython drops an exception that a signal handler raises while a gc callback or `__del__` runs (JAX frees
    device buffers from one, often mid-step), printing it as 'Exception ignored' and carrying on sampling. So an
    interrupt that run() / main() have not caught within REDELIVER_S is sent again, and dropped ones stay silent.
    """
    with terminate_as_interrupt():
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        inner = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame) -> None:
            _pending["signal"] = signum
            timer = threading.Timer(REDELIVER_S, _redeliver, (signum,))
            timer.daemon = True
            timer.start()
            inner[signum](signum, frame)

        def unraisable(info) -> None:
            if not isinstance(info.exc_value, KeyboardInterrupt):  # those are redelivered
                hook(info)

        hook = sys.unraisablehook
        for s in inner:
            signal.signal(s, handler)
        sys.unraisablehook = unraisable
        try:
            yield
        finally:
            _caught()
            sys.unraisablehook = hook
            for s, h in inner.items():
                signal.signal(s, h)


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
    fv, configs = _parse(argv)
    stages = _stage_configs(fv, configs)
    cluster = _cluster(fv)
    if cluster is not None:
        _join(cluster)
    # hosts may differ (files, paths): every process learns whether any failed its checks, and all stop together
    plan, error = None, None
    try:
        plan = _plan(fv, stages)
    except ERRORS as e:
        error = e
    failed = failed_processes(error is not None)
    if error is not None:
        raise error
    if failed:
        raise UsageError(f"process(es) {failed} of {jax.process_count()} failed their checks before sampling (their "
                         "own error says why); every process stops")

    ema = fv.params == "ema"
    cascade = Cascade([StageSampler(s.config, load_stage_pipeline(s.config, s.checkpoint, plan.mesh, ema=ema),
                                    plan.mesh) for s in stages])
    for indices, prompts, videos, fps, _ in plan.groups:
        cascade.check(prompts, videos, fps)
    before = _before(plan)
    writer = jax.process_index() == 0
    if writer:
        print(f"{PROG}: sampling {len(plan.stems)} video(s): {' -> '.join(cascade.stages)} (Ctrl-C stops; finished "
              "videos are kept)", file=sys.stderr, flush=True)
    try:
        results = []
        for indices, prompts, videos, fps, sources in plan.groups:
            stems = [plan.stems[i] for i in indices]
            if len(cascade.samplers) == 1:
                sampler = cascade.samplers[0]
                results = [sampler.sample(prompts, videos, seed=fv.seed, fps=fps, indices=indices,
                                          progress=fv.progress)]
                write_result(results[0], plan.output, config=sampler.config, indices=indices, sources=sources,
                             stems=stems, overwrite=fv.overwrite)
            else:
                results = cascade.run(prompts, videos, seed=fv.seed, fps=fps, indices=indices,
                                      output_dir=plan.output, sources=sources, stems=stems, overwrite=fv.overwrite,
                                      progress=fv.progress)
            for result in results if writer else ():
                for stem in stems:
                    print(f"wrote {plan.directories[result.stage] / stem}.{{{','.join(result.options.formats)},json}}",
                          flush=True)
    except KeyboardInterrupt as e:
        _caught()
        finished = {}
        if writer:
            try:
                finished = _after_interrupt(plan, before)
            except OSError as cleanup:  # best effort: the interrupt is what the user needs to hear about
                print(f"{PROG}: could not remove partial files: {cleanup}", file=sys.stderr)
        raise RunInterrupted(isinstance(e, Terminated), finished) from e
    return results


def _wants_traceback(argv: Sequence[str]) -> bool:
    """--traceback, looked up before parsing (a parse error should honour it too); the last one wins."""
    wanted = False
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in ("--traceback", "-traceback", "--traceback=true", "--traceback=1"):
            wanted = True
        elif arg in ("--notraceback", "--traceback=false", "--traceback=0"):
            wanted = False
    return wanted


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`lavie-sample`): every failure is one line on stderr (see the module docstring for the
    exit statuses); SIGTERM is handled as Ctrl-C.

    As the command (`argv` None), an interrupted run leaves with `os._exit` once its message is out: tearing down
    a JAX runtime that was interrupted mid-step now and then crashes the interpreter on its way out (SIGSEGV after
    the message, so the shell would see -11, not 130). Its files are complete and closed by then; an in-process
    caller passing `argv` gets SystemExit as for any other failure."""
    console = argv is None
    argv = list(sys.argv if argv is None else argv)
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(define_flags().get_help())
        return
    show_traceback = _wants_traceback(argv)
    logging.set_verbosity(logging.WARNING)  # absl's INFO lines (backend probing) would drown the progress bar

    def fail(message: str, status: int, interrupted: bool = False) -> None:
        if show_traceback:
            traceback.print_exc()
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)
        if interrupted and console:
            sys.stdout.flush()
            os._exit(status)
        sys.exit(status)

    with _interrupts():
        try:
            run(argv)
        except RunInterrupted as e:
            _caught()
            _settle()
            fail(str(e), e.status, interrupted=True)
        except KeyboardInterrupt as e:  # before sampling began: nothing was written
            _caught()
            _settle()
            terminated = isinstance(e, Terminated)
            fail(f"{_interrupt_name(terminated)} before sampling began; nothing was written",
                 TERMINATE_STATUS if terminated else INTERRUPT_STATUS, interrupted=True)
        except ERRORS as e:
            fail(f"error: {e}", 2)
        except OSError as e:  # the machine, not the input: disk full, a path that vanished while writing
            fail(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''} (--traceback shows where)", 1)
        except Exception as e:
            fail(f"unexpected error: {type(e).__name__}: {e} (a bug if the inputs are fine: please report it with "
                 "the output of --traceback)", 1)


if __name__ == "__main__":
    main()
