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
`stage` key or the `stage=` argument; the stage's preset (`lavie_jax.stages`, `Stage.unet_preset`) fills the temporal
options, which an explicit key may override.
Every unknown key, and every known key with a value we do not implement, is an error that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from lavie_jax.stages import STAGES, get_stage


# GroupNorm (groups, eps) of VSR's temporal resnets: Transformer3DModel.resblock_temporal and both resnets of
# TemporalModule3D. The official code builds them with the ResnetBlock3D(CNN) constructor defaults, not with the
# UNet config's norm_num_groups/norm_eps, so these values hold whatever the config says (`validate` checks that the
# channels there divide into 32 groups).
VSR_TEMPORAL_NORM: tuple[int, float] = (32, 1e-6)


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


def _bad_type(field: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"UNet config field '{field}': expected {expected}, got {value!r} ({type(value).__name__})")


def _as_int(field: str, value: Any) -> int:
    """An integer (an integral float such as 2.0 is taken as 2); bools, fractions and strings are errors."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _bad_type(field, value, "an integer")


def _as_float(field: str, value: Any) -> float:
    """A finite int or float; bools and strings are errors."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise _bad_type(field, value, "a finite number")


def _as_bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _bad_type(field, value, "true or false")


def _as_str(field: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _bad_type(field, value, "a string")


_NAMES = {_as_int: "integers", _as_float: "numbers", _as_bool: "booleans", _as_str: "strings"}
_ONE = {_as_int: "an integer", _as_float: "a number", _as_bool: "a boolean", _as_str: "a string"}


def _as_list(field: str, value: Any, item: Callable[[str, Any], Any]) -> tuple:
    """A list/tuple whose entries each pass `item` (e.g. `_as_int`)."""
    if not isinstance(value, (list, tuple)):
        raise _bad_type(field, value, f"a list of {_NAMES[item]}")
    try:
        return tuple(item(field, v) for v in value)
    except ConfigError:
        raise _bad_type(field, value, f"a list of {_NAMES[item]}") from None


def _per_block(value: Any, n: int, field: str, item: Callable[[str, Any], Any]) -> tuple:
    """One value for every block, or a list of `n` (one per down block)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"UNet config field '{field}': expected {n} entries (one per down block), got {len(value)}")
        return _as_list(field, value, item)
    try:
        return (item(field, value),) * n
    except ConfigError:
        raise _bad_type(field, value, f"{_ONE[item]} or a list of {n} {_NAMES[item]}") from None


# Scalar fields of the config (and of UNetArch), by type; lists are handled where they are read.
_INT_FIELDS = ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups",
               "downsample_padding", "rotary_dim", "relative_position_buckets", "relative_position_max_distance",
               "temporal_module_kernel", "temporal_conv_kernel")
_FLOAT_FIELDS = ("norm_eps", "freq_shift", "mid_block_scale_factor", "rotary_theta")
_BOOL_FIELDS = ("flip_sin_to_cos", "use_linear_projection", "center_input_sample", "transformer_temporal_conv",
                "mid_temporal", "use_first_frame")
_SCALAR = {**{f: _as_int for f in _INT_FIELDS}, **{f: _as_float for f in _FLOAT_FIELDS},
           **{f: _as_bool for f in _BOOL_FIELDS}}


def _optional_int(field: str, value: Any) -> int | None:
    return None if value is None else _as_int(field, value)


def _get(cfg: Mapping[str, Any], field: str, default: Any = dataclasses.MISSING) -> Any:
    """`cfg[field]` checked and converted by its type (`_SCALAR`); `default` (unchecked) when absent."""
    if field not in cfg:
        return _require(cfg, field, default)
    return _SCALAR[field](field, cfg[field])


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
    if not isinstance(tm, Mapping):
        raise _bad_type("temporal_module_config", tm, "a mapping (JSON object) or null")
    types = _as_list("temporal_module_config.attention_block_types", tm.get("attention_block_types", ("", "")), _as_str)
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
            if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in _FIXED_FIELDS[key]):
                raise ConfigError(f"UNet config field '{key}': value {value!r} is not supported by LaVie's UNet3D "
                                  f"(supported: {list(_FIXED_FIELDS[key])})")
            continue
        raise ConfigError(f"UNet config has an unknown field '{key}' (not a diffusers UNet2DConditionModel or LaVie "
                          "UNet3D key); remove it or fix its spelling")

    block_out = _as_list("block_out_channels", _require(cfg, "block_out_channels"), _as_int)
    n = len(block_out)
    if n < 2:
        raise ConfigError("UNet config field 'block_out_channels': need at least 2 levels")
    down_types = _as_list("down_block_types", _require(cfg, "down_block_types"), _as_str)
    up_types = _as_list("up_block_types", _require(cfg, "up_block_types"), _as_str)
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
    mid_type = _as_str("mid_block_type", cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn"))
    if mid_type not in _MID_TYPES:
        raise ConfigError(f"UNet config field 'mid_block_type': {mid_type!r} is not supported; use one of {_MID_TYPES}")

    heads = _per_block(_require(cfg, "attention_head_dim", 8), n, "attention_head_dim", _as_int)
    only_cross = _per_block(cfg.get("only_cross_attention", False), n, "only_cross_attention", _as_bool)

    opts = {k: v for k, v in get_stage(stage).unet_preset.items() if k != "temporal_modules"}
    temporal_modules = get_stage(stage).unet_preset["temporal_modules"]  # after every block, by default
    if "use_first_frame" in cfg:
        want = opts["spatial_self_attention"] == "sparse_causal"
        if _get(cfg, "use_first_frame") != want:
            raise ConfigError(f"UNet config field 'use_first_frame': {cfg['use_first_frame']} does not match stage "
                              f"{stage!r} (LaVie sets it only where attn1 is sparse-causal, as in interpolation)")
    for key in _CHOICES:
        if key in cfg:
            _check_choice(key, cfg[key])
            opts[key] = cfg[key]
    opts["transformer_temporal_conv"] = _get(cfg, "transformer_temporal_conv", opts["transformer_temporal_conv"])
    _temporal_module_options(cfg)
    temporal_default = tuple(range(n)) if temporal_modules else ()
    down_t = _as_list("down_temporal_idx", cfg.get("down_temporal_idx", temporal_default), _as_int)
    up_t = _as_list("up_temporal_idx", cfg.get("up_temporal_idx", temporal_default), _as_int)
    for field, idx in (("down_temporal_idx", down_t), ("up_temporal_idx", up_t)):
        if any(not 0 <= i < n for i in idx):
            raise ConfigError(f"UNet config field '{field}': indices must be block indices in [0, {n}), got {list(idx)}")

    arch = UNetArch(
        stage=stage,
        in_channels=_get(cfg, "in_channels"),
        out_channels=_get(cfg, "out_channels"),
        block_out_channels=block_out,
        down_has_attention=down_attn,
        up_has_attention=up_attn,
        layers_per_block=_get(cfg, "layers_per_block", 2),
        heads=heads,
        only_cross_attention=only_cross,
        cross_attention_dim=_get(cfg, "cross_attention_dim"),
        norm_num_groups=_get(cfg, "norm_num_groups", 32),
        norm_eps=_get(cfg, "norm_eps", 1e-5),
        flip_sin_to_cos=_get(cfg, "flip_sin_to_cos", True),
        freq_shift=_get(cfg, "freq_shift", 0.0),
        downsample_padding=_get(cfg, "downsample_padding", 1),
        mid_block_scale_factor=_get(cfg, "mid_block_scale_factor", 1.0),
        use_linear_projection=_get(cfg, "use_linear_projection", False),
        center_input_sample=_get(cfg, "center_input_sample", False),
        num_class_embeds=_optional_int("num_class_embeds", cfg.get("num_class_embeds")),
        down_temporal_idx=tuple(sorted(set(down_t))),
        mid_temporal=_get(cfg, "mid_temporal", temporal_modules),
        up_temporal_idx=tuple(sorted(set(up_t))),
        **{k: _get(cfg, k) for k in ("rotary_dim", "rotary_theta", "relative_position_buckets",
                                     "relative_position_max_distance", "temporal_module_kernel",
                                     "temporal_conv_kernel") if k in cfg},
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


_TUPLE_FIELDS = {"block_out_channels": "integers", "heads": "integers", "down_temporal_idx": "integers",
                 "up_temporal_idx": "integers", "down_has_attention": "booleans", "up_has_attention": "booleans",
                 "only_cross_attention": "booleans"}


def _check_types(arch: UNetArch) -> None:
    """Strict types of every field (a stored or hand-built arch skips `arch_from_config`'s conversions)."""
    is_int = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
    for f in dataclasses.fields(arch):
        v = getattr(arch, f.name)
        if f.name in _INT_FIELDS and not is_int(v):
            raise _bad_type(f.name, v, "an integer")
        if f.name in _FLOAT_FIELDS:
            _as_float(f.name, v)
        if f.name in _BOOL_FIELDS:
            _as_bool(f.name, v)
        if f.name in _TUPLE_FIELDS:
            want = is_int if _TUPLE_FIELDS[f.name] == "integers" else (lambda x: isinstance(x, bool))
            if not isinstance(v, tuple) or not all(want(x) for x in v):
                raise _bad_type(f.name, v, f"a list of {_TUPLE_FIELDS[f.name]}")
    if arch.num_class_embeds is not None and not is_int(arch.num_class_embeds):
        raise _bad_type("num_class_embeds", arch.num_class_embeds, "an integer or null")


def _temporal_norm_channels(arch: UNetArch) -> list[tuple[str, int]]:
    """(where, channels) of every layer normalised with `VSR_TEMPORAL_NORM`."""
    c, n = arch.block_out_channels, arch.num_levels
    out = []
    if arch.transformer_temporal_conv:
        out += [(f"resblock_temporal of block {i}", c[i]) for i in range(n) if arch.down_has_attention[i]]
        out.append(("resblock_temporal of the mid block", c[-1]))
    out += [(f"down temporal module {i}", c[i]) for i in arch.down_temporal_idx]
    out += [("mid temporal module", c[-1])] if arch.mid_temporal else []
    out += [(f"up temporal module {i}", c[n - 1 - i]) for i in arch.up_temporal_idx]
    return out


def validate(arch: UNetArch) -> None:
    """Type and cross-field checks; raises ConfigError naming the field."""
    _check_types(arch)
    n = arch.num_levels
    for field in ("heads", "down_has_attention", "up_has_attention", "only_cross_attention"):
        if len(getattr(arch, field)) != n:  # a hand-edited or stored arch skips arch_from_config's per-level checks
            raise ConfigError(f"UNet config field '{field}': {len(getattr(arch, field))} entries but "
                              f"block_out_channels has {n} levels")
    for field in ("down_temporal_idx", "up_temporal_idx"):
        if any(not 0 <= i < n for i in getattr(arch, field)):
            raise ConfigError(f"UNet config field '{field}': {list(getattr(arch, field))} must index the {n} levels")
    if arch.stage not in STAGES:
        raise ConfigError(f"UNet config field 'stage': got {arch.stage!r}; choose one of {STAGES}")
    for key in _CHOICES:
        _check_choice(key, getattr(arch, key))
    for field in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups"):
        if getattr(arch, field) <= 0:
            raise ConfigError(f"UNet config field '{field}' must be positive, got {getattr(arch, field)}")
    if arch.downsample_padding not in (0, 1):
        raise ConfigError(f"UNet config field 'downsample_padding' must be 0 or 1, got {arch.downsample_padding}")
    if arch.num_class_embeds is not None and arch.num_class_embeds <= 0:
        raise ConfigError(f"UNet config field 'num_class_embeds' must be a positive int or null, got "
                          f"{arch.num_class_embeds!r}")
    for i, c in enumerate(arch.block_out_channels):
        if c <= 0 or c % arch.norm_num_groups:
            raise ConfigError(f"UNet config field 'block_out_channels': {c} (block {i}) is not divisible by "
                              f"norm_num_groups={arch.norm_num_groups}")
    groups = VSR_TEMPORAL_NORM[0]
    for where, c in _temporal_norm_channels(arch):
        if c % groups:
            raise ConfigError(f"UNet config field 'block_out_channels': {c} channels at the {where} are not divisible "
                              f"by {groups}, the GroupNorm group count LaVie's VSR temporal resnets always use "
                              "(whatever norm_num_groups says)")
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
