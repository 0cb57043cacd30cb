"""The base text-to-video stage: Stable Diffusion v1.4's UNet inflated with rotary + relative-bias temporal
attention; 16 frames at 320x512 from text alone (latents `[16, 40, 64, 4]`).

Training is joint image-video (the paper's): each clip's F frames plus K still images appended on the frame axis,
each image with its own caption; the spatial layers see them, the temporal layers skip them
(`UNet3D(..., num_image_frames=K)`), and the loss is video MSE + `image_loss_weight` x image MSE.

Long videos (FreeNoise, `lavie_jax.diffusion.freenoise`): with `sample.freenoise_window` = W > 0 (16 in the
packaged configs: the frames the model was trained on) a video of more than W frames is sampled with windowed
temporal attention (windows of W frames every `sample.freenoise_stride` S) from rescheduled noise; it must have
W + k S frames. Videos of at most W frames are sampled as before (the plain model; FreeNoise at exactly W frames is
the same computation). W = 0 attends over all frames with i.i.d. noise, whatever the length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lavie_jax.diffusion.freenoise import FreeNoiseError, check_length, reschedule_noise
from lavie_jax.stages.core import Stage, TrainingInputs
from lavie_jax.stages.families import SD, SD14_UNET


class BaseStage(Stage):
    name = "base"
    seed_id = 0
    rank = 0
    family = SD
    condition_channels = 0
    dropped_text = ""  # the official code drops captions to ""
    pixel_rule = "round"
    unet_preset = dict(spatial_self_attention="frame", temporal_attention="rotary_bias",
                       temporal_attention_after="cross_attention", transformer_temporal_conv=False,
                       temporal_modules=False)
    released_unet = SD14_UNET
    official_param_count = 909_124_100
    examples = "clip"
    # the video to make and its frame size; FreeNoise's windows for longer videos (module docstring; 0: off)
    sample_fields = {"num_frames": 0, "height": 0, "width": 0, "freenoise_window": 0, "freenoise_stride": 4}

    def check_sample(self, options: Any, fail) -> None:
        for field in ("num_frames", "height", "width", "freenoise_stride"):
            value = getattr(options, field)
            if not isinstance(value, int) or value <= 0:
                fail(field, f"expected a positive int, got {value!r}")
        window = options.freenoise_window
        if not isinstance(window, int) or window < 0:
            fail("freenoise_window", f"expected an int >= 0 (0: no FreeNoise windows), got {window!r}")
        if window and options.freenoise_stride > window:
            fail("freenoise_stride", f"{options.freenoise_stride} is above sample.freenoise_window={window}")
        if self._freenoise(options):
            try:
                check_length(options.num_frames, window, options.freenoise_stride)
            except FreeNoiseError as e:
                fail("num_frames", f"{e} (sample.freenoise_window / freenoise_stride), or set "
                                   "sample.freenoise_window=0 to attend over all frames")

    @staticmethod
    def _freenoise(options: Any) -> tuple[int, int] | tuple[()]:
        """(window, stride) when the video is longer than the FreeNoise window, else ()."""
        window = options.freenoise_window
        return (window, options.freenoise_stride) if window and options.num_frames > window else ()

    def execution_options(self, options: Any) -> dict[str, Any]:
        return {"temporal_window": self._freenoise(options)}

    def noise_settings(self, options: Any) -> tuple:
        return self._freenoise(options)

    def initial_noise(self, noise: jax.Array, keys: jax.Array, settings: tuple) -> jax.Array:
        if not settings:
            return noise
        return jax.vmap(lambda n, k: reschedule_noise(n, k, *settings))(noise, keys)

    def images_wanted(self, data: Any) -> float:
        return data.images.per_clip

    def image_frames(self, data: Any) -> int:
        return 0 if data.images.source == "none" else int(data.images.per_clip)

    def training_inputs(self, inputs: TrainingInputs, x0: jax.Array, text: jax.Array):
        k = inputs.settings.num_image_frames
        if not k:
            return x0, None, text, None
        batch = inputs.batch
        images = batch["image_latents"] if "image_latents" in batch else inputs.latents(batch["images"],
                                                                                        "image_latent")
        image_text = inputs.text("image_text_drop", "image_text_emb", "image_tokens", k)
        frames = x0.shape[1]
        x0 = jnp.concatenate([x0, images.astype(x0.dtype)], axis=1)
        text = jnp.concatenate([jnp.repeat(text[:, None], frames, axis=1), image_text], axis=1)  # per frame [b, F+K]
        return x0, None, text, None


STAGE = BaseStage()
