"""The stages of the cascade as objects: `get_stage('base')`, `STAGES` (their names, in cascade order).

Every layer asks a stage for what differs between stages (see `core.Stage`) instead of testing its name:

    stage = get_stage(config.stage)
    stage.unet_in_channels, stage.dropped_text, stage.to_uint8(frames), stage.unet_sample(latents, condition)

Each stage lives in its own module (`base`, `i2v`, `interpolation`, `vsr`), beside the facts they share (`core`) and the
pretrained 2D models they are inflated from (`families`). A new stage is a module defining a `core.Stage` subclass
and its `STAGE`, added to `_MODULES` below.
"""

from __future__ import annotations

from lavie_jax.stages import base, i2v, interpolation, vsr
from lavie_jax.stages.core import (LATENT_CHANNELS, RequestError, Stage, StageConfigError, TrainingInputs,
                                   UNetFamily, pixels_to_unit)
from lavie_jax.stages.families import FAMILIES

_MODULES = (base, i2v, interpolation, vsr)
REGISTRY: dict[str, Stage] = {m.STAGE.name: m.STAGE for m in sorted(_MODULES, key=lambda m: m.STAGE.rank)}
STAGES: tuple[str, ...] = tuple(REGISTRY)  # names, in cascade order


def get_stage(stage: str | Stage, what: str = "stage") -> Stage:
    """The stage object of a name (a Stage passes through); ValueError naming `what` (a config field or flag)
    and the choices otherwise."""
    if isinstance(stage, Stage):
        return stage
    if stage not in REGISTRY:
        raise ValueError(f"{what}: {stage!r} is not a LaVie stage; choose one of {STAGES}")
    return REGISTRY[stage]


def check_stage(stage: str, what: str = "stage") -> str:
    """`stage` if it names a stage, else the ValueError of `get_stage`."""
    return get_stage(stage, what).name


def official_unet_config(stage: str | Stage) -> dict:
    """A fresh copy of the released UNet config of `stage` (diffusers style, `stage` key set)."""
    return get_stage(stage).official_unet()


def in_family(family: str) -> tuple[Stage, ...]:
    """The stages whose UNet is inflated from `family` ('sd' or 'x4'), in cascade order."""
    return tuple(s for s in REGISTRY.values() if s.family.name == family)


def cascade_after(stage: str | Stage) -> tuple[Stage, ...]:
    """The stages that can follow `stage` in a cascade, in order (each refines the video of the one before)."""
    rank = get_stage(stage).rank
    return tuple(s for s in REGISTRY.values() if s.rank > rank)


__all__ = ["FAMILIES", "LATENT_CHANNELS", "REGISTRY", "STAGES", "RequestError", "Stage", "StageConfigError",
           "TrainingInputs", "UNetFamily", "cascade_after", "check_stage", "get_stage", "in_family",
           "official_unet_config", "pixels_to_unit"]
