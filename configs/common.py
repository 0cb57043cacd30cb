"""Pieces shared by the stage configs (`configs/{base,interpolation,vsr}.py`).

A stage config is an ml_collections ConfigDict with sections:
  stage        'base' | 'interpolation' | 'vsr'
  unet         diffusers-style UNet config dict (+ `stage`), parsed by `lavie_jax.models.arch_from_config`
  model        dtype ('float32' | 'bfloat16' computation; params are always float32), attention_impl (None = XLA,
               'cudnn' on GPU)
  mesh         shape over axes ('data', 'fsdp', 'context', 'tensor'), one -1 = the remaining devices
  sharding     rules: logical param axis -> mesh axis (see lavie_jax.parallel)
  data         input pipeline (see lavie_jax.data.pipeline)
Variants: the default (or 'full') is the official full-size architecture; 'tiny' is CPU sized (a few seconds per
forward pass) and runs on the embedded moving_shapes data.
"""

from __future__ import annotations

import ml_collections

from lavie_jax.data.pipeline import default_data_config
from lavie_jax.models.official import official_unet_config
from lavie_jax.parallel import DEFAULT_RULES

VARIANTS = ("full", "tiny")


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
    if variant == "tiny":
        c.data.global_batch_size = 2
        c.data.height, c.data.width = (0, 0) if stage == "vsr" else (64, 96)
        c.data.patch_size = 64
        c.data.moving_shapes.num_videos, c.data.moving_shapes.num_validation = 16, 4
    return c
