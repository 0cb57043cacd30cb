"""LaVie base text-to-video stage: SD v1.4 UNet inflated with rotary + relative-bias temporal attention.

16 frames at 320x512 (latents 16 x 40 x 64 x 4), CLIP ViT-L/14 text (77 x 768).

Run:
  lavie-sample --config configs/base.py:tiny --checkpoint random --prompt "a red circle moving left" --output res
  python -m lavie_jax.demo --config configs/base.py:tiny
  python -m bench.unet_bench --stages base
Variants: `configs/base.py` (official full size), `configs/base.py:tiny` (CPU sized).
"""

import ml_collections

from configs.common import parse_variant, stage_config

TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 1,  # 1 head: head dim 32 = the rotary dimension
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return stage_config("base", parse_variant(arg), TINY_UNET)
