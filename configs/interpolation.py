"""LaVie temporal interpolation stage: 16 -> 61 frames (SD v1.4 UNet, 8 input channels, sparse-causal attn1).

Input channels: 4 noisy latents + 4 conditioning latents (the 16 key frames repeated, see the spec section 4.2).

Run:
  lavie-sample --config configs/interpolation.py:tiny --checkpoint random --prompt "a red circle moving left" --output res
  make demo    # trains and samples configs/{base,interpolation,vsr}.py:demo (python -m lavie_jax.demo)
  lavie-train --config configs/interpolation.py:demo --workdir outputs/demo/runs/interpolation
  python -m bench.unet_bench --stages interpolation
Variants: `configs/interpolation.py` (official full size), `configs/interpolation.py:tiny` (CPU sized),
`configs/interpolation.py:demo` (what `make demo` trains: the tiny interpolation UNet, the official block layout
without the base demo's temporal convolution modules, which the interpolation stage does not need (its key frames
fix the motion) and which doubled its training time; 2 -> 5 frames in training, 4 -> 13 when sampling).
"""

import ml_collections

from configs.base import TINY_UNET
from configs.common import parse_variant, stage_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = dict(TINY_UNET, in_channels=8)
    return stage_config("interpolation", parse_variant(arg), tiny, tiny)
