"""LaVie base text-to-video stage: SD v1.4 UNet inflated with rotary + relative-bias temporal attention.

16 frames at 320x512 (latents 16 x 40 x 64 x 4), CLIP ViT-L/14 text (77 x 768).

Run:
  lavie-sample --config configs/base.py:tiny --checkpoint random --prompt "a red circle moving left" --output res
  make demo    # trains and samples configs/{base,interpolation,vsr}.py:demo (python -m lavie_jax.demo)
  lavie-train --config configs/base.py:demo --workdir outputs/demo/runs/base   # after the demo's data phases
  python -m bench.unet_bench --stages base
Variants: `configs/base.py` (official full size), `configs/base.py:tiny` (CPU sized), `configs/base.py:demo` (what
`make demo` trains: 4 frames of 8x8x4 latents, see configs/common.py).
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


# `make demo`: TINY_UNET at 8x8 latents, cross-attending to the demo's 64-d text encoder, with two additions that
# let a few hundred CPU steps learn coherent motion (measured: without them the shapes jump between frames): each
# frame's self-attention also sees the first and the previous frame (the interpolation stage's sparse-causal
# attention), and temporal convolution modules follow every block (as in the VSR stage).
DEMO_UNET = dict(TINY_UNET, spatial_self_attention="sparse_causal", down_temporal_idx=[0, 1], up_temporal_idx=[0, 1],
                 transformer_temporal_conv=True)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return stage_config("base", parse_variant(arg), TINY_UNET, DEMO_UNET)
