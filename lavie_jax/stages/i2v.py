"""The image-to-video stage (SEINE, Vchitect/SEINE): LaVie's base UNet with a 9-channel `conv_in` that animates an
image, makes a transition between two images, or continues a video. The UNet sees `[x_t (4), mask (1), masked
video latents (4)]`: the mask is 1 on frames to generate and 0 on given frames; the masked video is the pixel video
with the given frames in place and every other frame mid-grey (0.0 in [-1, 1]), VAE-encoded (a posterior sample,
x 0.18215) frame by frame. Given frames are never pasted back: all output frames come from the model.

Masks (`sample.mask_type`, SEINE's `mask_generation_before`): `first{n}` gives the first n frames (an image
repeated n times, or the last n frames of a video: animation and continuation), `onelast{n}` the first n and the
last n (two images, each repeated n times, or 2n frames: a transition). `frame_mask` / `given_index` say which
frames are given and where each comes from. `auto` (the default) follows the input: one image -> first1, two
frames -> onelast1 (a transition), a video of 3 or more frames -> first{sample.context_frames} (continue it).

The latent mask: SEINE resizes the per-frame pixel mask to the latent size by torch nearest; the mask is constant on
each frame, so every latent pixel of a frame takes the frame's value. Input frames of another size are resized to
`sample.height x sample.width` as SEINE does (bilinear, half-pixel centres, no antialiasing, aspect not kept).
Training (`training_inputs`): a random mask per clip (`mask_distribution`), the same conditioning from the clip.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lavie_jax.stages.base import BaseStage
from lavie_jax.stages.core import LATENT_CHANNELS, RequestError, TrainingInputs, check_size, \
    check_videos
from lavie_jax.stages.families import SD14_UNET
from lavie_jax.stages.interpolation import resize_frames

MASK_CHANNELS = 1
_MASK = re.compile(r"^(first|onelast)([1-9][0-9]*)$")


def parse_mask(mask_type: str) -> tuple[str, int]:
    """('first' | 'onelast', n) of a mask name; ValueError naming the choices otherwise."""
    m = _MASK.match(str(mask_type))
    if not m:
        raise ValueError(f"mask {mask_type!r}: use first{{n}} (the first n frames given: animate an image, continue "
                         "a video) or onelast{n} (the first and last n given: a transition), e.g. first1, onelast1")
    return m.group(1), int(m.group(2))


def resolve_mask(mask_type: str, context_frames: int, num_inputs: int) -> str:
    """The mask of a request: `mask_type` itself, or for 'auto' the one its input calls for (module docstring)."""
    if mask_type != "auto":
        return mask_type
    return "first1" if num_inputs == 1 else "onelast1" if num_inputs == 2 else f"first{context_frames}"


def given_count(mask_type: str) -> int:
    """Frames a mask gives: n for first{n}, 2n for onelast{n}."""
    kind, n = parse_mask(mask_type)
    return n if kind == "first" else 2 * n


def frame_mask(mask_type: str, num_frames: int) -> np.ndarray:
    """float32 `[num_frames]`: 0 on given frames, 1 on frames to generate (SEINE's convention)."""
    kind, n = parse_mask(mask_type)
    if given_count(mask_type) >= num_frames:
        raise ValueError(f"mask {mask_type} gives {given_count(mask_type)} of {num_frames} frames: nothing is left "
                         "to generate")
    mask = np.ones(num_frames, np.float32)
    mask[:n] = 0
    if kind == "onelast":
        mask[num_frames - n:] = 0
    return mask


def given_index(mask_type: str, num_frames: int, num_inputs: int) -> np.ndarray:
    """int32 `[num_frames]`: which input frame each output position shows (-1: generated). first{n}: 1 input
    repeated n times, or the last n of >= n inputs; onelast{n}: 2 inputs each repeated n times, or 2n inputs."""
    kind, n = parse_mask(mask_type)
    mask = frame_mask(mask_type, num_frames)
    index = np.full(num_frames, -1, np.int32)
    if kind == "first":
        if num_inputs != 1 and num_inputs < n:
            raise ValueError(f"mask {mask_type} needs 1 image or a video of at least {n} frames, got {num_inputs}")
        index[:n] = 0 if num_inputs == 1 else np.arange(num_inputs - n, num_inputs)
    else:
        if num_inputs not in (2, 2 * n):
            raise ValueError(f"mask {mask_type} needs 2 images (first and last) or {2 * n} frames, got {num_inputs}")
        if num_inputs == 2:
            index[:n], index[num_frames - n:] = 0, 1
        else:
            index[:n], index[num_frames - n:] = np.arange(n), np.arange(n, 2 * n)
    assert ((index >= 0) == (mask == 0)).all()
    return index


def masked_video(frames: jax.Array, index: np.ndarray) -> jax.Array:
    """Given frames `[N, K, H, W, 3]` in [-1, 1] -> the masked pixel video `[N, F, H, W, 3]`: frame f shows input
    `index[f]`, or mid-grey 0.0 where `index[f] = -1`."""
    picked = jnp.take(frames, np.maximum(index, 0), axis=1)
    return jnp.where(jnp.asarray(index >= 0)[None, :, None, None, None], picked, 0.0)


def i2v_condition(mask: jax.Array, latents: jax.Array) -> jax.Array:
    """The UNet's conditioning channels `[N, F, h, w, 5]`: the mask `[N, F]` (1 = generate) spread over each
    frame's latent pixels (torch nearest of a per-frame constant), then the masked video's latents `[N, F, h, w, 4]`,
    in SEINE's order (`cat([x_t, mask, masked_latents])`)."""
    m = jnp.broadcast_to(mask[:, :, None, None, None].astype(latents.dtype), (*latents.shape[:-1], MASK_CHANNELS))
    return jnp.concatenate([m, latents], axis=-1)


# Training masks. SEINE released no training code; its paper trains "random-mask" video diffusion: the given frames
# are a random choice among the first frames (prediction / animation), the first and last frames (transition), or
# none (plain text-to-video). The weights are ours (configurable: `train.objective.i2v_masks`); n is uniform in
# 1..max_n, capped so that a frame is left to generate.
MASK_KINDS = ("first", "onelast", "none")


def random_mask(key: jax.Array, num_frames: int, weights: Sequence[float], max_n: int) -> jax.Array:
    """float32 `[num_frames]` (0 = given): kind drawn with probabilities `weights` over MASK_KINDS, n uniform in
    1..max_n (onelast: n given at each end)."""
    k_kind, k_n = jax.random.split(key)
    kind = jax.random.choice(k_kind, len(MASK_KINDS), p=jnp.asarray(weights, jnp.float32) / sum(weights))
    # at least one frame is left to generate: n <= F - 1 (first), n <= (F - 1) // 2 (onelast)
    top = jnp.where(kind == 1, max(min(max_n, (num_frames - 1) // 2), 1), min(max_n, num_frames - 1))
    n = jax.random.randint(k_n, (), 1, top + 1)
    f = jnp.arange(num_frames)
    first = f < n
    last = f >= num_frames - n
    given = jnp.where(kind == 0, first, jnp.where(kind == 1, first | last, False))
    return jnp.where(given, 0.0, 1.0).astype(jnp.float32)


class I2VStage(BaseStage):
    name = "i2v"
    seed_id = 3
    rank = 0  # makes videos (from images and text): interpolation and VSR may follow
    condition_channels = MASK_CHANNELS + LATENT_CHANNELS
    dropped_text = ""  # SEINE's TextEmbedder drops captions to ""
    released_unet = dict(SD14_UNET, in_channels=9)
    official_param_count = 909_124_100 + 5 * 320 * 9  # base's conv_in widened by 5 input channels
    takes_video = True
    takes_images = True
    init_from = ("base",)  # LaVie's base (SEINE is initialised from it): conv_in widened, mask channels at zero
    encodes_in_step = True  # the grey frames of the masked video, with precomputed latents too
    # the clip to make; which frames are given (module docstring); frames a video is continued from under 'auto'
    sample_fields = {"num_frames": 0, "height": 0, "width": 0, "mask_type": "auto", "context_frames": 2}

    def check_sample(self, options: Any, fail) -> None:
        for field in ("num_frames", "height", "width", "context_frames"):
            value = getattr(options, field)
            if not isinstance(value, int) or value <= 0:
                fail(field, f"expected a positive int, got {value!r}")
        masks = ([options.mask_type] if options.mask_type != "auto" else
                 ["first1", "onelast1", f"first{options.context_frames}"])
        for mask in masks:
            try:
                frame_mask(mask, options.num_frames)
            except ValueError as e:
                fail("mask_type" if options.mask_type != "auto" else "context_frames", str(e))

    def check_request(self, options: Any, videos: list[np.ndarray], fps: float | None, vae_factor: int) -> None:
        check_videos(self, videos, "shape")
        mask = resolve_mask(options.mask_type, options.context_frames, videos[0].shape[0])
        try:
            given_index(mask, options.num_frames, videos[0].shape[0])
        except ValueError as e:
            raise RequestError(f"{e} (sample.mask_type={options.mask_type}: one image animates it, two make a "
                               "transition with onelast1, a video is continued with first{n})") from None
        check_size(options.height, options.width, vae_factor)

    def output_shape(self, options: Any, input_shape: Sequence[int] | None, vae_factor: int):
        return options.num_frames, options.height, options.width

    # FreeNoise is the base stage's (its sample fields); this stage samples its clip length as trained
    def execution_options(self, options: Any) -> dict[str, Any]:
        return {}

    def noise_settings(self, options: Any) -> tuple:
        return ()

    def condition_settings(self, options: Any) -> tuple:
        return (options.mask_type, options.context_frames, options.num_frames, options.height, options.width)

    def sample_condition(self, frames, encode, normal, settings):
        mask_type, context, num_frames, height, width = settings
        mask_type = resolve_mask(mask_type, context, frames.shape[1])
        index = given_index(mask_type, num_frames, frames.shape[1])
        video = masked_video(resize_frames(frames, (height, width)), index)
        mask = jnp.broadcast_to(jnp.asarray(frame_mask(mask_type, num_frames)), (frames.shape[0], num_frames))
        return i2v_condition(mask, encode(video)), None

    # ------------------------------------------------------------------------------------------------ training

    def images_wanted(self, data: Any) -> float:
        return 0

    def image_frames(self, data: Any) -> int:
        return 0

    def training_inputs(self, inputs: TrainingInputs, x0: jax.Array, text: jax.Array):
        """A random mask per clip; the masked video is the clip with the other frames grey, VAE-encoded as in
        sampling when the batch holds pixels; with precomputed latents, given frames take the clip's own latents
        and the others the latent of a grey frame (the SD VAE encodes frames independently, so this is the same
        conditioning but for the posterior sample of the given frames being the x_0 one)."""
        o = inputs.settings
        num_frames = x0.shape[1]
        mask = inputs.draw("mask", lambda k: random_mask(k, num_frames, o.i2v_mask_weights, o.i2v_max_given))
        batch = inputs.batch
        keep = (mask == 0)[:, :, None, None, None]
        if self.pixel_key in batch:
            pixels = batch[self.pixel_key].astype(jnp.float32)
            latents = inputs.latents(jnp.where(keep, pixels, 0.0), "masked_latent")
        else:
            b, _, h, w, _ = x0.shape
            grey = inputs.latents(jnp.zeros((b, 1, h * o.vae_factor, w * o.vae_factor, 3), jnp.float32),
                                  "masked_latent")
            latents = jnp.where(keep, x0, grey.astype(x0.dtype))
        return x0, i2v_condition(mask, latents), text, None


STAGE = I2VStage()
