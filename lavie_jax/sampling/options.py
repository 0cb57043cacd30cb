"""The `sample` section of a stage config, validated into a frozen `SampleOptions` (errors name the field).

Field meanings and official defaults: the packaged configs (`configs/common.py` SAMPLE, shared, and each stage's
`configs/STAGE.py` OFFICIAL), which follow the official sampling scripts of each stage (schedulers, guidance,
negative prompts, seeds). The fields every stage has are `SampleOptions`' own; a stage's own fields
(`Stage.sample_fields`: base's frame count and size, VSR's chunks and noise level, ...) are read as attributes too
and checked by the stage (`Stage.check_sample`). Everything here is checked before any model runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lavie_jax.diffusion import BETA_SCHEDULES, PREDICTION_TYPES, SAMPLERS, TIMESTEP_SPACINGS, Sampler, make_sampler
from lavie_jax.stages import STAGES, Stage, get_stage

FORMATS = ("mp4", "gif")
# steps_offset -1 means the official pipeline's choice: diffusers 0.16 DDPM ignored the SD config's offset of 1,
# its DDIM used it (spec 4.1)
AUTO_STEPS_OFFSET = {"ddpm": 0, "ddim": 1, "euler": 0, "ddim_respaced": 0, "ddpm_respaced": 0}
# timestep_spacing 'auto': diffusers 0.16's EulerDiscrete knew only linspace; its DDPM and DDIM used 'leading'
AUTO_SPACING = {"ddpm": "leading", "ddim": "leading", "euler": "linspace", "ddim_respaced": "leading",
                "ddpm_respaced": "leading"}


class SampleConfigError(ValueError):
    """A `sample` config field has a bad value; the message names the field and what it accepts."""


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    stage: str
    sampler: str
    steps: int
    guidance_scale: float
    negative_prompt: str
    cond_first: bool
    seed: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    num_train_timesteps: int
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    eta: float
    set_alpha_to_one: bool
    prompt_suffix: str
    underscore_prompts: bool
    batch_size: int
    decode_chunk: int
    formats: tuple[str, ...]
    quality: int
    fps: float
    vae: str
    text_encoder: str
    tokenizer: str
    steps_per_call: int = 1  # denoising steps per compiled call (control returns to Python between calls)
    # the stage's own fields (`Stage.sample_fields`) as (name, value) pairs, read as attributes
    stage_fields: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        for key, value in self.__dict__.get("stage_fields", ()):
            if key == name:
                return value
        raise AttributeError(f"sample options of the {self.__dict__.get('stage')} stage have no field {name!r}")

    @property
    def spec(self) -> Stage:
        """The stage object these options sample."""
        return get_stage(self.stage)

    @property
    def classifier_free_guidance(self) -> bool:
        """Official pipelines guide when the scale is above 1; otherwise the model sees the prompt only."""
        return self.guidance_scale > 1.0

    def make_sampler(self) -> Sampler:
        offset = AUTO_STEPS_OFFSET[self.sampler] if self.steps_offset == -1 else self.steps_offset
        spacing = AUTO_SPACING[self.sampler] if self.timestep_spacing == "auto" else self.timestep_spacing
        return make_sampler(self.sampler, self.steps, beta_schedule=self.beta_schedule, beta_start=self.beta_start,
                            beta_end=self.beta_end, num_train_timesteps=self.num_train_timesteps,
                            prediction_type=self.prediction_type, timestep_spacing=spacing,
                            steps_offset=offset, eta=self.eta, set_alpha_to_one=self.set_alpha_to_one)


_COMMON_FIELDS = tuple(f.name for f in dataclasses.fields(SampleOptions) if f.name not in ("stage", "stage_fields"))


def _fail(field: str, message: str) -> None:
    raise SampleConfigError(f"config field sample.{field}: {message}")


def sample_options(stage: str | Stage, sample: Mapping[str, Any]) -> SampleOptions:
    """Validate a stage config's `sample` section (a ConfigDict or dict) into SampleOptions."""
    if isinstance(stage, str) and stage not in STAGES:
        raise SampleConfigError(f"config field stage: {stage!r} is not one of {STAGES}")
    stage = get_stage(stage)
    values = dict(sample.to_dict() if hasattr(sample, "to_dict") else sample)
    own = dict(stage.sample_fields)
    unknown = sorted(k for k in values if k not in _COMMON_FIELDS and k not in own)
    if unknown:
        raise SampleConfigError(f"config section sample has fields {unknown} that the {stage.name} stage does not "
                                "use; remove them")
    required = {f.name for f in dataclasses.fields(SampleOptions) if f.default is dataclasses.MISSING} - {"stage"}
    missing = sorted(required - set(values))
    if missing:
        raise SampleConfigError(f"config section sample lacks {missing}; start from the packaged config "
                                f"{stage.name} (--config {stage.name})")
    formats = values["formats"]
    values["formats"] = tuple(f.strip() for f in formats.split(",")) if isinstance(formats, str) else tuple(formats)
    extra = tuple((k, values.pop(k, default)) for k, default in own.items())
    opts = SampleOptions(stage=stage.name, stage_fields=extra, **values)
    _validate(opts, stage)
    return opts


def _validate(o: SampleOptions, stage: Stage) -> None:
    choices = {"sampler": SAMPLERS, "prediction_type": PREDICTION_TYPES,
               "timestep_spacing": ("auto",) + TIMESTEP_SPACINGS, "beta_schedule": BETA_SCHEDULES}
    for field, allowed in choices.items():
        if getattr(o, field) not in allowed:
            _fail(field, f"{getattr(o, field)!r} is not one of {allowed}")
    for field in ("steps", "decode_chunk", "steps_per_call"):
        value = getattr(o, field)
        if not isinstance(value, int) or value <= 0:
            _fail(field, f"expected a positive int, got {value!r}")
    if o.batch_size < 0:
        _fail("batch_size", f"expected >= 0, got {o.batch_size}")
    if not isinstance(o.seed, int) or not 0 <= o.seed < 2 ** 32:
        _fail("seed", f"expected an int in 0..2^32-1, got {o.seed!r}")
    if o.steps_offset < -1:
        _fail("steps_offset", f"expected -1 (official for the sampler) or >= 0, got {o.steps_offset}")
    if o.sampler in ("ddim_respaced", "ddpm_respaced") and o.prediction_type != "epsilon":
        _fail("prediction_type", f"the respaced (guided-diffusion) sampler {o.sampler} is epsilon-prediction only")
    if o.guidance_scale < 0:
        _fail("guidance_scale", f"expected >= 0, got {o.guidance_scale}")
    bad = [f for f in o.formats if f not in FORMATS]
    if bad or not o.formats:
        _fail("formats", f"{','.join(o.formats)!r}: choose from {FORMATS}, comma-separated")
    if not 0 <= o.quality <= 10:
        _fail("quality", f"expected 0..10 (imageio scale), got {o.quality}")
    if o.fps < 0:
        _fail("fps", f"expected > 0 (or 0 for VSR: the input's rate), got {o.fps}")
    if o.fps == 0 and not stage.fps_follows_input:
        _fail("fps", "0 (the input's rate) is for the vsr stage only")
    try:
        o.make_sampler()
    except ValueError as e:
        raise SampleConfigError(f"config section sample: {e}") from e
    stage.check_start_step(o, _fail)
    stage.check_sample(o, _fail)
