"""A model handle whose call is already compiled: the fast way to call a lavie-jax model from a program.

    from lavie_jax.io.store import load_unet
    from lavie_jax.models.compiled import compiled

    unet = load_unet(DIR)
    fast = compiled(unet)                        # split once; jax.jit(merge + __call__), the graph static
    eps = fast(x, t, text)                       # x [B, F, H, W, 4], t [B], text [B, 77, 768] -> [B, F, H, W, 4]
    eps = fast(x, t, text, num_image_frames=2)   # keyword-only arguments are static: one compile per value
    decode = compiled(vae, "decode")             # another method: z [B, F, h, w, 4] -> pixels [B, F, 8h, 8w, 3]

Why: `nnx.jit(lambda m, *a: m(*a))(model, ...)` pays twice on every call. It walks the module's object graph (split
into a graph definition and state on the way in, merge and update on the way out: 0.1-0.26 s of host time per call
for the full base UNet on a 2-core CPU), and its compiled program returns the module's whole state, so each call
copies every param into new buffers (3.64 GB for the base UNet; peak memory 3.6 GB higher): 2-4 CPU-seconds together.
Measured with `bench/library_bench.py` on a shared 2-core CPU: a 1 x 8 x 32 x 32 forward took 1.06-1.29x the
handle's time (medians of interleaved calls, three runs) and 10-25% more CPU time; on an accelerator, where the
forward takes far less, the host walk weighs much more (not measured here). `CompiledModel` splits the module once
(`nnx.split`) and jits `nnx.merge(graphdef, state).<method>(...)` with the graph definition closed over (static) and
only the method's outputs returned: a call flattens the state's leaves and dispatches the program (10-18 ms host
time for the base UNet). The results are bitwise those of `nnx.jit` (the same computation).

Keeping up with the model. The handle's state holds the model's own `nnx.Variable` objects (`nnx.split` shares
them), and `jax.jit` reads their current values at every call. So in-place changes of values are seen by the next
call at no cost: `nnx.update(model, new_state)`, `variable.value = ...`, an optimizer step on the model. Changes of
the graph are not: replacing a Variable or a submodule by a new object, adding or removing one, changing a static
attribute. After those, call `handle.update()`: it splits again (about 26 ms for the full base UNet, 814 params)
and recompiles only if the graph changed. Reading `nnx.state(model)` at every call instead would cost the same
26 ms per call: ~0.3% of a CPU forward, but a large share of an accelerator's, hence the explicit `update()`.

Pure calls only: the compiled function returns the method's outputs, not the module's state, so a method that
changes the module (RNG counts, batch statistics, caches) would lose those changes. The handle checks this when it
traces and raises `CompiledModelError` (use `nnx.jit` for such methods).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import jax
from flax import nnx


class CompiledModelError(ValueError):
    """A CompiledModel was built or called in a way it cannot serve (message says which and what to do)."""


class CompiledModel:
    """`model.<method>(*args, **kwargs)` compiled once per input shape and static value (module docstring).

    `static_argnames` (default: the method's keyword-only parameters, which in lavie-jax are Python values that
    shape the program: `num_image_frames` of `UNet3D.__call__`, `frame_chunk` of `AutoencoderKL.decode`) are
    passed to `jax.jit` as static: they must be hashable, passed by keyword, and each new value compiles anew.
    Every other argument is traced (arrays, or pytrees of them; None stays None).
    """

    def __init__(self, model: nnx.Module, method: str = "__call__", *,
                 static_argnames: Iterable[str] | None = None):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"compiled(model): expected a flax.nnx.Module, got {type(model).__name__}")
        if not isinstance(method, str):
            raise TypeError(f"compiled(model, method): method is the name of a method (e.g. 'decode'), got "
                            f"{type(method).__name__}")
        bound = getattr(model, method, None)
        if not callable(bound):
            public = sorted(n for n in dir(type(model)) if not n.startswith("_")
                            and inspect.isfunction(getattr(type(model), n, None)))
            raise CompiledModelError(f"{type(model).__name__} has no method {method!r}; its methods: "
                                     f"{', '.join(['__call__', *public])}")
        params = inspect.signature(bound).parameters
        if static_argnames is None:
            static_argnames = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        elif isinstance(static_argnames, str):
            static_argnames = [static_argnames]
        self.static_argnames = tuple(static_argnames)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = [n for n in self.static_argnames if n not in params and not takes_any]
        if unknown:
            raise CompiledModelError(f"static_argnames {unknown} are not parameters of "
                                     f"{type(model).__name__}.{method}{inspect.signature(bound)}")
        # a static parameter that can also be passed positionally: the position it would take in *args
        positional = [n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                                 inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        self._static_positions = {n: positional.index(n) for n in self.static_argnames if n in positional}
        self.model = model
        self.method = method
        self._graphdef, self._state = nnx.split(model)
        self._jitted = self._build()

    def _build(self) -> Any:
        graphdef, method, name = self._graphdef, self.method, self._name()

        def run(state, *args, **kwargs):
            before = jax.tree.leaves(state)  # merge shares these Variables with the module: read them first
            module = nnx.merge(graphdef, state)
            out = getattr(module, method)(*args, **kwargs)
            if not _same_leaves(jax.tree.leaves(nnx.state(module)), before):  # once per trace, not per call
                raise CompiledModelError(f"{name} changed the module's state (e.g. RNG counts, batch statistics) "
                                         "while it ran; a CompiledModel only serves pure calls: use nnx.jit")
            return out

        return jax.jit(run, static_argnames=self.static_argnames)

    def _name(self) -> str:
        return f"{type(self.model).__name__}.{self.method}"

    def _check_args(self, args: tuple, kwargs: dict) -> None:
        for name, index in self._static_positions.items():
            if len(args) > index:
                raise CompiledModelError(f"{self._name()}: pass {name!r} by keyword ({name}=...): it is static")
        for where, value in [*enumerate(args), *kwargs.items()]:
            if isinstance(value, (nnx.Module, nnx.Variable)):
                raise TypeError(f"{self._name()}: argument {where!r} is a {type(value).__name__}; the handle already "
                                "holds its model: call it with the method's own arguments (arrays), e.g. fast(x, t, "
                                "text), not fast(model, x, ...)")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`model.<method>(*args, **kwargs)` through the compiled program (shapes as the method documents, e.g.
        `[B, F, H, W, C]` latents for a UNet)."""
        self._check_args(args, kwargs)
        return self._jitted(self._state, *args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> jax.stages.Lowered:
        """`jax.jit(...).lower` for these arguments: ahead-of-time compilation (`.compile()`), cost and memory
        analysis. The compiled program takes the handle's state first: `lowered.compile()(handle.state, *args)`."""
        self._check_args(args, kwargs)
        return self._jitted.lower(self._state, *args, **kwargs)

    @property
    def state(self) -> nnx.State:
        """The model's state as the handle passes it (the model's own Variables)."""
        return self._state

    def update(self) -> CompiledModel:
        """Split the model again after a change of its graph (a Variable or submodule replaced, added or removed, a
        static attribute changed); recompiles at the next call only if the graph changed. Returns the handle."""
        graphdef, self._state = nnx.split(self.model)
        if graphdef != self._graphdef:
            self._graphdef = graphdef
            self._jitted = self._build()
        return self

    def __repr__(self) -> str:
        return f"CompiledModel({self._name()}, static_argnames={self.static_argnames})"


def _same_leaves(a: list, b: list) -> bool:
    """Whether two leaf lists hold the very same objects (tracers while tracing: a changed Variable holds a new
    one; `==` would compare the arrays)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def compiled(model: nnx.Module, method: str = "__call__", *,
             static_argnames: Iterable[str] | None = None) -> CompiledModel:
    """A handle that calls `model.<method>` compiled, without NNX's per-call graph traversal (module docstring):
    `fast = compiled(unet); eps = fast(x [B, F, H, W, 4], t [B], text [B, 77, D])`."""
    return CompiledModel(model, method, static_argnames=static_argnames)
