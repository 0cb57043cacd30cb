"""LaVie video super-resolution stage: the SD x4 upscaler UNet with temporal layers (v-prediction).

Input channels: 4 latents + 3 noise-augmented low-res RGB at latent size; the noise level (0..999, default 50) enters
as a class embedding; OpenCLIP-H text (77 x 1024); chunks of 8 frames.

Run:
  lavie-sample --config configs/vsr.py:tiny --checkpoint random --prompt "a red circle moving left" --output res
  python -m lavie_jax.demo --config configs/vsr.py:tiny
  python -m bench.unet_bench --stages vsr
Variants: `configs/vsr.py` (official full size), `configs/vsr.py:tiny` (CPU sized).
"""

import ml_collections

from configs.common import parse_variant, stage_config

TINY_UNET = {
    "block_out_channels": [32, 32, 64, 64],
    "attention_head_dim": 1,  # 1 head: head dim >= 32 = the rotary dimension
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return stage_config("vsr", parse_variant(arg), TINY_UNET)
