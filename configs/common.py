"""Pieces shared by the stage configs (`configs/{base,interpolation,vsr}.py`).

A stage config is an ml_collections ConfigDict with sections:
  stage        'base' | 'interpolation' | 'vsr'
  unet         diffusers-style UNet config dict (+ `stage`), parsed by `lavie_jax.models.arch_from_config`
  model        dtype ('float32' | 'bfloat16' computation; params are always float32), attention_impl (None = XLA,
               'cudnn' on GPU)
  mesh         shape over axes ('data', 'fsdp', 'context', 'tensor'), one -1 = the remaining devices
  sharding     rules: logical param axis -> mesh axis (see lavie_jax.parallel)
  data         input pipeline (see lavie_jax.data.pipeline)
  sample       sampling (see lavie_jax.sampling.options): the official procedure of ../shared/spec/lavie.md section 4
Variants: the default (or 'full') is the official full-size architecture; 'tiny' is CPU sized (a few seconds per
forward pass) and runs on the embedded moving_shapes data.
"""

from __future__ import annotations

import ml_collections

from lavie_jax.data.pipeline import default_data_config
from lavie_jax.models.official import official_unet_config
from lavie_jax.parallel import DEFAULT_RULES

VARIANTS = ("full", "tiny")


# Sampling defaults shared by the stages, then each stage's official values (spec section 4; comments say where
# a value comes from when it is not in the stage's sample.yaml).
SAMPLE_COMMON = {
    "steps": 50,
    "beta_schedule": "linear",  # every LaVie denoiser overrides its scheduler's betas to linear 1e-4..0.02
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    # 'auto' / -1: what the official pipeline used with `sampler`: ddpm 'leading' + 0, ddim 'leading' + 1, euler
    # 'linspace' (see lavie_jax.sampling.options)
    "timestep_spacing": "auto",
    "steps_offset": -1,
    "eta": 0.0,
    "set_alpha_to_one": False,  # SD and x4 scheduler configs: the last DDIM step ends at alpha_bar[0]
    "prompt_suffix": "",
    "underscore_prompts": False,  # True: the prompt is the official file stem, spaces replaced by underscores
    "batch_size": 0,  # rows (prompts, or prompt x chunk for VSR) per compiled call; 0 = all of a request at once
    "decode_chunk": 4,  # frames per VAE decoder call (memory only; frames decode independently)
    "formats": "mp4",  # comma-separated: mp4, gif
    "quality": 9,  # imageio quality of the mp4 (LaVie writes 9)
    # components of a randomly initialised pipeline (`--checkpoint random`); a checkpoint brings its own
    "vae": "sd14",
    "text_encoder": "sd14",
    "tokenizer": "sd14",
}
SAMPLE_STAGE = {
    "base": {"sampler": "ddpm", "guidance_scale": 7.5, "negative_prompt": "", "cond_first": False, "seed": 400,
             "num_frames": 16, "height": 320, "width": 512, "fps": 8},  # seed 400: the README gallery
    "interpolation": {"sampler": "ddim_respaced", "guidance_scale": 4.0, "negative_prompt": "None",
                      "cond_first": True, "seed": 3418, "num_frames": 0,  # 0: 4K - 3 frames from K (61 from 16)
                      "height": 320, "width": 512, "fps": 24, "prompt_suffix": ", 4k.", "underscore_prompts": True},
    "vsr": {"sampler": "ddim", "prediction_type": "v_prediction", "guidance_scale": 5.0,
            "negative_prompt": "blur, worst quality", "cond_first": False, "seed": 10, "chunk_frames": 8,
            "noise_level": 50, "low_res_beta_schedule": "scaled_linear", "low_res_beta_start": 1e-4,
            "low_res_beta_end": 0.02, "fps": 0,  # 0: the input video's frame rate
            "underscore_prompts": True, "vae": "x4", "text_encoder": "x4", "tokenizer": "x4"},
}
SAMPLE_TINY = {
    "base": {"steps": 4, "num_frames": 4, "height": 32, "width": 48, "vae": "tiny_f8", "text_encoder": "tiny"},
    "interpolation": {"steps": 4, "height": 32, "width": 48, "vae": "tiny_f8", "text_encoder": "tiny"},
    "vsr": {"steps": 4, "vae": "tiny_f4", "text_encoder": "tiny"},
}


def sample_config(stage: str, variant: str) -> ml_collections.ConfigDict:
    """The `sample` section of `stage`: official procedure and defaults, CPU sized for 'tiny'."""
    values = {**SAMPLE_COMMON, **SAMPLE_STAGE[stage], **(SAMPLE_TINY[stage] if variant == "tiny" else {})}
    return ml_collections.ConfigDict(values)


def parse_variant(arg: str | None) -> str:
    variant = arg or "full"
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS} (e.g. configs/base.py:tiny)")
    return variant


def stage_config(stage: str, variant: str, tiny_unet: dict) -> ml_collections.ConfigDict:
    """The config of `stage`: official UNet for 'full', the official one with `tiny_unet` overrides for 'tiny'."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    unet = official_unet_config(stage)
    if variant == "tiny":
        unet.update(tiny_unet)
    c.unet = unet
    c.model = ml_collections.ConfigDict({"dtype": "float32", "attention_impl": None})
    c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1, 1)})
    c.sharding = ml_collections.ConfigDict({"rules": tuple(DEFAULT_RULES)})
    c.data = default_data_config(stage)
    c.sample = sample_config(stage, variant)
    if variant == "tiny":
        c.data.global_batch_size = 2
        c.data.height, c.data.width = (0, 0) if stage == "vsr" else (64, 96)
        c.data.patch_size = 64
        c.data.moving_shapes.num_videos, c.data.moving_shapes.num_validation = 16, 4
    return c
