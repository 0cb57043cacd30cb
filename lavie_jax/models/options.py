"""Execution options: how a model computes, never what. One road for all of them: build the model, then
`configure(model, ExecutionOptions(...))`.

| option           | what it changes                                                  | who reads it              |
|------------------|------------------------------------------------------------------|---------------------------|
| `dtype`          | compute dtype ('float32', 'bfloat16'); params stay float32      | every layer               |
| `attention_impl` | attention kernel policy ('auto', 'xla', 'cudnn', 'pallas'; None = 'xla'; `attention_kernels`) | attention layers |
| `remat`          | rematerialisation policy of the UNet's blocks (`REMAT_POLICIES`) | UNet3D                    |
| `sharding_rules` | logical-axis rules for the activation constraints at block boundaries (`lavie_jax.parallel`) | UNet3D |
| `temporal_window`| `()`: all frames; `(window, stride)`: FreeNoise (`diffusion.freenoise`) | transformer blocks |

`configure` walks the module tree and sets each option on every module that has an attribute of that name, so a
module takes an option by having the attribute (`self.dtype = jnp.float32` in its constructor), and a new option
needs no constructor argument anywhere. The options are static: a module configured differently has another
`nnx.GraphDef`, so compiled programs never mix them. A config's options come from `from_config` (sampling reads
`model.dtype`, training `train.compute_dtype` and `train.remat`; the sampler sets `temporal_window` from the stage's
sample options, `Stage.execution_options`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lavie_jax.models.attention import ATTENTION_OUTPUT

DTYPES = ("float32", "bfloat16")
_cp = jax.checkpoint_policies
# Rematerialisation policies by name: what a UNet block's backward pass keeps (None: no remat, keep everything).
REMAT_POLICIES = {
    "none": None,
    "full": _cp.nothing_saveable,  # keep only the block inputs: least memory, one extra forward
    "save_dots": _cp.dots_saveable,  # keep matmul outputs, recompute convolutions and elementwise work
    "save_attention": _cp.save_only_these_names(ATTENTION_OUTPUT),  # keep attention outputs (the costly softmax)
    "save_dots_and_attention": _cp.save_from_both_policies(_cp.dots_saveable,
                                                           _cp.save_only_these_names(ATTENTION_OUTPUT)),
}


class ExecutionOptionsError(ValueError):
    """An execution option has a bad value; `field` is the config field it came from."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclasses.dataclass(frozen=True)
class ExecutionOptions:
    """Options to apply (module docstring); a field left None is not changed."""

    dtype: str | None = None
    attention_impl: str | None = None  # a policy name; a config's None (XLA) is 'xla' here
    remat: str | None = None
    sharding_rules: tuple | None = None
    temporal_window: tuple | None = None  # () = all frames; (window, stride) = FreeNoise windows

    def __post_init__(self) -> None:
        if self.dtype is not None:
            try:
                name = jnp.dtype(self.dtype).name
            except TypeError:
                name = None
            if name not in DTYPES:
                raise ExecutionOptionsError("dtype", f"{self.dtype!r}: choose one of {DTYPES} (the compute dtype; "
                                                     "params stay float32)")
            object.__setattr__(self, "dtype", name)
        if self.attention_impl is not None:
            from lavie_jax.models.attention_kernels import AttentionImplError, normalize_policy

            try:
                normalize_policy(self.attention_impl)
            except AttentionImplError as e:
                raise ExecutionOptionsError("attention_impl", str(e)) from None
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            raise ExecutionOptionsError("remat", f"{self.remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        if self.sharding_rules is not None:
            object.__setattr__(self, "sharding_rules", normalize_rules(self.sharding_rules))
        if self.temporal_window is not None:
            w = tuple(self.temporal_window)
            if w and (len(w) != 2 or not all(isinstance(v, int) and v > 0 for v in w) or w[1] > w[0]):
                raise ExecutionOptionsError("temporal_window", f"{self.temporal_window!r}: give () (all frames) or "
                                                               "(window, stride) with 0 < stride <= window, e.g. "
                                                               "(16, 4)")
            object.__setattr__(self, "temporal_window", w)

    def check_platform(self) -> ExecutionOptions:
        """Raise ExecutionOptionsError if this process's platform cannot run the attention policy ('cudnn' off an
        NVIDIA GPU, 'pallas' off a TPU); returns the options."""
        if self.attention_impl is not None:
            from lavie_jax.models.attention_kernels import AttentionImplError, check_attention_impl

            try:
                check_attention_impl(self.attention_impl)
            except AttentionImplError as e:
                raise ExecutionOptionsError("attention_impl", str(e)) from None
        return self

    def values(self) -> dict[str, Any]:
        """The options to set: every field that was given."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if v is not None}


def normalize_rules(rules: Sequence[Sequence[Any]]) -> tuple:
    """Logical-axis rules as hashable `(name, axes)` pairs (config lists become tuples)."""
    return tuple((str(name), tuple(t) if isinstance(t, list) else t) for name, t in rules)


def from_config(config: Mapping[str, Any] | Any, *, training: bool = False) -> ExecutionOptions:
    """The execution options of a stage config: `model.dtype` (sampling) or `train.compute_dtype` and
    `train.remat` (training), `model.attention_impl`, `sharding.rules`; checked, also against this process's
    platform. ExecutionOptionsError names the config field."""
    section = "train.compute_dtype" if training else "model.dtype"
    fields = {"dtype": section, "attention_impl": "model.attention_impl", "remat": "train.remat",
              "sharding_rules": "sharding.rules"}
    model = config.get("model") or {}
    impl = model.get("attention_impl", "auto")
    values = {"dtype": config.train.compute_dtype if training else model.get("dtype", "float32"),
              "attention_impl": "xla" if impl is None else impl,
              "remat": config.train.remat if training else None,
              "sharding_rules": config.sharding.rules if "sharding" in config else None}
    try:
        return ExecutionOptions(**values).check_platform()
    except ExecutionOptionsError as e:
        raise ExecutionOptionsError(fields[e.field], e.message) from None


def configure(model: nnx.Module, options: ExecutionOptions | None = None, **values: Any) -> nnx.Module:
    """Set execution options on every module of `model` that has them (module docstring), in place; returns the
    model. `options` or keyword values (`configure(unet, remat='full')`)."""
    options = (options if options is not None else ExecutionOptions(**values)).check_platform()
    given = options.values()
    if "dtype" in given:
        given["dtype"] = jnp.dtype(given["dtype"])
    for _, module in nnx.iter_modules(model):
        for name, value in given.items():
            if name in vars(module):
                setattr(module, name, value)
    return model


def options_of(model: nnx.Module) -> ExecutionOptions:
    """The execution options `model` computes with (as its top module holds them)."""
    found: dict[str, Any] = {}
    for _, module in nnx.iter_modules(model):
        for f in dataclasses.fields(ExecutionOptions):
            if f.name in vars(module) and f.name not in found:
                value = vars(module)[f.name]
                found[f.name] = jnp.dtype(value).name if f.name == "dtype" else value
    return ExecutionOptions(**found)
