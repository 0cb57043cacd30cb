"""LaVie base text-to-video stage: SD v1.4 UNet inflated with rotary + relative-bias temporal attention.

16 frames at 320x512 (latents 16 x 40 x 64 x 4), CLIP ViT-L/14 text (77 x 768).

Run:
  lavie-sample --config base:tiny --checkpoint random --prompt "a red circle moving left" --output res
  lavie-train --config base:tiny --workdir runs/base-tiny
  make demo    # trains and samples base:demo, interpolation:demo, vsr:demo (python -m lavie_jax.demo)
  lavie-train --config base:demo --workdir outputs/demo/runs/base   # after the demo's data phases
  python -m bench.unet_bench --stages base
Variants: `base` (official full size), `base:tiny` (CPU sized), `base:demo` (what `make demo` trains: 4 frames of
8x8x4 latents, see configs/demo.py). A copy of this file is a config of your own: `--config my_base.py:tiny`.
"""

import ml_collections

from lavie_jax.configs import common, demo

OFFICIAL = {
    # LaVie's clips: 16 frames, every 3rd frame of the video, at 320x512, each with 4 still images (joint
    # image-video training; here random frames of the dataset's videos, 'image_text' reads LAION-style images)
    "data": {"num_frames": 16, "frame_stride": 3, "images": {"source": "video_frames", "per_clip": 4}},
    "sample": {"sampler": "ddpm", "guidance_scale": 7.5, "negative_prompt": "", "cond_first": False, "seed": 400,
               "num_frames": 16, "height": 320, "width": 512, "fps": 8,  # seed 400: the README gallery
               # longer videos: FreeNoise windows of the 16 trained frames every 4 (lavie_jax.stages.base)
               "freenoise_window": 16, "freenoise_stride": 4},
}

TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 1,  # 1 head: head dim 32 = the rotary dimension
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
}
TINY = {
    "unet": TINY_UNET,
    "data": {"height": 64, "width": 96},
    "sample": {"num_frames": 4, "height": 32, "width": 48, "vae": "tiny_f8", "freenoise_window": 4,
               "freenoise_stride": 2},
}

# `make demo`: TINY_UNET at 8x8 latents, cross-attending to the demo's 64-d text encoder, with two additions that
# let a few hundred CPU steps learn coherent motion (measured: without them the shapes jump between frames): each
# frame's self-attention also sees the first and the previous frame (the interpolation stage's sparse-causal
# attention), and temporal convolution modules follow every block (as in the VSR stage).
DEMO_UNET = dict(TINY_UNET, spatial_self_attention="sparse_causal", down_temporal_idx=[0, 1], up_temporal_idx=[0, 1],
                 transformer_temporal_conv=True)
LOW = demo.SOURCES["low"]
DEMO = {
    "unet": DEMO_UNET,
    "data": {"moving_shapes": LOW, "height": LOW["height"], "width": LOW["width"], "num_frames": 4, "frame_stride": 4,
             # 32 clips a step for 600 steps. On the demo's shapes 1200 of 16 (the same clips and FLOPs) drew 30 of
             # 48 shapes over seeds 400, 1, 2 against 36 (no square), and took the cascade over its 15 minutes (on
             # the smaller shapes of before it drew more: docs/demo_quality.md)
             "global_batch_size": 32,
             # video only: with one still frame per clip beside the 4 key frames (LaVie's joint image-video
             # training) the base read the direction word but moved the prompted way in 38% of the videos, without
             # it in 100% (README, The demo); the stills' compute goes into 100 more steps
             "images": {"source": "none", "per_clip": 0}},
    "train": {"num_steps": 600},
    # guidance 3: over seeds 400, 1 and 2 the base kept 100/88/94% of the colours (5.0: 88/88/88%) and moved the
    # prompted way in 100/88/94% of the videos (5.0: 100/81/88%); stronger guidance pushes orange to red, blue to cyan
    "sample": {"steps": 20, "guidance_scale": 3.0,
               # Stable Diffusion's betas (training uses the sample section's): the linear 1e-4..0.02 spends ~40% of
               # the steps below SNR 0.02, where an 8x8 latent holds no layout; measured 2x the direction accuracy
               "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
               "num_frames": 4, "height": 32, "width": 32, "fps": 4,
               # the demo base trains on 4 frames: longer videos use FreeNoise windows of 4 every 1
               "freenoise_window": 4, "freenoise_stride": 1},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_variant(arg)
    config = common.stage_config("base", OFFICIAL)
    if variant == "tiny":
        common.make_tiny(config, TINY)
    elif variant == "demo":
        demo.make_demo(config, DEMO)
    return config
