"""LaVie temporal interpolation stage: 16 -> 61 frames (SD v1.4 UNet, 8 input channels, sparse-causal attn1).

Input channels: 4 noisy latents + 4 conditioning latents (the 16 key frames repeated, see the spec section 4.2).

Run:
  lavie-sample --config configs/interpolation.py:tiny --checkpoint random --prompt "a red circle moving left" --output res
  python -m lavie_jax.demo --config configs/interpolation.py:tiny
  python -m bench.unet_bench --stages interpolation
Variants: `configs/interpolation.py` (official full size), `configs/interpolation.py:tiny` (CPU sized).
"""

import ml_collections

from configs.base import TINY_UNET
from configs.common import parse_variant, stage_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return stage_config("interpolation", parse_variant(arg), dict(TINY_UNET, in_channels=8))
