"""The official architectures, as the UNet config dicts the released models were built from.

Base and interpolation start from Stable Diffusion v1.4's `unet/config.json`; VSR is LaVie's
`vsr/configs/unet_3d_config.json` (the x4 upscaler's UNet plus temporal modules), as the official repository ships
and loads them.
"""

from __future__ import annotations

import copy
from typing import Any

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

LAVIE_VSR_UNET: dict[str, Any] = {
    **X4_UPSCALER_UNET,
    "_class_name": "UNet3DVSRModel",
    "down_block_types": ["DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"],
    "up_block_types": ["CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"],
    "down_temporal_idx": [0, 1, 2, 3],
    "mid_temporal": True,
    "up_temporal_idx": [0, 1, 2, 3],
    "temporal_module_config": {
        "num_attention_layers": 1, "attention_block_types": ["", ""], "cross_frame_attention_mode": "0_i-1_i",
        "temporal_shift_fold_div": 2, "temporal_shift_direction": "right", "use_dcn_warpping": False,
        "use_deformable_conv": True, "attention_dim_div": 2,
    },
    "use_first_frame": False,
    "video_condition": False,
    "freeze_pretrained_2d_upsampler": True,
}

# Learnable parameters of the full official UNets (the released state-dict totals less the rotary `freqs` buffers:
# one `[16]` buffer per temporal attention, 16 in base, plus a shared one in VSR: 17).
OFFICIAL_PARAM_COUNTS = {"base": 909_124_100, "interpolation": 909_131_524, "vsr": 691_036_420}


def official_unet_config(stage: str) -> dict[str, Any]:
    """A fresh copy of the official UNet config of `stage`, with the `stage` key set."""
    if stage == "base":
        cfg = dict(copy.deepcopy(SD14_UNET))
    elif stage == "interpolation":
        cfg = dict(copy.deepcopy(SD14_UNET), in_channels=8, use_first_frame=True)
    elif stage == "vsr":
        cfg = copy.deepcopy(LAVIE_VSR_UNET)
    else:
        raise ValueError(f"unknown stage {stage!r}; choose one of 'base', 'interpolation', 'vsr'")
    cfg["stage"] = stage
    return cfg
