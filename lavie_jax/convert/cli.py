"""`lavie-convert`: PyTorch weights -> sampling- and training-ready lavie-jax checkpoint directories, and back.

    lavie-convert lavie --stage base --checkpoint lavie_base.pt --output ckpt/base-unet
    lavie-convert sd --stage interpolation --model-dir stable-diffusion-v1-4 --output ckpt/interpolation-init
    lavie-convert x4 --model-dir stable-diffusion-x4-upscaler --output ckpt/vsr-init
    lavie-convert pipeline --stage base --checkpoint lavie_base.pt --sd-dir stable-diffusion-v1-4 --output ckpt/base
    lavie-convert pipeline --stage vsr --checkpoint lavie_vsr.pt --x4-dir stable-diffusion-x4-upscaler --output ckpt/vsr
    lavie-convert export --checkpoint ckpt/base --output lavie_base.safetensors
    lavie-convert export --checkpoint runs/base --output lavie_base.pt        # a lavie-train work directory (EMA)
    lavie-convert export --checkpoint ckpt/base --lora style.safetensors:0.8 --output merged.safetensors
    lavie-convert export --checkpoint runs/lora --adapters-only --output adapter.safetensors  # a LoRA run's adapters

`lavie` writes a UNet directory; `sd`, `x4` and `pipeline` write pipeline directories (UNet, VAE, text encoder,
tokenizer); `lavie_jax.io.store.load_unet` / `load_pipeline` read both. Every path is checked before any work.
Every output is written atomically; `--overwrite` replaces an existing output only if lavie-convert wrote it (a
checkpoint directory holding nothing else, or an exported file carrying our metadata), never anything else.
SIGTERM and Ctrl-C leave nothing partial behind. Weights stream one tensor at a time; torch is
needed only for `.pt`/`.bin` pickles (`pip install 'lavie-jax[convert]'`). The same steps are importable as
`convert_lavie`, `convert_sd`, `convert_x4` and `convert_pipeline`.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lavie_jax.cli import command
from lavie_jax.runtime import compile_cache, startup
from lavie_jax.io.checkpoints import (CHECKPOINTS, DEFAULT_GROUP_BYTES, PIPELINE_COMPONENTS, CheckpointError,
                                   abstract_component, write_component, write_metadata)
from lavie_jax.convert.export import check_export_output, export_checkpoint
from lavie_jax.convert.lora_files import export_run_adapter, read_adapters
from lavie_jax.models.unet import abstract_unet
from lavie_jax.convert.inflate import check_source, inflate_state_dict, stage_unet_config
from lavie_jax.convert.keymap import param_paths, torch_shapes
from lavie_jax.convert.state_dict import check_rotary, check_state_dict, iter_flax_params
from lavie_jax.convert.torch_files import WeightFile, WeightFileError, find_weights, open_weights, read_json
from lavie_jax.io.keycheck import KeyMismatchError
from lavie_jax.models.arch import ConfigError, arch_from_config
from lavie_jax.models.clip import canonical_clip_state_dict
from lavie_jax.models.vae import canonical_vae_state_dict
from lavie_jax.stages import STAGES, get_stage, in_family
from lavie_jax.io.interrupts import Terminated, terminate_as_interrupt
from lavie_jax.io.safe_io import atomic_directory, check_input, check_output_directory

PROG = "lavie-convert"
CANONICAL = {"vae": canonical_vae_state_dict, "text_encoder": canonical_clip_state_dict}
MAX_GROUP_MB = 1 << 16  # 64 GiB per group: beyond any host's memory, so a larger value is a typo
MAX_SEED = 2 ** 31 - 1  # the new temporal layers' seed goes through jax as an int32
# a conversion that cannot be done as asked (one paragraph, exit status 1): inputs it cannot convert, outputs it
# will not replace, a config it cannot use
CONVERSION_ERRORS = (WeightFileError, KeyMismatchError, CheckpointError, ConfigError, ValueError)


class Reporter:
    """Progress lines on stderr: one per step and, while writing, at most one per `interval` seconds."""

    def __init__(self, quiet: bool = False, interval: float = 1.0):
        self.quiet, self.interval = quiet, interval

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"[lavie-convert] {message}", file=sys.stderr, flush=True)

    def meter(self, label: str, tensors: int, nbytes: int) -> Callable[[int, int], None]:
        """A `(tensors done, bytes done)` callback printing counts, percent, MB/s and the time left."""
        start, last = time.perf_counter(), [0.0]

        def update(done: int, done_bytes: int) -> None:
            now = time.perf_counter() - start
            if self.quiet or (now - last[0] < self.interval and done < tensors):
                return
            last[0] = now
            rate = done_bytes / max(now, 1e-9)
            eta = (nbytes - done_bytes) / rate if rate > 0 else 0.0
            print(f"[lavie-convert]   {label}: {done}/{tensors} tensors, {done_bytes / 1e9:.2f}/{nbytes / 1e9:.2f} "
                  f"GB ({100 * done_bytes / max(nbytes, 1):.0f}%), {rate / 1e6:.0f} MB/s, "
                  f"{'done in' if done >= tensors else 'ETA'} {now if done >= tensors else eta:.0f}s",
                  file=sys.stderr, flush=True)

        return update


def _source_info(weights: WeightFile, **extra: Any) -> dict[str, Any]:
    return {"files": [{"path": str(Path(p).absolute()), "bytes": n} for p, n in weights.files],
            "read_as": weights.description, **({"note": weights.note} if weights.note else {}), **extra}


def _write_model(directory: Path, kind: str, config: dict[str, Any], model, state_dict, *, stage: str | None,
                 source: dict[str, Any], report: Reporter, group_bytes: int) -> None:
    """Stream a checked state dict (official names) into a component directory."""
    shapes = [s for _, s in param_paths(model)]
    meter = report.meter(kind, len(shapes), sum(4 * math.prod(s) for s in shapes))
    write_component(directory, kind, config, iter_flax_params(model, state_dict), stage=stage, source=source,
                    group_bytes=group_bytes, progress=meter)


def _unet_config(stage: str, unet_config: str | Path | None) -> dict[str, Any]:
    if unet_config is None:
        return get_stage(stage).official_unet()
    return stage_unet_config(read_json(unet_config, "--unet-config file"), stage)


def _write_lavie_unet(directory: Path, checkpoint: str | Path, *, stage: str, unet_config, trust_pickle: bool,
                      report: Reporter, group_bytes: int) -> None:
    arch = arch_from_config(_unet_config(stage, unet_config), stage)
    model = abstract_component("unet", arch.to_dict())
    with open_weights(checkpoint, trust_pickle=trust_pickle) as weights:
        report.say(f"reading {weights.description}" + (f": {weights.note}" if weights.note else ""))
        what = f"checkpoint {checkpoint}"
        check_source(torch_shapes(model), weights.shapes(), stage=stage, lavie=True, what=what)
        check_rotary(model, weights)
        source = _source_info(weights, command="lavie", unet_config=str(unet_config or "official"))
        _write_model(directory, "unet", arch.to_dict(), model, weights, stage=stage, source=source, report=report,
                     group_bytes=group_bytes)


def _write_inflated_unet(directory: Path, model_dir: Path, *, stage: str, seed: int, trust_pickle: bool,
                         report: Reporter, group_bytes: int) -> None:
    config = stage_unet_config(read_json(model_dir / "unet" / "config.json", "UNet config"), stage)
    arch = arch_from_config(config, stage)
    model = abstract_component("unet", arch.to_dict())
    with open_weights(find_weights(model_dir / "unet"), trust_pickle=trust_pickle) as weights:
        report.say(f"inflating {weights.description} to the {stage} UNet (new temporal layers: seed {seed})")
        state = inflate_state_dict(model, weights, seed=seed, what=f"UNet of {model_dir}")
        check_state_dict(model, state, what=f"inflated UNet of {model_dir}")
        source = _source_info(weights, command=get_stage(stage).family.name, inflated=True, seed=seed)
        _write_model(directory, "unet", arch.to_dict(), model, state, stage=stage, source=source, report=report,
                     group_bytes=group_bytes)


def _write_folder_component(directory: Path, kind: str, folder: Path, *, trust_pickle: bool, report: Reporter,
                            group_bytes: int) -> None:
    """A diffusers `vae/` or transformers `text_encoder/` folder -> component directory."""
    config = read_json(folder / "config.json", f"{kind} config")
    model = abstract_component(kind, config)
    with open_weights(find_weights(folder), trust_pickle=trust_pickle) as weights:
        report.say(f"reading {weights.description}")
        state = CANONICAL[kind](weights)
        check_state_dict(model, state, what=f"{kind} weights {weights.description}")
        _write_model(directory, kind, config, model, state, stage=None,
                     source=_source_info(weights, folder=str(folder)), report=report, group_bytes=group_bytes)


def _write_tokenizer(directory: Path, folder: Path, flavor: str, report: Reporter) -> str:
    from lavie_jax.io.text import default_tokenizer, load_tokenizer

    if folder.is_dir():
        shutil.copytree(folder, directory)
        load_tokenizer(directory)  # fail now, not at sampling time, if the files are unusable
        return str(folder.absolute())
    report.say(f"{folder} does not exist: writing the default CLIP tokenizer ({flavor}) from the installed BPE file")
    default_tokenizer(flavor).save_pretrained(str(directory))
    return f"default CLIP tokenizer ({flavor})"


def _write_pipeline(tmp: Path, stage: str, write_unet: Callable[[Path], None], components_dir: Path, *,
                    trust_pickle: bool, report: Reporter, group_bytes: int, source: dict[str, Any]) -> None:
    """unet/ (by `write_unet`), vae/, text_encoder/, tokenizer/ and the pipeline metadata into `tmp`."""
    for kind in ("unet", "vae", "text_encoder"):
        (tmp / kind).mkdir()
    write_unet(tmp / "unet")
    for kind in ("vae", "text_encoder"):
        _write_folder_component(tmp / kind, kind, components_dir / kind, trust_pickle=trust_pickle, report=report,
                                group_bytes=group_bytes)
    tokenizer = _write_tokenizer(tmp / "tokenizer", components_dir / "tokenizer", get_stage(stage).family.tokenizer,
                                 report)
    write_metadata(tmp, "pipeline", stage=stage, components={c: c for c in PIPELINE_COMPONENTS},
                   source={**source, "components_from": str(components_dir.absolute()), "tokenizer": tokenizer})


def _check_stage(stage: str, allowed: Sequence[str] = STAGES) -> None:
    if stage not in allowed:
        raise ConfigError(f"--stage {stage!r}: choose one of {list(allowed)}")


def convert_lavie(checkpoint: str | Path, output: str | Path, *, stage: str, unet_config: str | Path | None = None,
                  overwrite: bool = False, trust_pickle: bool = False, report: Reporter | None = None,
                  group_bytes: int = DEFAULT_GROUP_BYTES) -> Path:
    """An official LaVie UNet checkpoint (.pt with or without {'ema': ...}, .bin, .safetensors) -> UNet directory."""
    _check_stage(stage)
    report = report or Reporter()
    with atomic_directory(output, CHECKPOINTS, overwrite=overwrite) as tmp:
        _write_lavie_unet(tmp, checkpoint, stage=stage, unet_config=unet_config, trust_pickle=trust_pickle,
                          report=report, group_bytes=group_bytes)
    report.say(f"wrote {output}")
    return Path(output)


def convert_sd(model_dir: str | Path, output: str | Path, *, stage: str = "base", seed: int = 0,
               overwrite: bool = False, trust_pickle: bool = False, report: Reporter | None = None,
               group_bytes: int = DEFAULT_GROUP_BYTES) -> Path:
    """A diffusers Stable Diffusion v1.x folder -> pipeline directory with the inflated base/interpolation UNet."""
    _check_stage(stage, tuple(s.name for s in in_family("sd")))
    return _convert_2d(Path(model_dir), output, stage, seed, overwrite, trust_pickle, report or Reporter(),
                       group_bytes)


def convert_x4(model_dir: str | Path, output: str | Path, *, seed: int = 0, overwrite: bool = False,
               trust_pickle: bool = False, report: Reporter | None = None,
               group_bytes: int = DEFAULT_GROUP_BYTES) -> Path:
    """The diffusers x4-upscaler folder -> VSR pipeline directory (spatial weights from it, temporal layers fresh)."""
    return _convert_2d(Path(model_dir), output, in_family("x4")[0].name, seed, overwrite, trust_pickle,
                       report or Reporter(),
                       group_bytes)


def _convert_2d(model_dir: Path, output: str | Path, stage: str, seed: int, overwrite: bool, trust_pickle: bool,
                report: Reporter, group_bytes: int) -> Path:
    kw = dict(trust_pickle=trust_pickle, report=report, group_bytes=group_bytes)
    with atomic_directory(output, CHECKPOINTS, overwrite=overwrite) as tmp:
        _write_pipeline(tmp, stage, lambda d: _write_inflated_unet(d, model_dir, stage=stage, seed=seed, **kw),
                        model_dir, source={"command": get_stage(stage).family.name,
                                           "model_dir": str(model_dir.absolute())}, **kw)
    report.say(f"wrote {output}")
    return Path(output)


def _component_folder(stage: str, sd_dir: str | Path | None, x4_dir: str | Path | None) -> tuple[str, str | Path]:
    """(flag, folder) the `stage`'s VAE, text encoder and tokenizer come from; ConfigError if it was not given."""
    family = get_stage(stage).family
    flag, folder = f"--{family.name}-dir", {"sd": sd_dir, "x4": x4_dir}[family.name]
    if folder is None:
        raise ConfigError(f"the {stage} stage takes its VAE and text encoder from {family.description}: pass {flag}")
    return flag, folder


def convert_pipeline(checkpoint: str | Path, output: str | Path, *, stage: str, sd_dir: str | Path | None = None,
                     x4_dir: str | Path | None = None, unet_config: str | Path | None = None, overwrite: bool = False,
                     trust_pickle: bool = False, report: Reporter | None = None,
                     group_bytes: int = DEFAULT_GROUP_BYTES) -> Path:
    """LaVie UNet checkpoint + the VAE, text encoder and tokenizer of SD (base, interpolation) or of the x4 upscaler
    (vsr) -> one self-contained pipeline directory."""
    _check_stage(stage)
    report = report or Reporter()
    folder = _component_folder(stage, sd_dir, x4_dir)[1]
    family = get_stage(stage).family.name
    for name, unused in (("sd", sd_dir), ("x4", x4_dir)):
        if unused is not None and name != family:
            report.say(f"note: --{name}-dir is not used by the {stage} stage (its VAE and text encoder come from "
                       f"--{family}-dir)")
    kw = dict(trust_pickle=trust_pickle, report=report, group_bytes=group_bytes)
    with atomic_directory(output, CHECKPOINTS, overwrite=overwrite) as tmp:
        _write_pipeline(tmp, stage, lambda d: _write_lavie_unet(d, checkpoint, stage=stage, unet_config=unet_config,
                                                                 **kw),
                        Path(folder), source={"command": "pipeline", "checkpoint": str(Path(checkpoint).absolute())},
                        **kw)
    report.say(f"wrote {output}")
    return Path(output)


def build_parser() -> command.ArgumentParser:
    parser = command.make_parser(PROG, __doc__)
    command.add_common_flags(parser, cache_default=compile_cache.USER_DIR_HELP)  # before or after the subcommand
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to convert (COMMAND --help lists its flags)")

    def add(name: str, help: str, *, stages: Sequence[str] = (), checkpoint: str | None = None,
            model_dir: bool = False, output_help: str = "output directory") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if stages:
            p.add_argument("--stage", required=True, choices=stages)
        if checkpoint:
            p.add_argument("--checkpoint", required=True, metavar="PATH", help=checkpoint)
        if model_dir:
            p.add_argument("--model-dir", required=True, metavar="DIR",
                           help="folder with unet/, vae/, text_encoder/, tokenizer/")
            p.add_argument("--seed", type=command.bounded_int(0, MAX_SEED), default=0, metavar="N",
                           help="seed of the new temporal layers (0 to 2^31-1)")
        if name != "export":
            p.add_argument("--trust-pickle", action=command.BooleanFlag, help="allow .pt/.bin pickles holding "
                           "Python objects besides tensors (runs code from the file)")
        p.add_argument("--output", required=True, metavar="PATH", help=output_help)
        p.add_argument("--overwrite", action=command.BooleanFlag,
                       help="replace an existing output lavie-convert wrote (anything else is never replaced)")
        p.add_argument("--quiet", action=command.BooleanFlag, help="no progress output")
        p.add_argument("--group-mb", type=command.bounded_int(1, MAX_GROUP_MB, " (MB per group)"), metavar="MB",
                       default=DEFAULT_GROUP_BYTES >> 20,
                       help=f"MB converted and written per group, 1 to {MAX_GROUP_MB}: bounds memory "
                            "(default %(default)s)")
        command.add_common_flags(p, cache_default=compile_cache.USER_DIR_HELP, in_subcommand=True)
        return p

    config_help = "diffusers-style UNet config JSON (default: the stage's official one)"
    add("lavie", "official LaVie UNet checkpoint -> UNet directory", stages=STAGES,
        checkpoint=".pt (bare or {'ema': ...}), .bin or .safetensors").add_argument("--unet-config", metavar="FILE",
                                                                                  help=config_help)
    add("sd", "diffusers Stable Diffusion v1.x folder -> inflated base/interpolation pipeline",
        stages=tuple(s.name for s in in_family("sd")), model_dir=True)
    add("x4", "diffusers x4-upscaler folder -> inflated vsr pipeline", model_dir=True)
    p = add("pipeline", "LaVie checkpoint + SD / x4 folder -> sampling-ready pipeline directory", stages=STAGES,
            checkpoint="LaVie UNet checkpoint (.pt, .bin, .safetensors)")
    p.add_argument("--sd-dir", metavar="DIR",
                   help="Stable Diffusion v1.x folder (VAE, text encoder, tokenizer of base/interp)")
    p.add_argument("--x4-dir", metavar="DIR", help="x4-upscaler folder (VAE, text encoder, tokenizer of vsr)")
    p.add_argument("--unet-config", metavar="FILE", help=config_help)
    p = add("export", "lavie-jax directory -> official PyTorch names (.safetensors, .pt, .bin)",
            checkpoint="UNet, VAE, text-encoder or pipeline directory, or a lavie-train work directory",
            output_help="output file: .safetensors, .pt (a UNet as {'ema': state_dict}, as LaVie's scripts load) "
                        "or .bin")
    p.add_argument("--component", default="unet", choices=("unet", "vae", "text_encoder"),
                   help="which model of a pipeline directory (default %(default)s)")
    p.add_argument("--params", default="ema", choices=("ema", "raw"),
                   help="a lavie-train work directory: the EMA of the trained params, or the raw ones (default "
                        "%(default)s)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA adapter merged into the exported UNet with multiplier SCALE (default 1); repeatable")
    p.add_argument("--adapters-only", action="store_true",
                   help="a LoRA lavie-train work directory: write its trained adapters alone (.safetensors, the "
                        "diffusers/PEFT layout under the official module names) instead of the merged UNet")
    return parser


def _check_folder(path: str, flag: str, subfolders: Sequence[str], what: str) -> None:
    folder = check_input(path, flag=flag, directory=True)
    missing = [f"{s}/" for s in subfolders if not (folder / s).is_dir()]
    if missing:
        raise WeightFileError(f"{flag} {path} has no {', '.join(missing)}: pass {what} (with "
                              f"{', '.join(s + '/' for s in subfolders)})")


def check_paths(args: argparse.Namespace) -> None:
    """Every path argument of a parsed command line, before any work: inputs exist and are readable, the output
    can be written (and replaced, if it exists: see `lavie_jax.io.safe_io`). Errors name the flag."""
    if args.command == "pipeline":  # a missing flag first: it is the usage error
        flag, folder = _component_folder(args.stage, args.sd_dir, args.x4_dir)
        what = "the x4-upscaler folder" if flag == "--x4-dir" else "a diffusers Stable Diffusion v1.x folder"
        _check_folder(folder, flag, ("vae", "text_encoder"), what)
    if args.command in ("lavie", "pipeline"):
        check_input(args.checkpoint, flag="--checkpoint")
    if getattr(args, "unet_config", None) is not None:
        check_input(args.unet_config, flag="--unet-config")
    if args.command in ("sd", "x4"):
        what = "a diffusers Stable Diffusion v1.x folder" if args.command == "sd" else "the x4-upscaler folder"
        _check_folder(args.model_dir, "--model-dir", ("unet", "vae", "text_encoder"), what)
    if args.command == "export":
        check_input(args.checkpoint, flag="--checkpoint", directory=True)
        check_export_output(args.output, overwrite=args.overwrite)
    else:
        check_output_directory(args.output, CHECKPOINTS, overwrite=args.overwrite)


def _run(args: argparse.Namespace) -> None:
    check_paths(args)
    compile_cache.configure(command.cache_choice(args, compile_cache.user_cache_dir()), prog=PROG)
    report = Reporter(quiet=args.quiet)
    kw = dict(overwrite=args.overwrite, report=report, group_bytes=args.group_mb << 20)
    if args.command == "lavie":
        convert_lavie(args.checkpoint, args.output, stage=args.stage, unet_config=args.unet_config,
                      trust_pickle=args.trust_pickle, **kw)
    elif args.command == "sd":
        convert_sd(args.model_dir, args.output, stage=args.stage, seed=args.seed, trust_pickle=args.trust_pickle, **kw)
    elif args.command == "x4":
        convert_x4(args.model_dir, args.output, seed=args.seed, trust_pickle=args.trust_pickle, **kw)
    elif args.command == "pipeline":
        convert_pipeline(args.checkpoint, args.output, stage=args.stage, sd_dir=args.sd_dir, x4_dir=args.x4_dir,
                         unet_config=args.unet_config, trust_pickle=args.trust_pickle, **kw)
    else:
        from lavie_jax.io import store

        try:  # a --checkpoint export cannot read (a run without a checkpoint yet, not a checkpoint) is bad input
            source = store.open_source(args.checkpoint, flag="--checkpoint",
                                       kinds=("pipeline", "unet", "workdir", "vae", "text_encoder"))
        except store.SourceError as e:
            raise command.UsageError(str(e)) from None
        if args.adapters_only:
            if args.lora:
                raise command.UsageError("--adapters-only writes a run's own adapters; drop --lora (or "
                                         "--adapters-only to export the merged UNet)")
            info = export_run_adapter(source, args.output, ema=args.params == "ema", overwrite=args.overwrite)
            learnt = f", learned tokens {', '.join(info['tokens'])}" if info.get("tokens") else ""
            report.say(f"wrote {info['output']} (step {info['step']}): adapters of {info['layers']} layers{learnt}, "
                       f"{info['bytes'] / 1e6:.2f} MB")
            return
        lora = []
        if args.lora:
            if args.component != "unet":
                raise command.UsageError(f"--lora adapts the UNet; drop --component {args.component}")
            unet = abstract_unet(store.stored_arch(source))
            files = read_adapters(args.lora, unet)
            learnt = [w for f, _ in files for w in f.tokens]
            if learnt:  # they belong to the text encoder, which a UNet checkpoint does not hold
                report.say(f"note: learned tokens {', '.join(learnt)} are not part of a UNet checkpoint; sample with "
                           "the adapter file (lavie-sample --lora) to use them")
            lora = [(f.layers, m) for f, m in files if f.layers]
        info = export_checkpoint(source, args.output, component=args.component, overwrite=args.overwrite,
                                 group_bytes=args.group_mb << 20, ema=args.params == "ema", meter=report.meter,
                                 lora=lora)
        what = "" if info.get("step") is None else (f" (step {info['step']}, the run's latest complete checkpoint; "
                                                     f"its {'EMA' if info['params'] == 'ema' else 'raw'} params)")
        report.say(f"wrote {info['output']}{what}: {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status: 0 ok, 1 the conversion failed (an input it cannot convert,
    an output it will not replace, the machine), 130 Ctrl-C, 143 SIGTERM. A bad command line, and an export
    --checkpoint that holds nothing to export, exit with status 2 (SystemExit, as argparse does). Messages follow
    lavie_jax.cli.command."""
    startup.configure()  # collector thresholds: building the abstract model ran ~0.4 s of full collections
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        args = build_parser().parse_args(argv)
        try:
            import absl.logging  # orbax logs routine warnings through absl

            absl.logging.set_verbosity(absl.logging.ERROR)
        except ImportError:
            pass
        _run(args)

    status = command.run_main(PROG, argv, body, user_errors=CONVERSION_ERRORS, user_status=1,
                              interrupted="no partial output was left behind", guard=terminate_as_interrupt,
                              terminated=(Terminated,))
    if status == command.USAGE_STATUS:
        sys.exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
