"""The models one stage samples with: loaded from a pipeline directory, or randomly initialised from the config.

`load_stage_pipeline(config, 'random')` builds the stage's UNet from `config.unet` and the VAE / text encoder named by
`config.sample.vae` / `.text_encoder`: 'sd14' and 'x4' are the official components; 'tiny_f8', 'tiny_f4' and
'tiny' are CPU-sized ones for tests, demos and benchmarks ('tiny' takes the UNet's cross-attention width). Random
weights give noise videos; everything else (shapes, compiled loops, files) is exercised for real. They are drawn
with numpy on the host (normal / sqrt(fan_in) kernels, unit norm scales, zero biases) from the abstract models:
eager NNX initialisation compiles one op per distinct param shape and takes tens of seconds on CPU.

`check_pipeline` refuses, before any compute, a pipeline that cannot run the config's stage: a UNet of another
stage, mismatched channels or text widths, a VAE with the wrong latent channels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lavie_jax import checkpoints
from lavie_jax.checkpoints import Pipeline
from lavie_jax.models import UNet3D, abstract_text_encoder, abstract_vae, arch_from_config
from lavie_jax.models.clip import SD14_TEXT_ENCODER, X4_TEXT_ENCODER
from lavie_jax.models.vae import SD14_VAE, X4_VAE
from lavie_jax.text import load_tokenizer

VAES: dict[str, dict[str, Any]] = {
    "sd14": SD14_VAE,
    "x4": X4_VAE,
    "tiny_f8": {**SD14_VAE, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8},
    "tiny_f4": {**X4_VAE, "block_out_channels": [16, 32, 32], "norm_num_groups": 8},
}
TEXT_ENCODERS = {"sd14": SD14_TEXT_ENCODER, "x4": X4_TEXT_ENCODER}
# latent channels the UNet adds to the 4 noisy latents: interpolation's conditioning latents, VSR's low-res RGB
CONDITION_CHANNELS = {"base": 0, "interpolation": 4, "vsr": 3}
RANDOM = "random"


class PipelineError(ValueError):
    """The models cannot run this stage config; the message names the mismatch and the fix."""


def text_encoder_config(name: str, cross_attention_dim: int) -> dict[str, Any]:
    """A CLIP text encoder config by name; 'tiny' is a 2-layer encoder of width `cross_attention_dim` with the
    real 49,408-token vocabulary (so the real tokenizer works)."""
    if name == "tiny":
        return {**SD14_TEXT_ENCODER, "hidden_size": cross_attention_dim, "intermediate_size": 2 * cross_attention_dim,
                "num_hidden_layers": 2, "num_attention_heads": 2}
    if name not in TEXT_ENCODERS:
        raise PipelineError(f"config field sample.text_encoder: unknown {name!r}; choose 'sd14', 'x4' or 'tiny'")
    return TEXT_ENCODERS[name]


def randomize(model: nnx.Module, seed: int) -> nnx.Module:
    """Fill a concrete or abstract model's params with host-drawn random values (module docstring), in place."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape, leaf = tuple(var.shape), str(path[-1])
        if leaf == "scale":
            value = np.ones(shape, np.float32)
        elif len(shape) == 1:
            value = np.zeros(shape, np.float32)
        else:
            value = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
        var.set_value(jnp.asarray(value))
    nnx.update(model, state)
    return model


def random_pipeline(config: ml_collections.ConfigDict, seed: int = 0) -> Pipeline:
    """A stage pipeline with random weights: UNet from `config.unet`, components named by `config.sample`."""
    s = config.sample
    if s.vae not in VAES:
        raise PipelineError(f"config field sample.vae: unknown {s.vae!r}; choose one of {sorted(VAES)}")
    dtype = jnp.dtype(config.model.dtype)
    arch = arch_from_config(config.unet.to_dict(), config.stage)
    unet = nnx.eval_shape(lambda: UNet3D(arch, rngs=nnx.Rngs(0), dtype=dtype,
                                         attention_impl=config.model.attention_impl))
    text = abstract_text_encoder(text_encoder_config(s.text_encoder, arch.cross_attention_dim))
    return Pipeline(stage=config.stage, unet=randomize(unet, seed), vae=randomize(abstract_vae(VAES[s.vae]), seed + 1),
                    text_encoder=randomize(text, seed + 2), tokenizer=load_tokenizer(flavor=s.tokenizer),
                    metadata={"source": RANDOM})


def load_stage_pipeline(config: ml_collections.ConfigDict, checkpoint: str | os.PathLike,
                        mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> Pipeline:
    """The pipeline for `config`'s stage: from a pipeline directory (`lavie-convert` output), or 'random'.

    Checks the directory's stage before loading any weights; loaded weights land on `mesh` by
    `config.sharding.rules` (random ones are drawn on the host; `StageSampler` places both).
    """
    rules = tuple(tuple(r) for r in config.sharding.rules)
    directory = check_checkpoint(config, checkpoint)
    if directory is None:
        pipeline = random_pipeline(config, seed)
    else:
        pipeline = checkpoints.load_pipeline(directory, mesh=mesh, rules=rules, dtype=jnp.dtype(config.model.dtype),
                                             attention_impl=config.model.attention_impl)
    check_pipeline(pipeline, config.stage)
    return pipeline


def check_checkpoint(config: ml_collections.ConfigDict, checkpoint: str | os.PathLike) -> Path | None:
    """The pipeline directory `checkpoint` names (None for 'random'), after checking, without loading any weights,
    that it is a pipeline of `config`'s stage (PipelineError otherwise)."""
    if str(checkpoint) == RANDOM:
        return None
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise PipelineError(f"--checkpoint {directory}: no such directory; pass a pipeline directory written by "
                            f"`lavie-convert pipeline|sd|x4`, or 'random' for random weights")
    meta = checkpoints.read_metadata(directory)
    if meta.get("kind") != "pipeline":
        raise PipelineError(f"--checkpoint {directory} holds a single {meta.get('kind')}, not a pipeline; "
                            f"sampling needs UNet, VAE, text encoder and tokenizer: `lavie-convert pipeline`")
    if meta.get("stage") != config.stage:
        raise PipelineError(f"--checkpoint {directory} is a {meta.get('stage')} pipeline but the config is the "
                            f"{config.stage} stage; pass configs/{meta.get('stage')}.py or a {config.stage} "
                            f"checkpoint")
    return directory


def check_pipeline(pipeline: Pipeline, stage: str) -> None:
    """Raise PipelineError unless the pipeline's models fit together and run `stage`."""
    arch = pipeline.unet.arch
    if arch.stage != stage or pipeline.stage != stage:
        raise PipelineError(f"the pipeline's UNet is a {arch.stage} UNet but the config is the {stage} stage; use "
                            f"a {stage} checkpoint or configs/{arch.stage}.py")
    latent = pipeline.vae.config.latent_channels
    if arch.out_channels != latent or latent != 4:
        raise PipelineError(f"UNet predicts {arch.out_channels} channels and the VAE has {latent} latent channels; "
                            "LaVie stages need 4 for both")
    want = latent + CONDITION_CHANNELS[stage]
    if arch.in_channels != want:
        raise PipelineError(f"the {stage} stage feeds the UNet {want} channels but its conv_in takes "
                            f"{arch.in_channels}; the checkpoint does not belong to this stage")
    hidden = pipeline.text_encoder.config.hidden_size
    if hidden != arch.cross_attention_dim:
        raise PipelineError(f"the text encoder gives {hidden}-d embeddings but the UNet cross-attends to "
                            f"{arch.cross_attention_dim}-d text; the components come from different models")
    if (stage == "vsr") != bool(arch.num_class_embeds):
        raise PipelineError(f"the {stage} stage {'needs' if stage == 'vsr' else 'has no'} a noise-level class "
                            f"embedding, but the UNet {'lacks' if stage == 'vsr' else 'has'} one")
