"""The pretrained 2D models LaVie's UNets are inflated from: Stable Diffusion v1.x and the x4 upscaler.

Each is a `UNetFamily`: its UNet config as diffusers ships it, the tokenizer flavour and the names the official 3D
code of the family gives our temporal layers. Base and interpolation (and the image-to-video stage to come) are
Stable Diffusion UNets; VSR is the x4 upscaler's.
"""

from __future__ import annotations

from typing import Any

from lavie_jax.stages.core import UNetFamily

SD14_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

X4_UPSCALER_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 7,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False],
    "out_channels": 4,
    "sample_size": 128,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SD = UNetFamily(name="sd", description="Stable Diffusion v1.x", pretrained_unet=SD14_UNET, tokenizer="sd14")
X4 = UNetFamily(name="x4", description="the x4 upscaler", pretrained_unet=X4_UPSCALER_UNET, tokenizer="x4",
                # LaVie's VSR code names the temporal attention and its norm `attn_temporal` / `norm_temporal` and keeps
                # one more rotary `freqs` buffer, shared by its temporal modules (`temporal_rotary_emb`)
                official_names={"attn_temp": "attn_temporal", "norm_temp": "norm_temporal"}, shared_rotary=True)
FAMILIES = {f.name: f for f in (SD, X4)}
