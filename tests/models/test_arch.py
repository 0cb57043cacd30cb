"""UNet config parsing: official configs accepted as written, bad configs rejected with the field named."""

import json

import pytest

from lavie_jax.models import ConfigError, arch_from_config
from lavie_jax.stages import official_unet_config
from lavie_jax.stages.families import SD14_UNET, X4_UPSCALER_UNET
from lavie_jax.stages.vsr import LAVIE_VSR_UNET
from tests.models.tiny_configs import SD_LIKE, X4_LIKE


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


# ---------------------------------------------------------------- field types
@pytest.mark.parametrize("field,value,expected", [
    ("block_out_channels", 64, "a list of integers"),
    ("block_out_channels", [32, "64", 64], "a list of integers"),
    ("block_out_channels", [32, 64.5, 64], "a list of integers"),
    ("block_out_channels", [32, True, 64], "a list of integers"),
    ("down_block_types", "CrossAttnDownBlock2D", "a list of strings"),
    ("up_block_types", [1, 2, 3], "a list of strings"),
    ("mid_block_type", 3, "a string"),
    ("norm_eps", "1e-5", "a finite number"),
    ("norm_eps", True, "a finite number"),
    ("norm_eps", None, "a finite number"),
    ("norm_eps", float("nan"), "a finite number"),
    ("freq_shift", "0", "a finite number"),
    ("mid_block_scale_factor", [1.0], "a finite number"),
    ("layers_per_block", 2.5, "an integer"),
    ("layers_per_block", True, "an integer"),
    ("layers_per_block", "2", "an integer"),
    ("in_channels", 4.5, "an integer"),
    ("out_channels", False, "an integer"),
    ("cross_attention_dim", [24], "an integer"),
    ("norm_num_groups", True, "an integer"),
    ("downsample_padding", 1.5, "an integer"),
    ("num_class_embeds", 10.5, "an integer"),
    ("num_class_embeds", True, "an integer"),
    ("attention_head_dim", 1.5, "an integer or a list of 3 integers"),
    ("attention_head_dim", "8", "an integer or a list of 3 integers"),
    ("attention_head_dim", [1, True, 2], "a list of integers"),
    ("only_cross_attention", 1, "a boolean or a list of 3 booleans"),
    ("only_cross_attention", [True, 0, False], "a list of booleans"),
    ("flip_sin_to_cos", "true", "true or false"),
    ("flip_sin_to_cos", 1, "true or false"),
    ("use_linear_projection", 0, "true or false"),
    ("center_input_sample", "no", "true or false"),
    ("use_first_frame", 0, "true or false"),
    ("transformer_temporal_conv", "yes", "true or false"),
    ("mid_temporal", 1, "true or false"),
    ("down_temporal_idx", 0, "a list of integers"),
    ("up_temporal_idx", [0.5], "a list of integers"),
    ("rotary_dim", 32.5, "an integer"),
    ("rotary_theta", "1e4", "a finite number"),
    ("relative_position_buckets", True, "an integer"),
    ("temporal_module_kernel", 5.5, "an integer"),
    ("temporal_module_config", ["", ""], "a mapping"),
])
def test_wrong_typed_field_is_named_with_what_it_expects(field, value, expected):
    with pytest.raises(ConfigError, match=f"'{field}': expected {expected}"):
        arch_from_config({**SD_LIKE, "stage": "base", field: value})


@pytest.mark.parametrize("field,value", [("resnet_out_scale_factor", True), ("dropout", False)])
def test_fixed_field_rejects_bool_lookalikes(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        arch_from_config({**SD_LIKE, "stage": "base", field: value})


def test_accepted_numeric_forms():
    arch = arch_from_config({**SD_LIKE, "stage": "base", "layers_per_block": 2.0, "norm_eps": 1, "freq_shift": 0,
                             "block_out_channels": (32, 64, 64), "attention_head_dim": (1, 2, 2)})
    assert arch.layers_per_block == 2 and type(arch.layers_per_block) is int
    assert arch.norm_eps == 1.0 and type(arch.norm_eps) is float
    assert arch.block_out_channels == (32, 64, 64)


def test_stored_arch_with_a_wrong_type_is_rejected():
    stored = arch_from_config(SD_LIKE, stage="base").to_dict()
    with pytest.raises(ConfigError, match="'layers_per_block': expected an integer"):
        arch_from_config({**stored, "layers_per_block": 2.5})
    with pytest.raises(ConfigError, match="'heads': expected a list of integers"):
        arch_from_config({**stored, "heads": [1, 2.0, 2]})


# ---------------------------------------------------------------- VSR temporal resnets: always 32 groups
def test_vsr_temporal_layers_need_channels_divisible_by_32():
    cfg = {**X4_LIKE, "block_out_channels": [16, 32, 32, 64], "attention_head_dim": [1, 1, 1, 2]}  # 16 % 32 != 0
    with pytest.raises(ConfigError, match="'block_out_channels': 16 channels at the down temporal module 0"):
        arch_from_config(cfg, stage="vsr")
    with pytest.raises(ConfigError, match="'block_out_channels': 16 channels at the up temporal module 3"):
        arch_from_config({**cfg, "down_temporal_idx": [1, 2, 3]}, stage="vsr")
    # level 0 has no transformer (DownBlock): without temporal modules there, 16 channels are fine
    arch = arch_from_config({**cfg, "down_temporal_idx": [1, 2, 3], "up_temporal_idx": [0, 1, 2]}, stage="vsr")
    assert arch.norm_num_groups == 8
    base = arch_from_config(dict(SD_LIKE, block_out_channels=[48, 64, 64]), stage="base")
    assert base.block_out_channels[0] == 48  # no VSR temporal resnets in base


def test_vsr_transformer_temporal_conv_needs_channels_divisible_by_32():
    cfg = {**X4_LIKE, "block_out_channels": [32, 48, 64, 64], "norm_num_groups": 16, "down_temporal_idx": [],
           "mid_temporal": False, "up_temporal_idx": []}
    with pytest.raises(ConfigError, match="48 channels at the resblock_temporal of block 1"):
        arch_from_config(cfg, stage="vsr")
