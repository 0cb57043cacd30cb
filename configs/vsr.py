"""LaVie video super-resolution stage: the SD x4 upscaler UNet with temporal layers (v-prediction).

Input channels: 4 latents + 3 noise-augmented low-res RGB at latent size; the noise level (0..999, default 50) enters
as a class embedding; OpenCLIP-H text (77 x 1024); chunks of 8 frames.

Run:
  lavie-sample --config configs/vsr.py:tiny --checkpoint random --prompt "a red circle moving left" --output res
  make demo    # trains and samples configs/{base,interpolation,vsr}.py:demo (python -m lavie_jax.demo)
  lavie-train --config configs/vsr.py:demo --workdir outputs/demo/runs/vsr
  python -m bench.unet_bench --stages vsr
Variants: `configs/vsr.py` (official full size), `configs/vsr.py:tiny` (CPU sized), `configs/vsr.py:demo` (what
`make demo` trains: 32x32 patches, 32x32 -> 128x128 when sampling).
"""

import ml_collections

from configs.common import parse_variant, stage_config

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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return stage_config("vsr", parse_variant(arg), TINY_UNET, DEMO_UNET)
