"""Low-rank adapters (LoRA) in the wrapping seam (`models.wrapping`): building, reading out, and merging them.

A wrapped layer returns `y + scale * up(down(x))` with `scale = multiplier * alpha / rank` (kohya's and PEFT's
convention; a file without alpha means alpha = rank). Adapter params, in our layouts, per layer:

| layer                       | `lora_a` (down)        | `lora_b` (up)  | merged kernel delta                        |
|-----------------------------|------------------------|----------------|--------------------------------------------|
| `Dense` kernel `[I, O]`     | `[I, r]`               | `[r, O]`       | `A @ B`                                    |
| `Conv` kernel `[*k, I, O]`  | `[*k, I, r]` (same kernel, stride, padding as the layer) | `[r, O]` (1x1) | `einsum('...ir,ro->...io', A, B)` |

(PyTorch's are the transposes: `lora_A.weight [r, I(, kh, kw)]`, `lora_B.weight [O, r(, 1, 1)]`; `convert.lora_files`
moves between them.) Dense adapters are `nnx.LoRA` modules: it computes `x @ A @ B` with `nnx.LoRAParam`s that carry
our sharding metadata. It has no convolution, so conv adapters are `ConvLoRA` here, with the same `nnx.LoRAParam`
type: `nnx.state(model, nnx.LoRAParam)` selects every adapter param and nothing else (a LoRAParam is an nnx.Param,
so the loaders and the training split see them as params too). Neither keeps alpha: the `LoRA` wrapper holds it.

Sampling merges (`merge_params`): `W' = W + sum_i m_i * alpha_i / r_i * delta_i` computed on the devices by one jitted
function whose multipliers are arguments, into a new param state (the base one is untouched, so other scales are
another call on the base, never an unmerge). The sampler then runs the unwrapped model's program: the same one as
the base's whatever the adapters and scales, and without the adapters' extra matmuls at every denoising step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.models.layers import Conv, torch_uniform
from lavie_jax.models.wrapping import WrapRuleError, layer_paths, select_layers, wrap_layers, wrapped_layers


class LoRAError(ValueError):
    """An adapter does not fit the model, or a rule is malformed; the message names the layer or rule and the fix."""


@dataclasses.dataclass(frozen=True)
class LayerAdapter:
    """One layer's adapter in our layouts (module docstring): `a [*k, I, r]`, `b [r, O]`, its alpha."""

    a: Any
    b: Any
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


Adapter = Mapping[str, LayerAdapter]  # {layer path (models.wrapping): its adapter}


def max_rank(layer: nnx.Module) -> int:
    """The largest useful rank of `layer`'s adapter: min(fan-in, fan-out) of its kernel."""
    shape = layer.kernel.shape
    return min(math.prod(shape[:-1]), shape[-1])


def _axes(var: nnx.Variable) -> tuple:
    return tuple(var.get_metadata().get("out_sharding") or (None,) * var.ndim)


class ConvLoRA(nnx.Module):
    """The adapter of a `Conv`: a down conv with the layer's own kernel size, stride and padding to `rank` channels,
    then a 1x1 up projection; `[B, F, H, W, I] -> [B, F, H', W', O]`."""

    def __init__(self, layer: Conv, rank: int, *, rngs: nnx.Rngs):
        *k, cin, cout = layer.kernel.shape
        axes = _axes(layer.kernel)
        self.lora_a = nnx.LoRAParam(torch_uniform(math.prod(k) * cin)(rngs.params(), (*k, cin, rank)),
                                    out_sharding=(*axes[:-1], None), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, cout), jnp.float32), out_sharding=(None, axes[-1]),
                                    eager_sharding=False)
        self.temporal, self.stride, self.padding, self.dtype = layer.temporal, layer.stride, layer.padding, layer.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.lora_a[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if self.temporal:
            h = jax.lax.conv_general_dilated(x, a, (1, 1, 1), self.padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        else:
            b, f = x.shape[:2]
            h = jax.lax.conv_general_dilated(x.reshape(b * f, *x.shape[2:]), a, (self.stride,) * 2, self.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = h.reshape(b, f, *h.shape[1:])
        return h @ self.lora_b[...].astype(self.dtype)


class LoRA(nnx.Module):
    """The wrapper of one layer: `y + multiplier * alpha / rank * adapter(x)`. `rank`, `alpha` and `multiplier` are
    static (a training run has one of each; sampling merges instead of changing them)."""

    def __init__(self, layer: nnx.Module, rank: int, alpha: float, *, rngs: nnx.Rngs, multiplier: float = 1.0):
        self.rank, self.alpha, self.multiplier = int(rank), float(alpha), float(multiplier)
        if isinstance(layer, Conv):
            self.adapter = ConvLoRA(layer, rank, rngs=rngs)
        else:
            fin, fout = layer.kernel.shape
            axes = _axes(layer.kernel)
            self.adapter = nnx.LoRA(fin, rank, fout, dtype=layer.dtype, rngs=rngs,
                                    a_initializer=torch_uniform(fin),  # PEFT's kaiming_uniform(a=sqrt(5))
                                    a_metadata={"out_sharding": (axes[0], None), "eager_sharding": False},
                                    b_metadata={"out_sharding": (None, axes[1]), "eager_sharding": False})

    @property
    def scale(self) -> float:
        return self.multiplier * self.alpha / self.rank

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return y + (self.scale * self.adapter(x)).astype(y.dtype)


# --------------------------------------------------------------------------------------------------- rules

def parse_rules(rules: Sequence[Any], *, field: str = "lora.rules") -> list[tuple[str, tuple[int, float]]]:
    """`[(regex, rank, alpha), ...]` (alpha optional: = rank) -> `wrap_layers` rules `[(regex, (rank, alpha))]`."""
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence) or not rules:
        raise LoRAError(f"{field}: expected a non-empty list of (regex, rank[, alpha]) rules, got {rules!r}")
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) not in (2, 3) or not isinstance(rule[0], str):
            raise LoRAError(f"{field}[{i}]: expected (regex, rank[, alpha]), got {rule!r}")
        rank = rule[1]
        alpha = rule[2] if len(rule) == 3 else rank
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
            raise LoRAError(f"{field}[{i}] ({rule[0]!r}): rank must be a positive integer, got {rank!r}")
        if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not alpha > 0:
            raise LoRAError(f"{field}[{i}] ({rule[0]!r}): alpha must be a positive number, got {alpha!r}")
        out.append((rule[0], (int(rank), float(alpha))))
    return out


def add_lora(model: nnx.Module, rules: Sequence[Any], *, seed: int = 0, field: str = "lora.rules"
             ) -> dict[str, LoRA]:
    """Wrap every `Dense`/`Conv` whose path a rule's regex finds with a fresh `LoRA` (B = 0: the model's outputs do
    not change), in place; returns `{path: wrapper}`. A rule selecting no layer, a bad regex, or a rank above a
    layer's `max_rank` raises LoRAError before anything changes."""
    parsed = parse_rules(rules, field=field)
    layers = layer_paths(model)
    rngs = nnx.Rngs(seed)

    def make(path: str, layer: nnx.Module, value: tuple[int, float]) -> LoRA:
        return LoRA(layer, value[0], value[1], rngs=rngs)

    try:  # the selection first: ranks are checked before any slot is filled
        chosen = {p: v for p, (_, v) in select_layers(model, parsed).items()}
    except WrapRuleError as e:
        raise LoRAError(f"{field}: {e}") from None
    too_big = [(p, v[0], max_rank(layers[p])) for p, v in chosen.items() if v[0] > max_rank(layers[p])]
    if too_big:
        p, r, m = too_big[0]
        raise LoRAError(f"{field}: rank {r} is larger than layer {p} allows (kernel {list(layers[p].kernel.shape)}: at "
                        f"most {m}){f' (and {len(too_big) - 1} more layers)' if len(too_big) > 1 else ''}; lower the "
                        "rank, or narrow the rule's regex")
    try:
        return wrap_layers(model, parsed, make)
    except WrapRuleError as e:
        raise LoRAError(f"{field}: {e}") from None


# ---------------------------------------------------------------------------------------------- reading out

def lora_weights(model: nnx.Module) -> dict[str, LayerAdapter]:
    """`{path: LayerAdapter}` (numpy, our layouts) of every LoRA-wrapped layer of `model`."""
    out = {}
    for path, w in wrapped_layers(model).items():
        if isinstance(w, LoRA):
            out[path] = LayerAdapter(np.asarray(w.adapter.lora_a[...]), np.asarray(w.adapter.lora_b[...]), w.alpha)
    return out


def check_adapter(model: nnx.Module, adapter: Adapter, *, what: str = "adapter") -> None:
    """Every layer of `adapter` exists in `model` with matching kernel shapes; LoRAError names the first misfit."""
    layers = layer_paths(model)
    missing = [p for p in adapter if p not in layers]
    if missing:
        raise LoRAError(f"{what}: layers {missing[:3]}{' ...' if len(missing) > 3 else ''} are not in this model "
                        f"({len(missing)} of {len(adapter)}): the adapter was made for another architecture or stage")
    for path, w in adapter.items():
        shape = tuple(layers[path].kernel.shape)
        want_a, want_b = (*shape[:-1], w.rank), (w.rank, shape[-1])
        if tuple(w.a.shape) != want_a or tuple(w.b.shape) != want_b:
            raise LoRAError(f"{what}: layer {path} has kernel {list(shape)}, so its adapter must be A {list(want_a)} "
                            f"and B {list(want_b)}, but it holds {list(w.a.shape)} and {list(w.b.shape)}: the adapter "
                            "was made for another architecture")


def set_lora(model: nnx.Module, adapter: Adapter, *, multiplier: float = 1.0) -> dict[str, LoRA]:
    """Wrap `adapter`'s layers of `model` (not merged: the slow path, for tests and for training on from a file)."""
    check_adapter(model, adapter)
    layers = layer_paths(model)
    made = {}
    for path, w in adapter.items():
        wrapper = LoRA(layers[path], w.rank, w.alpha, rngs=nnx.Rngs(0), multiplier=multiplier)
        wrapper.adapter.lora_a[...] = jnp.asarray(w.a, jnp.float32)
        wrapper.adapter.lora_b[...] = jnp.asarray(w.b, jnp.float32)
        made[path] = wrapper
    taken = [p for p in made if layers[p].wrapper is not None]
    if taken:
        raise LoRAError(f"layers {taken[:3]} are already wrapped; unwrap them first (models.wrapping.unwrap_layers)")
    for path, wrapper in made.items():
        layers[path].wrapper = wrapper
    return made


# ---------------------------------------------------------------------------------------------------- merging

def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """The kernel change `[*k, I, O]` of `a [*k, I, r]`, `b [r, O]` (unscaled)."""
    return jnp.einsum("...ir,ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))


def _merge(kernels: dict, adapters: list[dict], scales: jax.Array) -> dict:
    out = {}
    for path, kernel in kernels.items():
        total = kernel.astype(jnp.float32)
        for i, adapter in enumerate(adapters):
            if path in adapter:
                a, b, s = adapter[path]
                total = total + scales[i] * s * delta(a, b)
        out[path] = total.astype(kernel.dtype)
    return out


_MERGE = jax.jit(_merge)


def merge_params(model: nnx.Module, adapters: Sequence[tuple[Adapter, float]]) -> nnx.State:
    """The params of (unwrapped) `model` with `adapters` merged: `W + sum_i m_i * alpha_i / r_i * delta_i` for each
    `(adapter, m_i)`. A new state: `model` is untouched. Computed on the devices where the kernels live (their
    shardings are kept); the multipliers are traced arguments, so any scales reuse one compiled merge."""
    for i, (adapter, _) in enumerate(adapters):
        check_adapter(model, adapter, what=f"adapter {i}")
    layers = layer_paths(model)
    touched = sorted({p for adapter, _ in adapters for p in adapter})
    kernels = {p: layers[p].kernel[...] for p in touched}
    shardings = {p: getattr(k, "sharding", None) for p, k in kernels.items()}
    ab = [{p: (jnp.asarray(w.a), jnp.asarray(w.b), jnp.float32(w.scale)) for p, w in adapter.items()}
          for adapter, _ in adapters]
    scales = jnp.asarray([float(m) for _, m in adapters], jnp.float32)
    merged = _MERGE(kernels, ab, scales)
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for path, value in merged.items():
        key = (*_split(path), "kernel")
        sharding = shardings[path]
        flat[key] = flat[key].replace(jax.device_put(value, sharding) if sharding is not None else value)
    return nnx.from_flat_state(flat)


def merge_into(model: nnx.Module, adapters: Sequence[tuple[Adapter, float]]) -> nnx.Module:
    """`merge_params` written into `model` in place (its wrappers, if any, are left as they are)."""
    nnx.update(model, merge_params(model, adapters))
    return model


def _split(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def adapter_from_params(model: nnx.Module, rules: Sequence[Any], params: Mapping[str, Any], *,
                        field: str = "train.lora.rules") -> dict[str, LayerAdapter]:
    """The adapter a LoRA training run saved: `params` holds `<layer>.wrapper.adapter.lora_{a,b}` by dotted param
    path (other keys are ignored); each layer's alpha comes from the run's `rules` over (unwrapped) `model`."""
    values = {p: v for p, (_, v) in select_layers(model, parse_rules(rules, field=field),
                                                   allow_unused_rules=True).items()}
    out = {}
    for path, (_, alpha) in values.items():
        a, b = params.get(f"{path}.wrapper.adapter.lora_a"), params.get(f"{path}.wrapper.adapter.lora_b")
        if a is None or b is None:
            raise LoRAError(f"{field} select layer {path}, but the saved params have no adapter for it: the rules "
                            "and the checkpoint disagree")
        out[path] = LayerAdapter(np.asarray(a, np.float32), np.asarray(b, np.float32), alpha)
    return out
