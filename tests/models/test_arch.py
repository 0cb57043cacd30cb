"""UNet config parsing: official configs accepted as written, bad configs rejected with the field named."""

import json

import pytest

from lavie_jax.models import ConfigError, arch_from_config, official_unet_config
from lavie_jax.models.official import LAVIE_VSR_UNET, SD14_UNET, X4_UPSCALER_UNET
from tests.models.tiny_configs import SD_LIKE


def test_stage_presets():
    base = arch_from_config(SD14_UNET, stage="base")
    interp = arch_from_config(official_unet_config("interpolation"))
    vsr = arch_from_config(LAVIE_VSR_UNET, stage="vsr")
    assert (base.spatial_self_attention, base.temporal_attention, base.temporal_attention_after) == (
        "frame", "rotary_bias", "cross_attention")
    assert (interp.spatial_self_attention, interp.temporal_attention, interp.temporal_attention_after) == (
        "sparse_causal", "plain", "feed_forward")
    assert interp.in_channels == 8
    assert vsr.transformer_temporal_conv and vsr.mid_temporal
    assert vsr.down_temporal_idx == vsr.up_temporal_idx == (0, 1, 2, 3)
    assert vsr.only_cross_attention == (True, True, True, False) and vsr.num_class_embeds == 1000
    assert base.time_embed_dim == 1280 and vsr.time_embed_dim == 1024
    assert not base.down_temporal_idx and not base.mid_temporal


def test_x4_config_as_written_for_vsr_gets_temporal_modules():
    arch = arch_from_config(X4_UPSCALER_UNET, stage="vsr")
    assert arch.mid_temporal and arch.down_temporal_idx == (0, 1, 2, 3)


def test_round_trip_through_json():
    arch = arch_from_config(LAVIE_VSR_UNET, stage="vsr")
    assert arch_from_config(json.loads(json.dumps(arch.to_dict()))) == arch


def test_explicit_option_overrides_preset():
    arch = arch_from_config(dict(SD14_UNET, temporal_attention="plain"), stage="base")
    assert arch.temporal_attention == "plain"


@pytest.mark.parametrize("change,field", [
    ({"down_block_types": ["CrossAttnDownBlock2D", "FancyDownBlock", "DownBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "SimpleUpBlock"]}, "up_block_types"),
    ({"block_out_channels": [32, 60, 64]}, "block_out_channels"),  # 60 % 8 groups
    ({"norm_num_groups": 7}, "block_out_channels"),
    ({"attention_head_dim": [3, 2, 2]}, "attention_head_dim"),  # 32 channels / 3 heads
    ({"attention_head_dim": [2, 2, 2]}, "attention_head_dim"),  # head dim 16 < rotary 32
    ({"attention_head_dim": [1, 2]}, "attention_head_dim"),  # wrong length
    ({"rotary_dim": 31}, "rotary_dim"),
    ({"temporal_attention": "axial"}, "temporal_attention"),
    ({"use_fancy_thing": True}, "use_fancy_thing"),
    ({"dual_cross_attention": True}, "dual_cross_attention"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"use_first_frame": True}, "use_first_frame"),  # base stage with interpolation's attn1
    ({"stage": "refiner"}, "stage"),
    ({"down_temporal_idx": [0, 5]}, "down_temporal_idx"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
])
def test_bad_config_names_the_field(change, field):
    cfg = {**SD_LIKE, "stage": "base", **change}
    with pytest.raises(ConfigError, match=f"'{field}'"):
        arch_from_config(cfg)


def test_missing_required_field():
    cfg = {k: v for k, v in SD_LIKE.items() if k != "block_out_channels"}
    with pytest.raises(ConfigError, match="'block_out_channels'"):
        arch_from_config(cfg, stage="base")


def test_stage_conflict_is_named():
    with pytest.raises(ConfigError, match="'stage'"):
        arch_from_config(dict(SD_LIKE, stage="vsr"), stage="base")


def test_interpolation_head_dim_not_limited_by_rotary():
    # interpolation's temporal attention has no rotary embedding, so small heads are fine there
    arch = arch_from_config(dict(SD_LIKE, attention_head_dim=[2, 4, 4]), stage="interpolation")
    assert arch.heads == (2, 4, 4)
