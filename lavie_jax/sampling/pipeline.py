"""The models one stage samples with: loaded from a pipeline directory, or randomly initialised from the config.

`load_stage_pipeline(config, 'random')` builds the stage's UNet from `config.unet` and the VAE / text encoder named by
`config.sample.vae` / `.text_encoder` (`lavie_jax.models.VAE_CONFIGS`, `models.clip.text_encoder_config`): 'sd14'
and 'x4' are the official components; 'tiny_f8', 'tiny_f4' and 'tiny' are CPU-sized ones for tests, demos and
benchmarks ('tiny' takes the UNet's cross-attention width). Random weights give noise videos; everything else
(shapes, compiled loops, files) is exercised for real. They are drawn with numpy on the host (normal / sqrt(fan_in)
kernels, unit norm scales, zero biases) from the abstract models: eager NNX initialisation compiles one op per
distinct param shape and takes tens of seconds on CPU.

`check_pipeline` refuses, before any compute, a pipeline that cannot run the config's stage: a UNet of another
stage, mismatched channels or text widths, a VAE with the wrong latent channels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lavie_jax import stages
from lavie_jax.io import checkpoints
from lavie_jax.io import workdir as workdirs
from lavie_jax.io.checkpoints import Pipeline
from lavie_jax.io.keycheck import check_keys
from lavie_jax.models import VAE_CONFIGS, abstract_text_encoder, abstract_unet, abstract_vae, arch_from_config
from lavie_jax.models.clip import text_encoder_config
from lavie_jax.io.text import load_tokenizer

RANDOM = "random"


class PipelineError(ValueError):
    """The models cannot run this stage config; the message names the mismatch and the fix."""


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


def components(sample: ml_collections.ConfigDict, directory: str | os.PathLike | None, *, width: int, seed: int,
               mesh: jax.sharding.Mesh | None = None, rules=None, dtype=jnp.float32) -> tuple:
    """(VAE, text encoder, tokenizer) of a stage: from a pipeline directory, or random (`directory` None) as named
    by `sample.vae` / `sample.text_encoder` / `sample.tokenizer` and drawn from `seed` + 1 / `seed` + 2. The one
    source of a stage's frozen components for sampling and training (a training run with random components and
    the sampler of its work directory get the very same ones)."""
    if directory is not None:
        kw = dict(mesh=mesh, rules=rules if rules is not None else checkpoints.DEFAULT_RULES, dtype=dtype)
        meta = checkpoints.read_metadata(directory)
        return (checkpoints.load_component(directory, "vae", **kw),
                checkpoints.load_component(directory, "text_encoder", **kw),
                load_tokenizer(Path(directory) / meta["components"]["tokenizer"]))
    if sample.vae not in VAE_CONFIGS:
        raise PipelineError(f"config field sample.vae: unknown {sample.vae!r}; choose one of {sorted(VAE_CONFIGS)}")
    try:
        text = abstract_text_encoder(text_encoder_config(sample.text_encoder, width), dtype=dtype)
    except ValueError as e:
        raise PipelineError(f"config field sample.text_encoder: {e}") from None
    return (randomize(abstract_vae(sample.vae, dtype=dtype), seed + 1), randomize(text, seed + 2),
            load_tokenizer(flavor=sample.tokenizer))


def random_pipeline(config: ml_collections.ConfigDict, seed: int = 0) -> Pipeline:
    """A stage pipeline with random weights: UNet from `config.unet`, components named by `config.sample`."""
    arch = arch_from_config(config.unet.to_dict(), config.stage)
    unet = abstract_unet(arch, dtype=jnp.dtype(config.model.dtype), attention_impl=config.model.attention_impl)
    vae, text, tokenizer = components(config.sample, None, width=arch.cross_attention_dim, seed=seed)
    return Pipeline(stage=config.stage, unet=randomize(unet, seed), vae=vae, text_encoder=text, tokenizer=tokenizer,
                    metadata={"source": RANDOM})


def workdir_pipeline(config: ml_collections.ConfigDict, directory: str | os.PathLike,
                     mesh: jax.sharding.Mesh | None = None, *, ema: bool = True) -> Pipeline:
    """The pipeline of a `lavie-train` work directory: the UNet of its latest complete checkpoint (the EMA of the
    trained params by default, the raw params with `ema=False`) and the frozen components the run trained with."""
    step, stored, params = workdirs.read_params(directory, ema=ema)
    stage = stored.get("stage")
    if stage != config.stage:
        raise PipelineError(f"--checkpoint {directory} is a {stage} training run but the config is the "
                            f"{config.stage} stage; pass configs/{stage}.py")
    train = ml_collections.ConfigDict(stored["train"])
    arch = arch_from_config(stored["unet"], stage)
    dtype = jnp.dtype(config.model.dtype)
    unet = abstract_unet(arch, dtype=dtype, attention_impl=config.model.attention_impl)
    state = nnx.state(unet, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    names = {".".join(map(str, p)): p for p in flat}
    check_keys({n: tuple(flat[p].shape) for n, p in names.items()}, {n: v.shape for n, v in params.items()},
               what=f"training checkpoint {directory} (step {step})")
    for name, path in names.items():
        flat[path].set_value(jnp.asarray(params[name]))
    nnx.update(unet, state)
    encoders = train.encoders if train.encoders else (train.init or None)
    if encoders == RANDOM:
        encoders = None
    elif encoders is not None and checkpoints.read_metadata(encoders).get("kind") != "pipeline":
        raise PipelineError(f"--checkpoint {directory}: its run took the VAE and text encoder from {encoders}, which "
                            "is not a pipeline directory any more")
    sample = ml_collections.ConfigDict(stored["sample"])
    rules = tuple(tuple(r) for r in config.sharding.rules)
    vae, text, tokenizer = components(sample, encoders, width=arch.cross_attention_dim, seed=train.seed, mesh=mesh,
                                      rules=rules, dtype=dtype)
    return Pipeline(stage=stage, unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                    metadata={"source": str(directory), "step": step, "params": "ema" if ema else "raw"})


def load_stage_pipeline(config: ml_collections.ConfigDict, checkpoint: str | os.PathLike,
                        mesh: jax.sharding.Mesh | None = None, seed: int = 0, *, ema: bool = True) -> Pipeline:
    """The pipeline for `config`'s stage: from a pipeline directory (`lavie-convert` output), a training work
    directory (`lavie-train`; EMA params unless `ema=False`), or 'random'.

    Checks the directory's stage before loading any weights; loaded weights land on `mesh` by
    `config.sharding.rules` (random ones are drawn on the host; `StageSampler` places both).
    """
    rules = tuple(tuple(r) for r in config.sharding.rules)
    directory = check_checkpoint(config, checkpoint)
    if directory is None:
        pipeline = random_pipeline(config, seed)
    elif workdirs.is_workdir(directory):
        pipeline = workdir_pipeline(config, directory, mesh, ema=ema)
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
                            f"`lavie-convert pipeline|sd|x4`, a `lavie-train` work directory, or 'random' for "
                            f"random weights")
    if workdirs.is_workdir(directory):
        stage = json.loads((directory / workdirs.MARKER).read_text()).get("stage")
        if stage is not None and stage != config.stage:
            raise PipelineError(f"--checkpoint {directory} is a {stage} training run but the config is the "
                                f"{config.stage} stage; pass configs/{stage}.py")
        with workdirs.TrainCheckpointer(directory, save_every=0, read_only=True) as ckpt:
            latest = ckpt.latest_step()
        if latest is None:
            raise PipelineError(f"--checkpoint {directory}: the training run has no complete checkpoint yet")
        return directory
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
    spec = stages.get_stage(stage)
    want = spec.unet_in_channels
    if arch.in_channels != want:
        raise PipelineError(f"the {stage} stage feeds the UNet {want} channels but its conv_in takes "
                            f"{arch.in_channels}; the checkpoint does not belong to this stage")
    hidden = pipeline.text_encoder.config.hidden_size
    if hidden != arch.cross_attention_dim:
        raise PipelineError(f"the text encoder gives {hidden}-d embeddings but the UNet cross-attends to "
                            f"{arch.cross_attention_dim}-d text; the components come from different models")
    if spec.class_labels != bool(arch.num_class_embeds):
        raise PipelineError(f"the {stage} stage {'needs' if spec.class_labels else 'has no'} a class (noise-level) "
                            f"embedding, but the UNet {'lacks' if spec.class_labels else 'has'} one")
