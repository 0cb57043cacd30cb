"""What a cascade stage is: the `Stage` interface every layer asks, and the facts all stages share.

A stage is one object (`lavie_jax.stages.get_stage(name)`), defined in its own module (`stages/base.py`,
`interpolation.py`, `vsr.py`). Sampling, training, the input pipeline, conversion, the demo and the benchmarks ask it
for what differs between stages (its UNet family and presets, conditioning, data fields, sampling options, pixel
rule) and never test its name. A new stage is a new module with a `Stage` subclass, registered in `__init__.py`.

Conditioning, the same code for training and sampling:

| stage           | UNet input channels                         | conditioning                                        |
|-----------------|---------------------------------------------|-----------------------------------------------------|
| `base`          | 4 noisy latents                             | text only                                           |
| `interpolation` | 4 noisy latents + 4 key-frame latents       | latents of K key frames, repeated to 4K - 3 frames  |
| `vsr`           | 4 noisy latents + 3 low-res RGB             | low-res frames in [-1, 1] noised at a level that is |
|                 |                                             | also the UNet's class label                         |

Everything here is pure (numpy / jax) and imports nothing of lavie_jax but `diffusion`; arrays are channels-last
`[N, F, H, W, C]`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

LATENT_CHANNELS = 4


class RequestError(ValueError):
    """A sampling request cannot run (no prompts, wrong frame counts or sizes, ...); nothing was computed."""


class StageConfigError(ValueError):
    """A config field does not fit the stage; `field` names it (e.g. 'data.num_frames'), `message` says why."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclasses.dataclass(frozen=True)
class UNetFamily:
    """The pretrained 2D model a stage's UNet is inflated from, and what comes with it.

    `pretrained_unet`: its diffusers `unet/config.json`; `tokenizer`: the pad flavour of its CLIP tokenizer
    (`lavie_jax.io.text`); `official_names`: how the official 3D code of this family names our temporal layers
    in its state dicts (our path segment -> theirs); `shared_rotary`: the family's state dicts carry one extra
    rotary `freqs` buffer shared by its temporal modules."""

    name: str  # 'sd' | 'x4': also the `lavie-convert` command that inflates it
    description: str
    pretrained_unet: Mapping[str, Any]
    tokenizer: str
    official_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    shared_rotary: bool = False

    @property
    def pretrained_in_channels(self) -> int:
        return int(self.pretrained_unet["in_channels"])


# How decoded frames in [-1, 1] become 8-bit pixels (`Stage.pixel_rule`).
def _round_pixels(x: jax.Array) -> jax.Array:
    """`((x / 2 + 0.5) * 255 + 0.5).clamp(0, 255)` then a uint8 cast (base and interpolation scripts)."""
    return jnp.clip((x / 2 + 0.5) * 255 + 0.5, 0, 255).astype(jnp.uint8)


def _truncate_pixels(x: jax.Array) -> jax.Array:
    """The official VSR script: clamp to [-1, 1], `(x / 2 + 0.5).clamp(0, 1) * 255`, `.to(torch.uint8)`, which drops
    the fraction; so its pixels come out at or below the rounded ones."""
    return jnp.floor(jnp.clip(jnp.clip(x, -1.0, 1.0) / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


PIXEL_RULES: dict[str, Callable[[jax.Array], jax.Array]] = {"round": _round_pixels, "truncate": _truncate_pixels}


def pixels_to_unit(frames: jax.Array) -> jax.Array:
    """uint8 frames -> float32 in [-1, 1] (x / 127.5 - 1, the official `x / 255 * 2 - 1`)."""
    return frames.astype(jnp.float32) / 127.5 - 1.0


def rows_of(values: jax.Array, like: jax.Array) -> jax.Array:
    """Scalars or per-row `[N]` values broadcast against `like [N, ...]`, float32."""
    v = jnp.asarray(values, jnp.float32)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


@dataclasses.dataclass
class TrainingInputs:
    """What `Stage.training_inputs` gets from the training step: the micro-batch and the ways to draw from it.

    `latents(pixels, stream)`: scaled latents of pixel frames `[b, F, H, W, 3]` (a posterior sample of the frozen
    VAE drawn from the examples' keys and `stream`); `text(stream, emb_key, token_key, per_example)`: caption
    embeddings after text dropout (precomputed `emb_key` or tokens `token_key`; `per_example` K rows per example);
    `draw(stream, fn)`: `fn(key)` per example, stacked; `tables`: the step's host tables (`Stage.training_tables`);
    `settings`: the objective's fields (`image_loss_weight`, `noise_level_max`, ...). Streams are names of the
    training step's random streams, so every stage draws from its own."""

    batch: Mapping[str, jax.Array]
    latents: Callable[[jax.Array, str], jax.Array]
    text: Callable[..., jax.Array]
    draw: Callable[[str, Callable[[jax.Array], jax.Array]], jax.Array]
    tables: Mapping[str, jax.Array]
    settings: Any


class Stage:
    """One stage of the cascade (module docstring). Subclasses set the class attributes and override the methods
    whose default does not fit; instances are stateless singletons, hashable and usable as static jit arguments."""

    name: ClassVar[str]
    seed_id: ClassVar[int]  # folded into sampling seeds so the stages draw independent noise
    rank: ClassVar[int]  # position in the cascade: 0 makes videos, a later stage refines the one before's
    family: ClassVar[UNetFamily]
    condition_channels: ClassVar[int]  # UNet input channels beside the 4 noisy latents
    # the text that replaces a caption under classifier-free-guidance dropout in training
    dropped_text: ClassVar[str]
    pixel_rule: ClassVar[str]  # `PIXEL_RULES` key
    unet_preset: ClassVar[Mapping[str, Any]]  # UNetArch options the stage's official code fixes (models.arch)
    released_unet: ClassVar[Mapping[str, Any]]  # the config the released UNet was built from (diffusers style)
    official_param_count: ClassVar[int]  # learnable parameters of the released UNet (less the rotary buffers)
    class_labels: ClassVar[bool] = False  # the UNet takes a per-example class label
    takes_video: ClassVar[bool] = False  # sampling input: prompts only, or an input video per prompt
    takes_images: ClassVar[bool] = False  # the input may be still images (`lavie-sample --image`), with prompts
    # training: the stages whose checkpoints a run may start from (`train.init`) beside its own; their UNet must be
    # this one's but for conv_in, whose extra input channels start at zero (so step 0 computes what they did)
    init_from: ClassVar[tuple[str, ...]] = ()
    # training: the step encodes pixels with the frozen VAE even when the data holds precomputed latents
    encodes_in_step: ClassVar[bool] = False
    fps_follows_input: ClassVar[bool] = False  # `sample.fps = 0` may mean "the input video's frame rate"
    # data: which examples the input pipeline makes ('clip', 'key_frames', 'patches'; lavie_jax.data.examples) and
    # the batch key whose latents are the UNet's x_0
    examples: ClassVar[str] = "clip"
    pixel_key: ClassVar[str] = "video"
    low_res_input: ClassVar[bool] = False  # examples carry low-res frames `lr` (stored with precomputed latents)
    # the example key holding what sampling takes as its input video (None: prompts only); with `pixel_key` (the
    # real clip the sample should match) it makes held-out examples into evaluation requests (train.eval)
    input_key: ClassVar[str | None] = None
    # stage-specific fields of the config's `sample` section (lavie_jax.sampling.options), with their defaults
    sample_fields: ClassVar[Mapping[str, Any]] = {}

    def __repr__(self) -> str:
        return f"<stage {self.name}>"

    def __reduce__(self):  # pickles (grain workers, dataclasses) by name: one object per stage
        from lavie_jax.stages import get_stage

        return get_stage, (self.name,)

    # ------------------------------------------------------------------------------------------------ UNet

    @property
    def unet_in_channels(self) -> int:
        """Channels the stage feeds its UNet: 4 latents plus the conditioning channels."""
        return LATENT_CHANNELS + self.condition_channels

    def official_unet(self) -> dict[str, Any]:
        """A fresh copy of the released UNet's config (diffusers style, with the `stage` key set)."""
        return dict(copy.deepcopy(dict(self.released_unet)), stage=self.name)

    def unet_sample(self, latents: jax.Array, condition: jax.Array | None) -> jax.Array:
        """The UNet's `sample` input: noisy latents `[N, F, h, w, 4]` with the stage's conditioning channels
        appended (`[latents, condition]`, as the official code concatenates them)."""
        want = self.condition_channels
        if want == 0:
            if condition is not None:
                raise ValueError(f"the {self.name} stage takes no conditioning channels")
            return latents
        if condition is None or condition.shape[-1] != want or condition.shape[:-1] != latents.shape[:-1]:
            got = None if condition is None else condition.shape
            raise ValueError(f"the {self.name} stage needs a condition shaped {latents.shape[:-1] + (want,)}, got "
                             f"{got}")
        return jnp.concatenate([latents, condition.astype(latents.dtype)], axis=-1)

    def to_uint8(self, x: jax.Array) -> jax.Array:
        """Decoded frames in [-1, 1] -> uint8 by the stage's official rule (any shape, float32 arithmetic)."""
        return PIXEL_RULES[self.pixel_rule](jnp.asarray(x, jnp.float32))

    # ------------------------------------------------------------------------------------------------ sampling

    def check_sample(self, options: Any, fail: Callable[[str, str], None]) -> None:
        """Check the stage's own fields of validated sample options; `fail(field, message)` raises."""

    def check_request(self, options: Any, videos: list[np.ndarray], fps: float | None, vae_factor: int) -> None:
        """Raise RequestError for a request this stage cannot run (`videos`: the request's input videos, if any).
        The default is a text-to-video stage's: no videos, a frame size the VAE divides."""
        if videos:
            raise RequestError(f"the {self.name} stage makes videos from text only; drop `videos` (input videos "
                               "are for the stages that refine a video)")
        check_size(options.height, options.width, vae_factor)

    def chunk_frames(self, options: Any) -> int:
        """Frames per independent run of a long input video (0: the whole video at once)."""
        return 0

    def frame_windows(self, options: Any, num_frames: int) -> list[tuple[int, int, int]]:
        """How a request's input video of `num_frames` frames is cut into independent runs: `(start, stop, skip)`
        per run, `skip` = the run's first output frames to drop (they repeat the run before's last ones). The
        default: consecutive chunks of `chunk_frames` (the whole video when 0), nothing dropped."""
        chunk = self.chunk_frames(options)
        if not chunk:
            return [(0, num_frames, 0)]
        return [(s, min(s + chunk, num_frames), 0) for s in range(0, num_frames, chunk)]

    def execution_options(self, options: Any) -> dict[str, Any]:
        """Execution options (`lavie_jax.models.options`) the sampler sets on the UNet for these sample options
        (how, not what, it computes; e.g. the base stage's FreeNoise temporal windows). Default: none."""
        return {}

    def start_step(self, options: Any) -> int:
        """The denoising step sampling starts at: 0 from pure noise (every official stage); > 0 from
        `input_latents` of the input video, noised to that step's level, for the stages that declare a
        `start_step` sample field (interpolation, VSR)."""
        return options.start_step if "start_step" in self.sample_fields else 0

    def check_start_step(self, options: Any, fail: Callable[[str, str], None]) -> None:
        """`sample.start_step` of a stage that has the field: a step of the schedule, with a sampler whose noise
        level per step is known."""
        if "start_step" not in self.sample_fields:
            return
        first = options.start_step
        if not isinstance(first, int) or not 0 <= first < options.steps:
            fail("start_step", f"expected 0 (from noise) .. steps - 1 = {options.steps - 1}, got {first!r}")
        if first and options.sampler not in ("ddim", "ddpm"):
            fail("start_step", f"starting from the input video needs the 'ddim' or 'ddpm' sampler (their noise levels "
                               f"per step), not {options.sampler!r}; or set start_step=0")

    def input_latents(self, frames: jax.Array, encode, vae_factor: int, settings: tuple) -> jax.Array:
        """The clean latents a run that starts past step 0 is noised from, for uint8 input frames `[N, F, H, W, 3]`
        (`encode`: frames in [-1, 1] -> scaled latents; `settings`: `condition_settings(options)`). Only stages
        whose `start_step` can be > 0 have them."""
        raise NotImplementedError(f"the {self.name} stage always samples from noise")

    def noise_settings(self, options: Any) -> tuple:
        """The hashable settings `initial_noise` needs (a static argument of its compiled program)."""
        return ()

    def initial_noise(self, noise: jax.Array, keys: jax.Array, settings: tuple) -> jax.Array:
        """The starting noise of N rows from i.i.d. normals `noise [N, F, h, w, 4]` and per-row keys `keys [N]`,
        traced inside the sampler's program (e.g. FreeNoise's rescheduled noise). Default: the normals."""
        return noise

    def output_shape(self, options: Any, input_shape: Sequence[int] | None, vae_factor: int
                     ) -> tuple[int, int, int]:
        """(frames, height, width) of the videos made from inputs of `input_shape` ([F, H, W, ...]; None: no
        input)."""
        return options.num_frames, options.height, options.width

    def condition_settings(self, options: Any) -> tuple:
        """The hashable settings `sample_condition` needs (a static argument of its compiled program)."""
        return ()

    def sample_condition(self, frames: jax.Array, encode: Callable, normal: Callable, settings: tuple
                         ) -> tuple[jax.Array | None, jax.Array | None]:
        """(condition `[N, F, h, w, c]`, class labels `[N]`) of N rows of uint8 input frames `[N, F, H, W, 3]`,
        traced inside the sampler's compiled program. `encode(frames [N, K, H, W, 3] in [-1, 1])` gives scaled
        latents (a posterior sample from each row's key); `normal(stream, shape)` gives per-row standard normals
        `[N, *shape]`."""
        return None, None

    def latent_shape(self, options: Any, condition_shape: Sequence[int] | None, vae_factor: int
                     ) -> tuple[int, int, int, int]:
        """(F, h, w, 4) of one row's latents, from the condition's shape `[N, F, h, w, c]` when there is one."""
        if condition_shape is not None:
            return (*tuple(condition_shape[1:-1]), LATENT_CHANNELS)
        return options.num_frames, options.height // vae_factor, options.width // vae_factor, LATENT_CHANNELS

    # ------------------------------------------------------------------------------------------------ data

    def check_data(self, data: Any, vae_factor: int | None = None) -> None:
        """Raise StageConfigError for `data` fields the stage cannot use; with `vae_factor`, also the frame sizes
        against the VAE's downsampling factor."""
        if data.height <= 0 or data.width <= 0:
            raise StageConfigError("data.height", f"{data.height}x{data.width}: the {self.name} stage needs a "
                                                  "frame size > 0")
        if vae_factor and (data.height % vae_factor or data.width % vae_factor):
            raise StageConfigError("data.height", f"{data.height}x{data.width} frames are not a multiple of the "
                                                  f"VAE's factor {vae_factor}")

    def images_wanted(self, data: Any) -> float:
        """How many still images the examples draw (count per clip, or a probability): 0 draws none."""
        return 0

    def image_frames(self, data: Any) -> int:
        """Still images appended to each training clip on the frame axis (joint image-video training)."""
        return 0

    def clip_size(self, data: Any) -> tuple[int, int]:
        """(height, width) in pixels of one training clip's frames."""
        return data.height, data.width

    def clip_latent_shape(self, data: Any, vae_factor: int) -> tuple[int, int, int]:
        """(frames, latent height, latent width) of one training clip."""
        height, width = self.clip_size(data)
        return data.num_frames, height // vae_factor, width // vae_factor

    def vae_frames(self, data: Any) -> int:
        """Frames the frozen VAE encodes per training clip inside a step (pixels, not precomputed latents)."""
        return data.num_frames + self.image_frames(data)

    # ------------------------------------------------------------------------------------------------ training

    def training_tables(self, schedule: Any) -> dict[str, np.ndarray]:
        """Extra host tables the training step indexes (`schedule`: the objective)."""
        return {}

    def training_inputs(self, inputs: TrainingInputs, x0: jax.Array, text: jax.Array
                        ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
        """(x_0, condition, text, class labels) of a micro-batch, from the clip latents `x0 [b, F, h, w, 4]` and
        caption embeddings `text [b, L, D]` the step made; the condition feeds `unet_sample`."""
        return x0, None, text, None


def check_size(height: int, width: int, vae_factor: int) -> None:
    """RequestError unless height x width is a multiple of the VAE's downsampling factor."""
    if height % vae_factor or width % vae_factor:
        raise RequestError(f"sample.height x sample.width = {height}x{width} is not a multiple of the VAE's factor "
                           f"{vae_factor}; use e.g. 320x512")


def check_videos(stage: Stage, videos: list[np.ndarray], same: str) -> None:
    """Input videos of one request: uint8 `[F, H, W, 3]` each, sharing their `same` ('frame count' or 'shape')."""
    for i, v in enumerate(videos):
        if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3 or v.shape[0] == 0:
            raise RequestError(f"input video {i}: expected uint8 frames [F, H, W, 3], got {v.dtype} {v.shape}")
    key = (lambda v: v.shape[0]) if same == "frame count" else (lambda v: v.shape)
    if len({key(v) for v in videos}) > 1:
        raise RequestError(f"all input videos of one {stage.name} request must share their {same}; got "
                           f"{sorted({v.shape for v in videos})}: sample them in separate requests")
