"""`make demo` (lavie_jax.demo): its settings (`get_config`, `--config demo`) and the 'demo' variant of the stage
configs (`make_demo`), on a laptop-class CPU.

Run:
  make demo    # python -m lavie_jax.demo: trains base:demo, interpolation:demo and vsr:demo, samples the cascade
  lavie-train --config base:demo --workdir outputs/demo/runs/base   # one stage by hand, after the demo's data phases

Every size here and in the stage files' demo values is chosen for the time budget, not for quality (data,
autoencoder, three trainings side by side and sampling within 15 minutes on 2 cores; README, The demo). The data are
13-frame moving_shapes clips at 32x32 (base, interpolation) and 128x128 (VSR); one small f4 KL autoencoder
(AUTOENCODER) serves all three stages; the text encoder is a randomly initialised 2-layer CLIP of width 64 with the
real tokenizer, which adds the caption's summed token embeddings to every token (lavie_jax.models.clip).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections

from lavie_jax.configs import common

DIR = "outputs/demo"
DATA_DIR = f"{DIR}/data"
ENCODERS = f"{DIR}/encoders"  # pipeline directory the demo writes: vae/, text_encoder/, tokenizer/
TEXT_WIDTH = 64  # text encoder width = every demo UNet's cross_attention_dim
VIDEOS = {"num_frames": 13, "fps": 12.0, "seed": 0, "num_validation": 16,  # held-out clips: the demo's FVD
          # Shapes 0.44-0.64 of the frame across (the dataset's default radius 0.12-0.2 is 2-3 cells of the base's 8x8
          # latents), and squares that circumscribe the circle of their radius (the default 1.7 r squares differ from
          # that circle by a fifth of what a colour change does, measured in the autoencoder's latents): over seeds
          # 400, 1, 2 the base drew 36 of 48 shapes where the defaults drew 17 (docs/demo_quality.md, Shapes that show)
          "radius": (0.22, 0.32), "square_side": 2.0}
SOURCES = {  # the moving_shapes datasets the stages read (same videos, two resolutions)
    "low": dict(VIDEOS, num_videos=1024, height=32, width=32),
    "high": dict(VIDEOS, num_videos=256, height=128, width=128),
}
# v-prediction for every demo stage (the official base and interpolation models predict epsilon): after a few hundred
# steps an epsilon model's errors at high noise are amplified by 1 / sqrt(alpha_bar) (~150 at t = 999) and the
# sampler drifts off the data; v-prediction's x_0 estimate stays bounded, so short runs sample cleanly.
PREDICTION = "v_prediction"
# The autoencoder the demo trains (the same AutoencoderKL module, a small diffusers-style config) and its training.
AUTOENCODER = {
    "vae": {"_class_name": "AutoencoderKL", "block_out_channels": [16, 32, 32], "layers_per_block": 1,
            "norm_num_groups": 8, "latent_channels": 4, "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "mid_block_add_attention": False,  # convolutional only: the VSR stage decodes 128x128 frames
            "scaling_factor": 1.0},  # replaced by 1 / std of the trained latents (as SD's 0.18215 was chosen)
    # Many small batches: 1200 steps of 8 frames reproduce the shapes at 32x32 where 300 of 32 (about the same
    # time on 2 cores: a step this small costs little more than its fixed overhead) round squares and triangles
    # (docs/demo_quality.md, Shapes).
    "steps": 1200, "batch_size": 8, "crop": 32, "lr": 2e-3, "warmup_steps": 80, "final_lr_ratio": 0.1,
    "kl_weight": 1e-4, "log_every": 100,
    "logvar_init": -6.0,  # the posterior starts narrow (std 0.05): at 0 the first steps decode noise
    "foreground_weight": 10.0,  # loss weight 1 + this x distance from the border colour: shapes are learnt first
    "edge_weight": 1.0,  # L1 of the pixel differences too: keeps corners and apexes sharp
    "high_res_fraction": 0.1,  # of each batch (rounded: 1 of 8): 32x32 crops of the 128x128 frames the VSR decodes
    # Then the decoder alone learns to decode latents noised by up to 1 std (encoder and latents unchanged): the
    # base's latents decoded by it draw 40 of 48 shapes where the first decoder drew 36 (squares 10 of 18 against
    # 6), for 1.4 dB of clean reconstruction (docs/demo_quality.md, Shapes that show)
    "decoder_steps": 600, "decoder_noise": 1.0, "decoder_lr": 1e-3,
    # each training frame's RGB channels in a random order: trained on the 8 palette colours alone, this autoencoder
    # decoded the personalisation's pink (235, 45, 145) as purple (155, 54, 155), and no adapter could teach it
    "shuffle_channels": True,
}

# The demo values every stage shares; each stage file adds its UNet, clips, batch, steps and sampling.
STAGE_VALUES = {
    # the demo precomputes latents + text embeddings of one clip per video (data.dataset='precomputed', named
    # demo_STAGE) from the moving_shapes source in data.moving_shapes, and trains on those
    "data": {"data_dir": DATA_DIR, "dataset": "precomputed",
             "read_threads": 1, "prefetch_buffer": 64},  # 2 cores: one reader thread keeps up with precomputed latents
    "sample": {"sampler": "ddim", "prediction_type": PREDICTION, "formats": "mp4,gif"},  # DDIM with few steps
    "train": {
        "log_every": 25,
        # lr: warm-up, then cosine decay to a tenth (short runs end converged, not noisy)
        "optimizer": {"lr": 2e-3, "warmup_steps": 25, "schedule": "cosine", "final_lr_ratio": 0.1},
        "objective": {"prediction_type": PREDICTION},
        "ema": {"decay": 0.99},  # a horizon of ~100 steps: the runs are a few hundred steps long
        "param_groups": {"rules": common.TRAIN_ALL_RULES},  # from scratch: every layer trains (VSR too)
        "compute_dtype": "float32",  # CPU: bfloat16 is emulated and slower
        "encoders": ENCODERS,
    },
}


def make_demo(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    """`config` (a full-size stage config) becomes its 'demo' variant, in place: STAGE_VALUES, then the stage's
    `values`; the cosine decay runs to the last step, which is the one checkpoint (the run is short)."""
    common.merge(config, STAGE_VALUES)
    config.data.precomputed.name = f"demo_{config.stage}"
    common.merge(config, values)
    t = config.train
    t.optimizer.decay_steps = t.num_steps - t.optimizer.warmup_steps
    t.checkpoint_every, t.keep = t.num_steps, 1


def get_config() -> ml_collections.ConfigDict:
    """What lavie_jax.demo reads besides the stage configs: the moving_shapes `sources` it builds, the `autoencoder`
    it trains (`vae` architecture and training settings) and the `text_width` of the text encoder it draws."""
    values = {"sources": SOURCES, "autoencoder": AUTOENCODER, "text_width": TEXT_WIDTH}
    return ml_collections.ConfigDict(copy.deepcopy(values))
