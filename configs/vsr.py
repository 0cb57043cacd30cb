"""LaVie video super-resolution stage: the SD x4 upscaler UNet with temporal layers (v-prediction).

Input channels: 4 latents + 3 noise-augmented low-res RGB at latent size; the noise level (0..999, default 50) enters
as a class embedding; OpenCLIP-H text (77 x 1024); chunks of 8 frames.

Run:
  lavie-sample --config vsr:tiny --checkpoint random --prompt "a red circle moving left" --output res
  lavie-train --config vsr --workdir runs/vsr --config.train.init=ckpt/vsr-init   # temporal layers only
  make demo    # trains and samples base:demo, interpolation:demo, vsr:demo (python -m lavie_jax.demo)
  lavie-train --config vsr:demo --workdir outputs/demo/runs/vsr
  python -m bench.unet_bench --stages vsr
Variants: `vsr` (official full size), `vsr:tiny` (CPU sized), `vsr:demo` (what `make demo` trains: 32x32 patches,
32x32 -> 128x128 when sampling).
"""

import ml_collections

from lavie_jax.configs import common, demo
from lavie_jax.stages import get_stage

# Inserted temporal layers only (the paper trains only those of the x4 upscaler): temporal attention + its norm
# (with the bucket bias), the transformers' temporal conv resnets and the temporal modules; every pretrained spatial
# layer stays frozen.
TEMPORAL_ONLY_RULES = (("temporal|attn_temp|norm_temp", "temporal"), (".*", "frozen"))

OFFICIAL = {
    # 8-frame clips of patch_size high-res patches cut from frames at their stored size (height, width 0); a
    # quarter of the examples pseudo-videos panned over a still; LAION images kept encoded, short side >= 1024
    "data": {"num_frames": 8, "height": 0, "width": 0, "images": {"source": "video_frames", "ratio": 0.25},
             "image_text": {"storage": "encoded", "min_size": 1024}},
    "sample": {"sampler": "ddim", "prediction_type": "v_prediction", "guidance_scale": 5.0,
               "negative_prompt": "blur, worst quality", "cond_first": False, "seed": 10, "chunk_frames": 8,
               "noise_level": 50, "start_step": 0,  # 0: from noise (lavie_jax.stages.vsr says what > 0 does)
               "low_res_beta_schedule": "scaled_linear", "low_res_beta_start": 1e-4,
               "low_res_beta_end": 0.02, "fps": 0,  # 0: the input video's frame rate
               "underscore_prompts": True, "vae": "x4", "text_encoder": "x4", "tokenizer": "x4"},
    "train": {"param_groups": {"rules": TEMPORAL_ONLY_RULES},
              "objective": {"prediction_type": "v_prediction"}},  # the x4 upscaler's v-prediction
}

# Two levels, one of each attention kind of the x4 upscaler (a cross-attention-only level, then a self-attention
# level), temporal modules after both: every block type at the smallest size (quick to compile on a CPU).
TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
    "only_cross_attention": [True, False],
    "down_temporal_idx": [0, 1],
    "up_temporal_idx": [0, 1],
    "attention_head_dim": 1,  # 1 head: head dim >= 32 = the rotary dimension
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
}
TINY = {"unet": TINY_UNET, "sample": {"vae": "tiny_f4"}}

# `make demo`: three levels instead of four (its latents are 8x8 patches in training, 32x32 when sampling), every
# level with the VSR's temporal modules; the lowest level self-attends, as the x4 upscaler's does.
DEMO_UNET = {
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"],
    "up_block_types": ["CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"],
    "only_cross_attention": [True, True, False],
    "down_temporal_idx": [0, 1, 2],
    "up_temporal_idx": [0, 1, 2],
    "attention_head_dim": 1,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
}
DEMO = {
    "unet": DEMO_UNET,
    # 32x32 patches (8x8 latents), for the 15 minutes; sampling runs on whole 128x128 frames (64x64 patches at batch
    # 8 took the demo past 15 minutes)
    "data": {"moving_shapes": demo.SOURCES["high"], "num_frames": 4, "frame_stride": 1, "global_batch_size": 16,
             "patch_size": 32, "images": {"source": "none", "ratio": 0.0}},
    # trains beside the base run (three processes sharing the cores). From noise, more steps kept colour better
    # (given the dataset's own videos: 70% of colours after 200 steps, all after 600); starting at the last step
    # (below), 150 steps keep what 250 did (a fresh clone's demo: 30.9 dB to the input, background 0.25, FVD 666
    # against the bicubic input's 879; 250 steps: 31.0-31.4 dB, 0.23-0.25, 632-657) for a minute less of the cascade
    "train": {"num_steps": 150, "objective": {"noise_level_max": 100}},  # sampling noises the low-res input at 50
    # Measured on the main demo's checkpoints (docs/demo_quality.md; 8 prompts, PSNR of the output averaged down to
    # its 32x32 input, background = RMS high-pass of the background, bicubic upscale: 49.3 dB / 0.43): from noise
    # at guidance 7.5, 22.2 dB / 2.36 (a green speckle over the background, shapes broken into dots); unguided
    # 23.1 / 1.88; low-res noise level 10 instead of 50: 22.3 / 1.84; from the noised bicubic upscale at step 5, 7,
    # 8: 23.8 / 1.86, 24.6 / 1.66, 24.9 / 1.32; at step 9 (the last step only) 24.8 / 0.65, as clean as the
    # autoencoder's own round trip of the upscale (24.9 / 0.64: the autoencoder caps the PSNR). 250 steps (then) on
    # 32x32 patches teach the model the shapes' edges, not a clean background: every earlier step adds texture. So the
    # demo starts from the encoded upscale at the last step, unguided: 1 UNet call per video instead of 20.
    "sample": {"steps": 10, "guidance_scale": 1.0, "start_step": 9, "negative_prompt": get_stage("vsr").dropped_text,
               "chunk_frames": 0, "underscore_prompts": False},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_variant(arg)
    config = common.stage_config("vsr", OFFICIAL)
    if variant == "tiny":
        common.make_tiny(config, TINY)
    elif variant == "demo":
        demo.make_demo(config, DEMO)
    return config
