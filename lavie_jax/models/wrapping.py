"""The seam where a layer can be wrapped: adapters (LoRA) and anything else that changes what a layer outputs.

Every `Dense` and `Conv` (lavie_jax.models.layers) has a `wrapper` slot, empty by default. `wrap_layers` fills it on
the layers whose path a rule's regex finds (`re.search`, first matching rule wins; the same style as the training
param groups), with a module made by `make(path, layer, value)`:

    wrapped = wrap_layers(unet, [(r"attn1\\.to_(q|k|v)$", 4), (r"attn_temp\\.", 8)], make_lora)

A filled slot makes the layer return `wrapper(x, y)` instead of `y`, where `x` is the layer's input and `y` its own
output, so a wrapper sees both (a LoRA adds `scale * B(A(x))` to `y`). The layer's own params keep their paths and
values; a wrapper's params live under `<layer path>.wrapper`, so a checkpoint of the unwrapped model still maps onto
the wrapped one, and `nnx.state(model, filter)` can pick the wrappers' params alone. `unwrap_layers` empties the
slots again. Paths are dotted module paths, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

from lavie_jax.models.layers import Conv, Dense

WRAPPABLE = (Dense, Conv)


class WrapRuleError(ValueError):
    """A wrapping rule is malformed or selects no layer; the message lists what the rules can select."""


def layer_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    """`{dotted path: layer}` of every wrappable layer of `model`, in tree order."""
    return {".".join(map(str, path)): module for path, module in nnx.iter_modules(model)
            if isinstance(module, WRAPPABLE)}


def _examples(paths: Sequence[str], n: int = 4) -> str:
    picks = list(paths)[:: max(1, len(paths) // n)][:n]
    return ", ".join(picks) + (", ..." if len(paths) > n else "")


def select_layers(model: nnx.Module, rules: Sequence[tuple[str, Any]], *, allow_unused_rules: bool = False
                  ) -> dict[str, tuple[nnx.Module, Any]]:
    """`{path: (layer, value)}` of the layers `rules` select (first matching rule wins), changing nothing. A bad rule,
    or a rule that selects no layer (unless `allow_unused_rules`), raises WrapRuleError."""
    layers = layer_paths(model)
    compiled = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise WrapRuleError(f"wrap rule {i}: expected a (regex, value) pair, got {rule!r}")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise WrapRuleError(f"wrap rule {i}: {rule[0]!r} is not a regular expression ({e})") from None
    chosen: dict[str, tuple[int, Any]] = {}
    for path in layers:
        for i, (pattern, value) in enumerate(compiled):
            if pattern.search(path):
                chosen[path] = (i, value)
                break
    used = {i for i, _ in chosen.values()}
    unused = [rules[i][0] for i in range(len(rules)) if i not in used]
    if unused and not allow_unused_rules:
        raise WrapRuleError(f"wrap rules {unused} select no layer (a rule that follows a broader one may never be "
                            f"reached); the {len(layers)} wrappable layers have paths like {_examples(list(layers))}")
    return {path: (layers[path], value) for path, (_, value) in chosen.items()}


def wrap_layers(model: nnx.Module, rules: Sequence[tuple[str, Any]],
                make: Callable[[str, nnx.Module, Any], nnx.Module], *, allow_unused_rules: bool = False
                ) -> dict[str, nnx.Module]:
    """Fill the wrapper slot of every layer a rule selects (module docstring), in place; returns `{path: wrapper}`.

    `rules`: ordered `(regex, value)` pairs; `make(path, layer, value)` builds the wrapper of one layer. A layer that
    is already wrapped, a bad regex, or a rule that selects no layer (unless `allow_unused_rules`) raises
    WrapRuleError before any layer changes."""
    chosen = select_layers(model, rules, allow_unused_rules=allow_unused_rules)
    taken = [p for p, (layer, _) in chosen.items() if layer.wrapper is not None]
    if taken:
        raise WrapRuleError(f"layers {taken[:3]}{' ...' if len(taken) > 3 else ''} are already wrapped; unwrap them "
                            "first (unwrap_layers)")
    made = {path: make(path, layer, value) for path, (layer, value) in chosen.items()}
    for path, wrapper in made.items():
        chosen[path][0].wrapper = wrapper
    return made


def unwrap_layers(model: nnx.Module, paths: Sequence[str] | None = None) -> list[str]:
    """Empty the wrapper slots of `paths` (default: every wrapped layer), in place; returns the paths emptied."""
    layers = layer_paths(model)
    wrapped = [p for p, layer in layers.items() if layer.wrapper is not None]
    targets = wrapped if paths is None else list(paths)
    missing = [p for p in targets if p not in wrapped]
    if missing:
        raise WrapRuleError(f"no wrapped layer at {missing[:3]}; wrapped layers: {_examples(wrapped) or 'none'}")
    for path in targets:
        layers[path].wrapper = None
    return targets


def wrapped_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """`{path: wrapper}` of every wrapped layer."""
    return {p: layer.wrapper for p, layer in layer_paths(model).items() if layer.wrapper is not None}
