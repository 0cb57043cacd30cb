"""The models one stage samples with, for a stage config: loaded through `lavie_jax.io.store` from a pipeline
directory (`lavie-convert`), a `lavie-train` work directory, or 'random' weights drawn from the config.

`load_stage_pipeline(config, 'random')` builds the stage's UNet from `config.unet` and the VAE / text encoder named by
`config.sample.vae` / `.text_encoder` (`lavie_jax.models.VAE_CONFIGS`, `models.clip.text_encoder_config`): 'sd14'
and 'x4' are the official components; 'tiny_f8', 'tiny_f4' and 'tiny' are CPU-sized ones for tests, demos and
benchmarks ('tiny' takes the UNet's cross-attention width). Random weights give noise videos; everything else
(shapes, compiled loops, files) is exercised for real.

`check_pipeline` refuses, before any compute, a pipeline that cannot run the config's stage: a UNet of another
stage, mismatched channels or text widths, a VAE with the wrong latent channels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from lavie_jax.convert.lora_files import AdapterFile, adapter_summary, read_adapters
from lavie_jax.io import store
from lavie_jax.io.store import RANDOM, Pipeline, SourceError
from lavie_jax.io.text import with_tokens
from lavie_jax.models.arch import arch_from_config
from lavie_jax.models.lora import LoRAError, merge_params
from lavie_jax.models.options import from_config
from lavie_jax.models.unet import abstract_unet
from lavie_jax.stages import LATENT_CHANNELS, get_stage

__all__ = ["RANDOM", "PipelineError", "apply_lora", "check_checkpoint", "check_lora", "check_pipeline",
           "load_stage_pipeline", "random_pipeline"]


class PipelineError(ValueError):
    """The models cannot run this stage config; the message names the mismatch and the fix."""


def random_pipeline(config: ml_collections.ConfigDict, seed: int = 0) -> Pipeline:
    """A stage pipeline with random weights: UNet from `config.unet`, components named by `config.sample`."""
    return store.load_pipeline(RANDOM, config=config, seed=seed, options=from_config(config))


def check_lora(config: ml_collections.ConfigDict, values: list[str], flag: str = "--lora"
               ) -> list[tuple[AdapterFile, float]]:
    """`--lora FILE[:SCALE]` values read and checked against the abstract UNet of `config` (its stage, layer names
    and shapes), before any model is loaded; LoRAError names the file and the problem."""
    if not values:
        return []
    unet = abstract_unet(arch_from_config(config.unet.to_dict(), config.stage))
    return read_adapters(values, unet, flag=flag)


def apply_lora(pipeline: Pipeline, adapters: list[tuple[AdapterFile, float]]) -> Pipeline:
    """Merge `adapters` (from `check_lora`) into the pipeline's UNet on its devices, in place: `W + sum_i m_i *
    alpha_i / r_i * B_i A_i`. The sampler then compiles the plain UNet's program (the same whatever the adapters and
    scales) and runs no adapter matmuls per step; models.lora says why merging beats keeping them unmerged. Learned
    tokens in the files replace their words' rows in (a copy of) the text encoder."""
    layers = [(f.layers, m) for f, m in adapters if f.layers]
    if layers:
        nnx.update(pipeline.unet, merge_params(pipeline.unet, layers))
    learned: dict[str, Any] = {}
    for f, _ in adapters:  # learned tokens (models.tokens): their rows as they are (a scale is the adapters' only)
        for word, row in f.tokens.items():
            if word in learned:
                raise LoRAError(f"--lora: two files learn the token {word!r} ({learned[word][0]} and {f.path}); "
                                "give one of them")
            learned[word] = (f.path, row)
    if learned:
        try:
            pipeline.text_encoder = with_tokens(pipeline.text_encoder, pipeline.tokenizer,
                                                {w: r for w, (_, r) in learned.items()}, what="--lora")
        except ValueError as e:
            raise LoRAError(f"{e} (the token of {', '.join(sorted({p for p, _ in learned.values()}))})") from None
    if adapters and jax.process_index() == 0:
        print(adapter_summary(adapters), flush=True)
    return pipeline


def load_stage_pipeline(config: ml_collections.ConfigDict, checkpoint: str | os.PathLike,
                        mesh: jax.sharding.Mesh | None = None, seed: int = 0, *, ema: bool = True) -> Pipeline:
    """The pipeline for `config`'s stage: from a pipeline directory (`lavie-convert` output), a training work
    directory (`lavie-train`; EMA params unless `ema=False`), or 'random'.

    Checks the directory's stage before loading any weights; loaded weights land on `mesh` by
    `config.sharding.rules` (random ones are drawn on the host; `StageSampler` places both)."""
    source = check_checkpoint(config, checkpoint)
    if source.kind == RANDOM:
        pipeline = random_pipeline(config, seed)
    else:
        rules = tuple(tuple(r) for r in config.sharding.rules)
        pipeline = store.load_pipeline(source, mesh=mesh, rules=rules, options=from_config(config), ema=ema)
    check_pipeline(pipeline, config.stage)
    return pipeline


def check_checkpoint(config: ml_collections.ConfigDict, checkpoint: str | os.PathLike) -> store.Source:
    """The source `checkpoint` names, after checking, without loading any weights, that it can sample `config`'s
    stage: a pipeline directory or a work directory of that stage, or 'random' (PipelineError otherwise)."""
    try:
        return store.open_source(checkpoint, stage=config.stage, flag="--checkpoint",
                                 kinds=("pipeline", "workdir", RANDOM))
    except SourceError as e:
        hint = ("; sampling needs UNet, VAE, text encoder and tokenizer: `lavie-convert pipeline` writes them "
                "together" if Path(checkpoint).is_dir() and "holds a single" in str(e) else "")
        raise PipelineError(f"{e}{hint}") from None


def check_pipeline(pipeline: Pipeline, stage: str) -> None:
    """Raise PipelineError unless the pipeline's models fit together and run `stage`."""
    arch = pipeline.unet.arch
    if arch.stage != stage or pipeline.stage != stage:
        raise PipelineError(f"the pipeline's UNet is a {arch.stage} UNet but the config is the {stage} stage; use "
                            f"a {stage} checkpoint or the {arch.stage} config (`--config {arch.stage}`)")
    latent = pipeline.vae.config.latent_channels
    if arch.out_channels != latent or latent != LATENT_CHANNELS:
        raise PipelineError(f"UNet predicts {arch.out_channels} channels and the VAE has {latent} latent channels; "
                            f"LaVie stages need {LATENT_CHANNELS} for both")
    spec = get_stage(stage)
    if arch.in_channels != spec.unet_in_channels:
        raise PipelineError(f"the {stage} stage feeds the UNet {spec.unet_in_channels} channels but its conv_in "
                            f"takes {arch.in_channels}; the checkpoint does not belong to this stage")
    hidden = pipeline.text_encoder.config.hidden_size
    if hidden != arch.cross_attention_dim:
        raise PipelineError(f"the text encoder gives {hidden}-d embeddings but the UNet cross-attends to "
                            f"{arch.cross_attention_dim}-d text; the components come from different models")
    if spec.class_labels != bool(arch.num_class_embeds):
        raise PipelineError(f"the {stage} stage {'needs' if spec.class_labels else 'has no'} a class (noise-level) "
                            f"embedding, but the UNet {'lacks' if spec.class_labels else 'has'} one")
