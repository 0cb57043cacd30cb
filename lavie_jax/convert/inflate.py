"""2D -> 3D: a LaVie UNet's state dict (official key names) from a Stable Diffusion or x4-upscaler UNet, and telling
the stages' checkpoints apart.

Inflation rules (the official `from_pretrained_2d` converters, without the interpolation converter's bug of leaving
everything but conv_in random):
- every key of the 2D UNet goes to the same key of the 3D UNet, its spatial layer (convs stay 2D per frame);
- every 3D key the 2D UNet lacks must be temporal (the official converters' tests: the name contains `_temp`, as
  `attn_temp`/`norm_temp` in base and interpolation, or `temporal`, as `attn_temporal`, `resblock_temporal`,
  `*_temporal_block(s)` and `temporal_rotary_emb` in VSR) and gets UNet3D's own initial value, which is the
  official fresh init (PyTorch defaults, zeroed temporal-attention output weights, zeroed `shift_conv`);
- a stage whose UNet takes more input channels than its 2D model (interpolation: 8 from SD's 4) gets the 2D
  `conv_in` weights for the first channels, zero for its conditioning channels, and the 2D bias.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from lavie_jax.convert.keymap import (official_names, param_paths, rotary_freq_keys, to_torch_layout, torch_key,
                                      torch_shapes)
from lavie_jax.convert.torch_files import LazyTensor
from lavie_jax.io.keycheck import KeyMismatchError, check_keys
from lavie_jax.models.arch import UNetArch
from lavie_jax.models.embeddings import rotary_frequencies
from lavie_jax.models.random_init import compiled_initialiser
from lavie_jax.models.unet import UNet3D
from lavie_jax.stages import REGISTRY, get_stage, in_family

# What `detect_unet` may answer, as a phrase: a stage's LaVie checkpoint, or a 2D model of a UNet family.
DESCRIPTIONS = {**{name: f"a LaVie {name} checkpoint" for name in REGISTRY},
                "sd": "a 2D Stable Diffusion UNet (no temporal layers)",
                "x4": "the 2D x4-upscaler UNet (no temporal layers)"}


class StageMismatchError(KeyMismatchError):
    """The checkpoint belongs to another stage (or is a 2D UNet where a LaVie one was expected, or vice versa)."""


def is_temporal_key(key: str) -> bool:
    """True for the PyTorch keys of layers LaVie adds to a 2D UNet (all stages)."""
    return "_temp" in key or "temporal" in key


def detect_unet(keys: Any) -> str | None:
    """Which kind of UNet a state dict belongs to: a stage name or a family name (`DESCRIPTIONS`), or None if it is
    no UNet. `keys` may be a mapping of keys to shapes or tensors: `conv_in`'s input channels then tell apart
    stages whose layers are otherwise alike."""
    shapes = keys if isinstance(keys, Mapping) else {}
    keys = set(keys)
    if "conv_in.weight" not in keys or not any(k.startswith("down_blocks.") for k in keys):
        return None
    if any(m in k for k in keys for m in ("attn_temporal.", "resblock_temporal.", "temporal_block")):
        candidates = in_family("x4")
    elif any(".attn_temp." in k for k in keys):
        rotary = any(".time_rel_pos_bias." in k or ".rotary_emb." in k for k in keys)
        candidates = tuple(s for s in in_family("sd")
                           if (s.unet_preset["temporal_attention"] == "rotary_bias") == rotary)
    else:
        return "x4" if "class_embedding.weight" in keys else "sd"
    if "conv_in.weight" in shapes and len(candidates) > 1:
        value = shapes["conv_in.weight"]
        channels = (value if isinstance(value, tuple) else tuple(np.shape(value)))[1]
        candidates = tuple(s for s in candidates if s.unet_in_channels == channels) or candidates
    return candidates[0].name if candidates else None


def _hint(detected: str, wanted: str, stage: str) -> str:
    if detected == "x4":
        return "convert it with `lavie-convert x4`"
    if detected == "sd":
        target = stage if get_stage(stage).family.name == "sd" else in_family("sd")[0].name
        return f"convert it with `lavie-convert sd --stage {target}`"
    if wanted in ("sd", "x4"):
        return f"convert it with `lavie-convert lavie --stage {detected}`"
    return f"pass --stage {detected}"


def check_source(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]], *, stage: str,
                 lavie: bool, what: str) -> None:
    """`check_keys`, but if the keys disagree because the file is another stage's (or a 2D UNet where a LaVie
    checkpoint was expected, or the reverse), raise StageMismatchError saying so first.

    Args:
      expected / actual: PyTorch key -> shape.
      stage: the stage asked for; lavie: True for a LaVie checkpoint, False for a 2D source UNet.
    """
    try:
        check_keys(expected, actual, what=what)
    except KeyMismatchError as e:
        wanted = stage if lavie else get_stage(stage).family.name
        detected = detect_unet(actual)
        if detected is None or detected == wanted:
            raise
        raise StageMismatchError(f"{what} looks like {DESCRIPTIONS[detected]}, not {DESCRIPTIONS[wanted]}: "
                                 f"{_hint(detected, wanted, stage)}.\n{e}") from None


def stage_unet_config(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """A diffusers-style UNet config for `stage`. A 2D config that takes only the noisy latents (in == out
    channels) gets the stage's conditioning channels too (interpolation: `in_channels = 8`)."""
    cfg = dict(config)
    if cfg.get("in_channels") == cfg.get("out_channels") and cfg.get("out_channels") is not None:
        cfg["in_channels"] = cfg["out_channels"] + get_stage(stage).condition_channels
    return cfg


def _temporal_initialiser(arch: UNetArch, paths: tuple[tuple[Any, ...], ...]) -> Callable[[int], list[jax.Array]]:
    """Compiled `seed -> params at paths` of a fresh model, kept in memory per (arch, paths) by random_init
    (compiling hundreds of RNG outputs takes seconds)."""

    def init(seed: jax.Array) -> list[jax.Array]:
        model = UNet3D(arch, rngs=nnx.Rngs(jax.random.key(seed)))  # what nnx.Rngs(seed) does, traceable
        flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        return [flat[p][...] for p in paths]

    # the draws batched, compiled as a program that runs once (random_init): the same values, built far faster
    return compiled_initialiser(init, jax.ShapeDtypeStruct((), jax.numpy.int32), key=("UNet3D params", arch, paths))


def fresh_temporal_params(model: UNet3D, seed: int = 0) -> dict[str, np.ndarray]:
    """The temporal params of `UNet3D(model.arch, rngs=nnx.Rngs(seed))`, PyTorch names and layouts, rotary buffers
    included (`model` may be abstract: only its architecture and param paths are used).

    The whole model is constructed under `jax.jit` but only the temporal params are returned, so XLA drops every
    other initialiser: memory scales with the temporal layers, and the values are those of an eager build.
    """
    arch = model.arch
    names = official_names(model)
    paths = tuple(p for p, _ in param_paths(model) if is_temporal_key(torch_key(p, renames=names)))
    values = _temporal_initialiser(arch, paths)(np.int32(seed))
    out = {torch_key(p, renames=names): to_torch_layout(np.asarray(v), str(p[-1])) for p, v in zip(paths, values)}
    for key in rotary_freq_keys(model):
        out[key] = rotary_frequencies(arch.rotary_dim, arch.rotary_theta)
    return out


def _widen_in_channels(value: Any, channels: int) -> Any:
    """conv weight `[O, I, kh, kw]` -> `[O, channels, kh, kw]`, new input channels zero (lazily for LazyTensors)."""
    o, i, kh, kw = value.shape

    def widen(a: np.ndarray) -> np.ndarray:
        out = np.zeros((o, channels, kh, kw), a.dtype)
        out[:, :i] = a
        return out

    if isinstance(value, LazyTensor):
        return value.derive(widen, (o, channels, kh, kw))
    return widen(np.asarray(value))


def inflate_state_dict(model: UNet3D, source: Mapping[str, Any], *, seed: int = 0,
                       what: str = "2D UNet") -> dict[str, Any]:
    """The full state dict (official key names and layouts) of `model` from a 2D UNet's state dict.

    `source` values may be lazy (`LazyTensor`): they are passed through unread, so the result streams like a
    LaVie checkpoint. Raises StageMismatchError / KeyMismatchError when the 2D keys do not fit `model`.
    """
    arch = model.arch
    family = get_stage(arch.stage).family
    wanted = family.name
    detected = detect_unet({k: np.shape(v) for k, v in source.items()})
    if detected not in (None, wanted):  # even if the keys fit, e.g. SD weights in an SD-shaped VSR model
        raise StageMismatchError(f"{what} looks like {DESCRIPTIONS[detected]}, not {DESCRIPTIONS[wanted]}: "
                                 f"{_hint(detected, wanted, arch.stage)}.")
    target = torch_shapes(model)
    expected_2d = {k: s for k, s in target.items() if not is_temporal_key(k)}
    widen = arch.in_channels > family.pretrained_in_channels
    if widen:  # the 2D conv_in sees only the noisy latents (and the family's own conditioning)
        o, _, kh, kw = target["conv_in.weight"]
        expected_2d["conv_in.weight"] = (o, family.pretrained_in_channels, kh, kw)
    check_source(expected_2d, {k: tuple(np.shape(v)) for k, v in source.items()}, stage=arch.stage, lavie=False,
                 what=what)
    out = dict(source)
    if widen:
        out["conv_in.weight"] = _widen_in_channels(source["conv_in.weight"], arch.in_channels)
    out.update(fresh_temporal_params(model, seed))
    return out
