"""Random initialisation that is cheap to compile: the RNG draws of a module's construction batched.

A jitted `lambda: nnx.state(UNet3D(arch, rngs=nnx.Rngs(seed)), nnx.Param)` draws each param from its own key: one
`fold_in` and one `random_bits` per param, and each is a threefry hash that XLA inlines as hundreds of ops. The tiny
base UNet's init is 166 of each; XLA:CPU took 6x longer to compile it than the same values drawn below, longer than
the train step itself. `batch_random_draws(fn)` computes what `fn` computes as one program in which
draws of the same kind and shape are one vmapped call: it traces `fn` to a jaxpr, inlines its nested calls, and
evaluates it in waves, holding back every RNG primitive until nothing else can run, then binding each group of
held-back draws (same primitive, parameters and input types) once under `jax.vmap`. Keys depend only on keys, so
the waves are few (for NNX: the fold-ins of a stream's key, then the bits). The draws are the same bits (vmap of a
threefry hash is the hash of each key), and the arithmetic on them the same ops: tested bit-identical to the plain
jitted init (an eager construction differs from either by a float32 ulp in normal draws, XLA's erf_inv unfused).

A group's stacked draws are capped in bytes (`MAX_GROUP_BYTES`), so a full-size model's init holds no more at once
than a few of its params' bits; everything else (the arithmetic that turns bits into a uniform or a normal) is bound
as traced, in order.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from lavie_jax.runtime import program_cache, xla_cpu

RNG_PRIMITIVES = frozenset({"random_bits", "random_fold_in", "random_split"})
MAX_GROUP_BYTES = 64 * 2 ** 20  # of one group's stacked outputs
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}  # inlined (no gradient is taken)

Ref = tuple[str, Any]  # ("const", value) or ("var", id)


def batch_random_draws(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with its RNG draws batched (module docstring): the same draws and arithmetic (tested bit-identical), far
    fewer threefry hashes for XLA to compile. Call it inside `jax.jit` (it binds primitives; eagerly it would run
    them one by one)."""

    @functools.wraps(fn)
    def batched(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _evaluate(closed, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return batched


MAX_KEPT = 8  # compiled initialisers kept in memory (`compiled_initialiser`'s `key`): each holds code, no params
_kept: collections.OrderedDict[Any, Any] = collections.OrderedDict()


def compiled_initialiser(fn: Callable[..., Any], *args: Any, out_shardings: Any = None, key: Any = None) -> Any:
    """`fn` jitted with its draws batched, as a program that runs once (`xla_cpu.run_once_options`: the least
    optimised code is the fastest to build), for arguments like `args` (abstract values); `out_shardings` lays its
    outputs out (a full-size model's init is never copied to the host). Returns the callable; it compiles at its
    first call.

    `key` (hashable, with a stable repr): what `fn` computes, e.g. its architecture. With it the program is kept in
    memory (the last `MAX_KEPT`), so building the same model again in this process (a second run, a rebuilt model)
    skips the trace, the batching and the lowering (~3 s for the tiny base UNet on 2 CPU cores), and in the program
    cache when that is on (lavie_jax.runtime.program_cache), so the next process loads it whole (a fresh work
    directory's `lavie-train` with a warm cache). Leave it None when `fn` captures anything the key does not say
    (a seed: pass it as an argument instead)."""
    memo = None
    if key is not None:
        shardings = jax.tree.flatten(out_shardings)
        avals = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args))
        memo = (key, jax.default_backend(), avals, shardings[1], tuple(shardings[0]))
        if memo in _kept:
            _kept.move_to_end(memo)
            return _kept[memo]
    # on disk, the program cache keys the arguments and the output shardings itself; `key` says what fn computes
    text = None if key is None else repr(key)
    batched = batch_random_draws(fn)

    def random_initialiser(*a: Any) -> Any:  # (its name names the program cache's entries)
        return batched(*a)

    program = program_cache.Program(random_initialiser, out_shardings=out_shardings,
                                    key=None if text is None or " at 0x" in text else text,
                                    compiler_options=xla_cpu.run_once_options(jax.default_backend()))
    if memo is not None:
        _kept[memo] = program
        while len(_kept) > MAX_KEPT:
            _kept.popitem(last=False)
    return program


class _Eqn(tuple):
    """(primitive, params, input refs, output refs) of a flattened jaxpr."""


def _flatten(jaxpr: Jaxpr, consts: list[Any], inputs: list[Ref], eqns: list[_Eqn], ids: list[int]) -> list[Ref]:
    """Append `jaxpr`'s equations to `eqns` with nested calls inlined; returns the refs of its outputs."""
    env: dict[Any, Ref] = {}
    env.update(zip(jaxpr.constvars, (("const", c) for c in consts)))
    env.update(zip(jaxpr.invars, inputs))

    def read(atom: Any) -> Ref:
        return ("const", atom.val) if isinstance(atom, Literal) else env[atom]

    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        sub = eqn.params.get(_CALLS.get(eqn.primitive.name, ""))
        if isinstance(sub, ClosedJaxpr):
            outs = _flatten(sub.jaxpr, list(sub.consts), ins, eqns, ids)
        else:
            outs = []
            for _ in eqn.outvars:
                ids[0] += 1
                outs.append(("var", ids[0]))
            eqns.append(_Eqn((eqn.primitive, eqn.params, ins, outs)))
        env.update(zip(eqn.outvars, outs))
    return [read(a) for a in jaxpr.outvars]


def _evaluate(closed: ClosedJaxpr, args: list[Any]) -> list[Any]:
    eqns: list[_Eqn] = []
    ids = [0]
    inputs: list[Ref] = []
    for arg in args:
        ids[0] += 1
        inputs.append(("var", ids[0]))
    outputs = _flatten(closed.jaxpr, list(closed.consts), inputs, eqns, ids)
    values: dict[int, Any] = {ref[1]: arg for ref, arg in zip(inputs, args)}

    def get(ref: Ref) -> Any:
        return ref[1] if ref[0] == "const" else values[ref[1]]

    def ready(ref: Ref) -> bool:
        return ref[0] == "const" or ref[1] in values

    def bind(prim: Any, params: dict, ins: list[Any]) -> list[Any]:
        out = prim.bind(*ins, **params)
        return list(out) if prim.multiple_results else [out]

    pending = eqns
    while pending:
        waiting, held, ran = [], [], False
        for eqn in pending:  # in order (a flattened jaxpr is topologically sorted): a chain runs in one pass
            prim, params, ins, outs = eqn
            if not all(map(ready, ins)):
                waiting.append(eqn)
            elif prim.name in RNG_PRIMITIVES:
                held.append(eqn)
                waiting.append(eqn)
            else:
                values.update((r[1], v) for r, v in zip(outs, bind(prim, params, [get(r) for r in ins])))
                ran = True
        if not ran:  # only draws can run: bind them, a group at a time
            if not held:
                raise AssertionError("batch_random_draws: equations whose inputs never become available")
            for group in _groups(held, get):
                prim, params = group[0][0], group[0][1]
                if len(group) == 1:
                    results = [bind(prim, params, [get(r) for r in group[0][2]])]
                else:
                    stacked = [jnp.stack([get(eqn[2][i]) for eqn in group]) for i in range(len(group[0][2]))]
                    batched = jax.vmap(lambda *xs: tuple(bind(prim, params, list(xs))))(*stacked)
                    results = [[out[j] for out in batched] for j in range(len(group))]
                for eqn, result in zip(group, results):
                    values.update((r[1], v) for r, v in zip(eqn[3], result))
            done = {id(eqn) for eqn in held}
            waiting = [eqn for eqn in waiting if id(eqn) not in done]
        pending = waiting
    return [get(r) for r in outputs]


def _groups(held: list[_Eqn], get: Callable[[Ref], Any]) -> list[list[_Eqn]]:
    """Held-back draws by (primitive, params, input types), each group cut to MAX_GROUP_BYTES of outputs."""
    by_kind: dict[Any, list[_Eqn]] = collections.defaultdict(list)
    for eqn in held:
        prim, params, ins, _ = eqn
        types = tuple(str(jax.typeof(get(r))) for r in ins)
        by_kind[(prim, tuple(sorted((k, repr(v)) for k, v in params.items())), types)].append(eqn)
    groups = []
    for eqns in by_kind.values():
        prim, params, ins, _ = eqns[0]
        out_bytes = sum(_bytes(a) for a in _out_avals(prim, params, ins, get))
        size = max(1, MAX_GROUP_BYTES // max(out_bytes, 1))
        groups += [eqns[i:i + size] for i in range(0, len(eqns), size)]
    return groups


def _out_avals(prim: Any, params: dict, ins: list[Ref], get: Callable[[Ref], Any]) -> list[Any]:
    out, _ = prim.abstract_eval(*[jax.typeof(get(r)) for r in ins], **params)
    return list(out) if prim.multiple_results else [out]


def _bytes(aval: Any) -> int:
    key = jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key)
    return int(np.prod(aval.shape)) * (8 if key else aval.dtype.itemsize)  # (a threefry key is 2 x uint32)
