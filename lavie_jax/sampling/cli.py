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
(`--prompt`, repeatable, and/or `--prompt-file`, one per line); an interpolation or vsr first stage takes `--input`
videos (files or directories) and reads each prompt back from its sidecar or file name, as the official stages do.
`--checkpoint random` samples with random weights (architecture from the config: a smoke test, noise videos).
A single stage writes into `--output`; a cascade into `--output/STAGE/`; existing files are refused unless
`--overwrite`. Every input, flag and output path is checked before any model runs. On several hosts, run the same
command on each with `--distributed` (launch/tpu_vm.sh): the mesh spans all hosts and process 0 writes the files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
from absl import flags, logging
from ml_collections import config_flags

from lavie_jax.checkpoints import CheckpointError
from lavie_jax.convert.keymap import KeyMismatchError
from lavie_jax.models.arch import ConfigError
from lavie_jax.parallel import failed_processes, initialize_distributed, make_mesh
from lavie_jax.sampling.cascade import Cascade
from lavie_jax.sampling.options import STAGES, SampleConfigError, sample_options
from lavie_jax.sampling.outputs import (OutputError, check_no_overwrite, check_output_dir, read_inputs, unique_stems,
                                        write_result)
from lavie_jax.sampling.pipeline import PipelineError, check_checkpoint, load_stage_pipeline
from lavie_jax.sampling.stages import RequestError, StageSampler
from lavie_jax.video import VideoReadError

STAGE_FLAGS = ("config", "interpolation", "vsr")  # config-file flags, in cascade order


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
    """The command's flags on a fresh FlagValues (config flags read their `--NAME.field` overrides from `argv`),
    so the command can be parsed more than once in a process."""
    fv = flags.FlagValues()
    helps = {"config": "First stage: configs/STAGE.py[:variant].",
             "interpolation": "Then interpolation with this config.", "vsr": "Then VSR with this config."}
    for name in STAGE_FLAGS:
        config_flags.DEFINE_config_file(name, None, helps[name], flag_values=fv, sys_argv=list(argv))
    flags.DEFINE_string("checkpoint", None, "Pipeline directory of the --config stage, or 'random'.", flag_values=fv)
    flags.DEFINE_string("interpolation-checkpoint", None, "Pipeline directory of the --interpolation stage.",
                        flag_values=fv)
    flags.DEFINE_string("vsr-checkpoint", None, "Pipeline directory of the --vsr stage.", flag_values=fv)
    flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).", flag_values=fv)
    flags.DEFINE_string("prompt-file", None, "A text file with one prompt per line (blank lines skipped).",
                        flag_values=fv)
    flags.DEFINE_multi_string("input", [], "Input videos of an interpolation / vsr first stage (files or "
                              "directories).", flag_values=fv)
    flags.DEFINE_string("output", None, "Output directory.", flag_values=fv)
    flags.DEFINE_integer("seed", None, "Seed for every stage (default: each stage config's sample.seed).",
                         flag_values=fv)
    flags.DEFINE_boolean("progress", True, "Show a progress bar over denoising steps.", flag_values=fv)
    flags.DEFINE_boolean("distributed", False, "Join a multi-process run (one process per host, the same command "
                         "on every host): the cluster is detected on Cloud TPU / SLURM / MPI, else pass "
                         "--coordinator, --num-processes and --process-id.", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "--distributed: address:port of process 0.", flag_values=fv)
    flags.DEFINE_integer("num-processes", None, "--distributed: number of processes.", flag_values=fv)
    flags.DEFINE_integer("process-id", None, "--distributed: this process's index.", flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "Replace output files that already exist (default: refuse before "
                         "sampling).", flag_values=fv)
    return fv


class UsageError(ValueError):
    """Bad or missing command-line flags."""


# user errors: reported in one line, without a traceback
ERRORS = (UsageError, SampleConfigError, PipelineError, OutputError, RequestError, CheckpointError, ConfigError,
          KeyMismatchError, VideoReadError, FileNotFoundError, flags.Error)


def _stage_configs(fv: flags.FlagValues) -> list[tuple]:
    """[(config, checkpoint)] in cascade order, validated."""
    first = fv.config
    if first is None:
        raise UsageError("--config is required, e.g. --config configs/base.py")
    stages = [(first, fv.checkpoint, "--checkpoint")]
    for name in ("interpolation", "vsr"):
        cfg = fv[name].value
        ckpt = fv[f"{name}-checkpoint"].value
        if cfg is None:
            if ckpt is not None:
                raise UsageError(f"--{name}-checkpoint given without --{name} CONFIG")
            continue
        if cfg.stage != name:
            raise UsageError(f"--{name} {cfg.stage} config: pass configs/{name}.py")
        stages.append((cfg, ckpt, f"--{name}-checkpoint"))
    order = [STAGES.index(c.stage) for c, _, _ in stages]
    if order != sorted(set(order)):
        raise UsageError(f"stages {[c.stage for c, _, _ in stages]}: later stages must come after the --config "
                         f"stage ({first.stage}) in the cascade base -> interpolation -> vsr")
    for cfg, ckpt, flag in stages:
        if not ckpt:
            raise UsageError(f"{flag} is required for the {cfg.stage} stage (a pipeline directory, or 'random')")
    return [(cfg, ckpt) for cfg, ckpt, _ in stages]


def _prompts(fv: flags.FlagValues) -> list[str]:
    prompts = list(fv.prompt)
    path = fv["prompt-file"].value
    if path:
        if not Path(path).is_file():
            raise UsageError(f"--prompt-file {path}: no such file")
        prompts += [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return prompts


def _add_config_roots(argv: Sequence[str]) -> None:
    """Config files import `configs.common`: put the folder above each config file's folder (and the working
    directory, as for `python -m`) on sys.path before the flags load them."""
    roots = [os.getcwd()]
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
        if arg.split("=", 1)[0] in ("--config", "--interpolation", "--vsr") and value:
            roots.append(str(Path(value.split(":", 1)[0]).absolute().parent.parent))
    for root in roots:
        if root not in sys.path:
            sys.path.insert(0, root)


class _Plan(NamedTuple):
    output: Path
    groups: list[tuple]  # (indices, prompts, videos, fps, sources): one request per input shape and frame rate
    stems: dict[int, str]  # prompt index -> file stem, over the whole run
    directories: dict[str, Path]  # stage -> output directory


def _plan(fv: flags.FlagValues, stages: list[tuple]) -> _Plan:
    """Everything that can be checked on this host before a model is loaded: output paths, prompts or input
    videos, checkpoint directories, and that no existing file would be replaced."""
    if not fv.output:
        raise UsageError("--output DIR is required")
    output = check_output_dir(fv.output)
    for cfg, ckpt in stages:
        check_checkpoint(cfg, ckpt)
    first = stages[0][0].stage
    if first == "base":
        if fv.input:
            raise UsageError("--input videos are for an interpolation / vsr first stage; base takes prompts")
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
    directories = {cfg.stage: output if len(stages) == 1 else output / cfg.stage for cfg, _ in stages}
    for cfg, _ in stages:
        formats = sample_options(cfg.stage, cfg.sample).formats
        check_no_overwrite(directories[cfg.stage], list(stems.values()), formats, fv.overwrite)
    return _Plan(output, groups, stems, directories)


def run(argv: Sequence[str]) -> list:
    """Parse `argv` (program name first) and sample; returns the StageResults of the last request group.
    Raises one of ERRORS on bad input, before any compute."""
    _add_config_roots(argv)
    fv = define_flags(argv)
    fv(list(argv))
    stages = _stage_configs(fv)
    cluster = (fv.coordinator, fv["num-processes"].value, fv["process-id"].value)
    if fv.distributed:
        if any(v is not None for v in cluster) and None in cluster:
            raise UsageError("--coordinator, --num-processes and --process-id go together; pass all three or none "
                             "(cluster detection)")
        initialize_distributed(*cluster)
    elif any(v is not None for v in cluster):
        raise UsageError("--coordinator / --num-processes / --process-id need --distributed")
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

    mesh = make_mesh(stages[0][0].mesh.shape)
    cascade = Cascade([StageSampler(cfg, load_stage_pipeline(cfg, ckpt, mesh), mesh) for cfg, ckpt in stages])
    for indices, prompts, videos, fps, _ in plan.groups:
        cascade.check(prompts, videos, fps)
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
            results = cascade.run(prompts, videos, seed=fv.seed, fps=fps, indices=indices, output_dir=plan.output,
                                  sources=sources, stems=stems, overwrite=fv.overwrite, progress=fv.progress)
        for result in results if jax.process_index() == 0 else ():
            for stem in stems:
                print(f"wrote {plan.directories[result.stage] / stem}.{{{','.join(result.options.formats)},json}}")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`lavie-sample`): user errors are one line on stderr and exit status 2."""
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(define_flags(argv[:1]).get_help())
        return
    logging.set_verbosity(logging.WARNING)  # absl's INFO lines (backend probing) would drown the progress bar
    try:
        run(argv)
    except ERRORS as e:
        print(f"lavie-sample: error: {e}", file=sys.stderr)
        sys.exit(2)
