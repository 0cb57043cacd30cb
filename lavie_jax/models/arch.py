"""Diffusers-style UNet config dict -> validated, frozen `UNetArch`.

The three LaVie denoisers are one `UNet3D` family; what differs between stages is data, not code:

| option                         | base               | interpolation      | vsr                 |
|--------------------------------|--------------------|--------------------|---------------------|
| `spatial_self_attention`       | `frame`            | `sparse_causal`    | `frame`             |
| `temporal_attention`           | `rotary_bias`      | `plain`            | `rotary_bias`       |
| `temporal_attention_after`     | `cross_attention`  | `feed_forward`     | `cross_attention`   |
| `transformer_temporal_conv`    | False              | False              | True                |
| temporal modules (down/mid/up) | none               | none               | after every block   |

`arch_from_config` accepts Stable Diffusion's `unet/config.json` as written (2D block names), the x4 upscaler's
config, and LaVie's `vsr/configs/unet_3d_config.json` (3D block names, temporal-module keys). The stage comes from the
`stage` key or the `stage=` argument; stage presets fill the temporal options, which an explicit key may override.
Every unknown key, and every known key with a value we do not implement, is an error that names the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

STAGES = ("base", "interpolation", "vsr")


class ConfigError(ValueError):
    """A UNet config field has a bad or unsupported value; the message names the field."""


_DOWN_TYPES = {
    "CrossAttnDownBlock2D": True, "CrossAttnDownBlock3D": True, "DownBlock2D": False, "DownBlock3D": False,
}
_UP_TYPES = {
    "CrossAttnUpBlock2D": True, "CrossAttnUpBlock3D": True, "UpBlock2D": False, "UpBlock3D": False,
}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock3DCrossAttn")

# Diffusers / LaVie keys that we accept only at the value that builds the LaVie architecture.
_FIXED_FIELDS: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "time_embedding_type": ("positional",),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "transformer_layers_per_block": (1,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_time_embed_dim": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "dropout": (0, 0.0),
    "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,),  # diffusers' alias; LaVie configs use attention_head_dim (= heads, legacy naming)
    "use_relative_position": (False,),  # a UNet-level bias LaVie never builds
    "video_condition": (False,),
    "addition_embed_type_num_heads": (64,),
}
# Keys that carry no architecture (sampling sizes, training switches) and are accepted as-is.
_IGNORED_FIELDS = ("sample_size", "upcast_attention", "freeze_pretrained_2d_upsampler")

_STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "base": dict(spatial_self_attention="frame", temporal_attention="rotary_bias",
                 temporal_attention_after="cross_attention", transformer_temporal_conv=False),
    "interpolation": dict(spatial_self_attention="sparse_causal", temporal_attention="plain",
                          temporal_attention_after="feed_forward", transformer_temporal_conv=False),
    "vsr": dict(spatial_self_attention="frame", temporal_attention="rotary_bias",
                temporal_attention_after="cross_attention", transformer_temporal_conv=True),
}
_CHOICES = {
    "spatial_self_attention": ("frame", "sparse_causal"),
    "temporal_attention": ("rotary_bias", "plain"),
    "temporal_attention_after": ("cross_attention", "feed_forward"),
}


@dataclasses.dataclass(frozen=True)
class UNetArch:
    """Validated architecture of one UNet3D. Per-block tuples are indexed like `down_blocks` (up blocks reverse them)."""

    stage: str
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_has_attention: tuple[bool, ...]
    up_has_attention: tuple[bool, ...]
    layers_per_block: int
    heads: tuple[int, ...]
    only_cross_attention: tuple[bool, ...]
    cross_attention_dim: int
    norm_num_groups: int
    norm_eps: float
    flip_sin_to_cos: bool
    freq_shift: float
    downsample_padding: int
    mid_block_scale_factor: float
    use_linear_projection: bool
    center_input_sample: bool
    num_class_embeds: int | None
    spatial_self_attention: str
    temporal_attention: str
    temporal_attention_after: str
    transformer_temporal_conv: bool
    down_temporal_idx: tuple[int, ...]
    mid_temporal: bool
    up_temporal_idx: tuple[int, ...]
    rotary_dim: int = 32
    rotary_theta: float = 10000.0
    relative_position_buckets: int = 32
    relative_position_max_distance: int = 32
    temporal_module_kernel: int = 5
    temporal_conv_kernel: int = 3

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def uses_rotary(self) -> bool:
        return self.temporal_attention == "rotary_bias"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; `arch_from_config(arch.to_dict())` rebuilds the same arch."""
        return {"__lavie_arch__": 1, **dataclasses.asdict(self)}


def _per_block(value: Any, n: int, field: str, kind: type) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"UNet config field '{field}': expected {n} entries (one per down block), got {len(value)}")
        out = tuple(value)
    else:
        out = (value,) * n
    for v in out:
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ConfigError(f"UNet config field '{field}': expected {kind.__name__} values, got {v!r}")
    return out


def _require(cfg: Mapping[str, Any], field: str, default: Any = dataclasses.MISSING) -> Any:
    if field in cfg:
        return cfg[field]
    if default is dataclasses.MISSING:
        raise ConfigError(f"UNet config is missing the required field '{field}'")
    return default


def _check_choice(field: str, value: Any) -> None:
    if value not in _CHOICES[field]:
        raise ConfigError(f"UNet config field '{field}': got {value!r}; choose one of {_CHOICES[field]}")


def _temporal_module_options(cfg: Mapping[str, Any]) -> None:
    tm = cfg.get("temporal_module_config")
    if tm is None:
        return
    types = tuple(tm.get("attention_block_types", ("", "")))
    if types != ("", ""):
        raise ConfigError(
            "UNet config field 'temporal_module_config.attention_block_types': only ['', ''] (no attention, as in the "
            f"released LaVie VSR model) is implemented, got {list(types)}")
    if tm.get("use_scale_shift", False):
        raise ConfigError("UNet config field 'temporal_module_config.use_scale_shift': only false is implemented")


def arch_from_config(config: Mapping[str, Any], stage: str | None = None) -> UNetArch:
    """Build the validated architecture from a diffusers-style UNet config dict.

    Args:
      config: the dict of a diffusers `unet/config.json` (2D or LaVie 3D block names) plus optional stage options
        (any `UNetArch` field name, e.g. `temporal_attention`), or the output of `UNetArch.to_dict()`.
      stage: 'base' | 'interpolation' | 'vsr'; overrides/must agree with a `stage` key in `config`.
    Raises:
      ConfigError naming the offending field.
    """
    cfg = dict(config)
    if cfg.pop("__lavie_arch__", None) is not None:  # a stored UNetArch: restore tuples, no re-derivation needed
        return _from_stored(cfg)
    cfg_stage = cfg.pop("stage", None)
    if stage is not None and cfg_stage is not None and stage != cfg_stage:
        raise ConfigError(f"UNet config field 'stage': config says {cfg_stage!r} but {stage!r} was requested")
    stage = stage or cfg_stage
    if stage not in STAGES:
        raise ConfigError(f"UNet config field 'stage': got {stage!r}; choose one of {STAGES}")

    known = {f.name for f in dataclasses.fields(UNetArch)}
    diffusers_keys = {"in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
                      "mid_block_type", "layers_per_block", "attention_head_dim", "only_cross_attention",
                      "cross_attention_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift",
                      "downsample_padding", "mid_block_scale_factor", "use_linear_projection",
                      "center_input_sample", "num_class_embeds", "use_first_frame", "temporal_module_config",
                      "down_temporal_idx", "mid_temporal", "up_temporal_idx"}
    for key, value in cfg.items():
        if key.startswith("_") or key in _IGNORED_FIELDS or key in diffusers_keys or key in known:
            continue
        if key in _FIXED_FIELDS:
            if value not in _FIXED_FIELDS[key]:
                raise ConfigError(f"UNet config field '{key}': value {value!r} is not supported by LaVie's UNet3D "
                                  f"(supported: {list(_FIXED_FIELDS[key])})")
            continue
        raise ConfigError(f"UNet config has an unknown field '{key}' (not a diffusers UNet2DConditionModel or LaVie "
                          "UNet3D key); remove it or fix its spelling")

    block_out = tuple(_require(cfg, "block_out_channels"))
    n = len(block_out)
    if n < 2:
        raise ConfigError("UNet config field 'block_out_channels': need at least 2 levels")
    down_types = tuple(_require(cfg, "down_block_types"))
    up_types = tuple(_require(cfg, "up_block_types"))
    for field, types, table in (("down_block_types", down_types, _DOWN_TYPES), ("up_block_types", up_types, _UP_TYPES)):
        if len(types) != n:
            raise ConfigError(f"UNet config field '{field}': {len(types)} blocks but block_out_channels has {n}")
        for t in types:
            if t not in table:
                raise ConfigError(f"UNet config field '{field}': unknown block type {t!r}; "
                                  f"supported: {sorted(table)}")
    down_attn = tuple(_DOWN_TYPES[t] for t in down_types)
    up_attn = tuple(_UP_TYPES[t] for t in up_types)
    if up_attn != tuple(reversed(down_attn)):
        raise ConfigError("UNet config fields 'down_block_types'/'up_block_types': the up blocks must mirror the down "
                          f"blocks (cross-attention pattern {down_attn} reversed), got {up_attn}")
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in _MID_TYPES:
        raise ConfigError(f"UNet config field 'mid_block_type': {mid_type!r} is not supported; use one of {_MID_TYPES}")

    heads = _per_block(_require(cfg, "attention_head_dim", 8), n, "attention_head_dim", int)
    only_cross = _per_block(cfg.get("only_cross_attention", False), n, "only_cross_attention", bool)
    groups = int(_require(cfg, "norm_num_groups", 32))

    opts = dict(_STAGE_PRESETS[stage])
    if "use_first_frame" in cfg:
        want = stage == "interpolation"
        if bool(cfg["use_first_frame"]) != want:
            raise ConfigError(f"UNet config field 'use_first_frame': {cfg['use_first_frame']} does not match stage "
                              f"{stage!r} (LaVie sets it only for interpolation, whose attn1 is sparse-causal)")
    for key in _CHOICES:
        if key in cfg:
            _check_choice(key, cfg[key])
            opts[key] = cfg[key]
    opts["transformer_temporal_conv"] = bool(cfg.get("transformer_temporal_conv", opts["transformer_temporal_conv"]))
    _temporal_module_options(cfg)
    temporal_default = tuple(range(n)) if stage == "vsr" else ()
    down_t = tuple(cfg.get("down_temporal_idx", temporal_default))
    up_t = tuple(cfg.get("up_temporal_idx", temporal_default))
    for field, idx in (("down_temporal_idx", down_t), ("up_temporal_idx", up_t)):
        if any(not isinstance(i, int) or not 0 <= i < n for i in idx):
            raise ConfigError(f"UNet config field '{field}': indices must be block indices in [0, {n}), got {list(idx)}")

    arch = UNetArch(
        stage=stage,
        in_channels=int(_require(cfg, "in_channels")),
        out_channels=int(_require(cfg, "out_channels")),
        block_out_channels=block_out,
        down_has_attention=down_attn,
        up_has_attention=up_attn,
        layers_per_block=int(_require(cfg, "layers_per_block", 2)),
        heads=heads,
        only_cross_attention=only_cross,
        cross_attention_dim=int(_require(cfg, "cross_attention_dim")),
        norm_num_groups=groups,
        norm_eps=float(_require(cfg, "norm_eps", 1e-5)),
        flip_sin_to_cos=bool(_require(cfg, "flip_sin_to_cos", True)),
        freq_shift=float(_require(cfg, "freq_shift", 0)),
        downsample_padding=int(_require(cfg, "downsample_padding", 1)),
        mid_block_scale_factor=float(_require(cfg, "mid_block_scale_factor", 1.0)),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        center_input_sample=bool(cfg.get("center_input_sample", False)),
        num_class_embeds=cfg.get("num_class_embeds"),
        down_temporal_idx=tuple(sorted(set(down_t))),
        mid_temporal=bool(cfg.get("mid_temporal", stage == "vsr")),
        up_temporal_idx=tuple(sorted(set(up_t))),
        **{k: cfg[k] for k in ("rotary_dim", "rotary_theta", "relative_position_buckets",
                               "relative_position_max_distance", "temporal_module_kernel", "temporal_conv_kernel")
           if k in cfg},
        **opts,
    )
    validate(arch)
    return arch


def _from_stored(cfg: dict[str, Any]) -> UNetArch:
    names = {f.name for f in dataclasses.fields(UNetArch)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ConfigError(f"stored UNet architecture has unknown fields {unknown}; was it written by a newer lavie-jax?")
    arch = UNetArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    validate(arch)
    return arch


def validate(arch: UNetArch) -> None:
    """Cross-field checks; raises ConfigError naming the field."""
    if arch.stage not in STAGES:
        raise ConfigError(f"UNet config field 'stage': got {arch.stage!r}; choose one of {STAGES}")
    for key in _CHOICES:
        _check_choice(key, getattr(arch, key))
    for field in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups"):
        if getattr(arch, field) <= 0:
            raise ConfigError(f"UNet config field '{field}' must be positive, got {getattr(arch, field)}")
    if arch.downsample_padding not in (0, 1):
        raise ConfigError(f"UNet config field 'downsample_padding' must be 0 or 1, got {arch.downsample_padding}")
    if arch.num_class_embeds is not None and (not isinstance(arch.num_class_embeds, int) or arch.num_class_embeds <= 0):
        raise ConfigError(f"UNet config field 'num_class_embeds' must be a positive int or null, got "
                          f"{arch.num_class_embeds!r}")
    for i, c in enumerate(arch.block_out_channels):
        if c <= 0 or c % arch.norm_num_groups:
            raise ConfigError(f"UNet config field 'block_out_channels': {c} (block {i}) is not divisible by "
                              f"norm_num_groups={arch.norm_num_groups}")
    if arch.rotary_dim <= 0 or arch.rotary_dim % 2:
        raise ConfigError(f"UNet config field 'rotary_dim' must be a positive even number, got {arch.rotary_dim}")
    if arch.temporal_conv_kernel % 2 == 0 or arch.temporal_module_kernel % 2 == 0:
        raise ConfigError("UNet config fields 'temporal_conv_kernel'/'temporal_module_kernel' must be odd "
                          "(same-length temporal convolutions)")
    levels = [(i, arch.block_out_channels[i], arch.heads[i]) for i in range(arch.num_levels)
              if arch.down_has_attention[i]]
    levels.append((arch.num_levels - 1, arch.block_out_channels[-1], arch.heads[-1]))  # mid block
    for i, c, h in levels:
        if h <= 0 or c % h:
            raise ConfigError(f"UNet config field 'attention_head_dim' (number of heads in LaVie/diffusers legacy "
                              f"naming): {c} channels of block {i} are not divisible by {h} heads")
        if arch.uses_rotary and c // h < arch.rotary_dim:
            raise ConfigError(f"UNet config field 'attention_head_dim': block {i} has head dim {c}/{h}={c // h}, smaller "
                              f"than the rotary dimension {arch.rotary_dim} of the temporal attention; use fewer heads "
                              "or more channels")


def heads_up(arch: UNetArch) -> tuple[int, ...]:
    """Heads per up block (diffusers reverses the per-down-block list)."""
    return tuple(reversed(arch.heads))


def only_cross_up(arch: UNetArch) -> tuple[bool, ...]:
    return tuple(reversed(arch.only_cross_attention))
