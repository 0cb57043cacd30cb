"""Optimizer pieces of lavie-train: param groups from regex rules, AdamW with per-group learning rates, EMA,
gradient accumulation, and the checks of the `train` config fields they read (`validate_train_optim_config`; the
values and their meanings are the packaged configs', configs/common.py `train_config`).

Params are any pytree whose key paths name them: an `nnx.State` split off the model (leaves `nnx.Variable`s, or raw
arrays as `parallel.place_state` returns them), a nested dict, or a flat dict keyed by dotted paths. A param's path
is its key path joined by '.', without the Variable's `value` attribute, e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q.kernel`. Everything here is a pure function of such
trees, so it runs inside one jitted step:

    groups = param_groups_from_config(model, config.train)
    graphdef, trainable, frozen, rest = groups.split(model)     # frozen params get no optimizer state and no EMA
    tx, lr_at = make_optimizer(config.train, groups)
    opt_state, ema = tx.init(trainable), init_ema(trainable)    # mu/nu mirror `trainable` (shard them alike)
    ema_decay_at = make_ema_decay(config.train)

    def loss_fn(trainable, micro):                               # micro: one micro-batch [b, ...]
        model = nnx.merge(graphdef, trainable, frozen, rest); ...; return loss, aux

    @jax.jit
    def step(trainable, opt_state, ema, batch, t):              # batch: [M, b, ...] (split_micro_batches)
        (loss, aux), grads = accumulate_gradients(jax.value_and_grad(loss_fn, has_aux=True), trainable, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, ema_update(ema, trainable, ema_decay_at(t)), loss, aux
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

FROZEN = "frozen"  # the group of params that do not train; the first rule that re.search-es a path decides its group


class OptimConfigError(ValueError):
    """A `train.*` config value is bad; the message names the field."""


# ----------------------------------------------------------------------------------------------------- paths


def path_str(keypath: Sequence[Any]) -> str:
    """Dotted name of a jax key path (or an nnx path tuple); a Variable's trailing `.value` is dropped."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return ".".join(parts)


def _as_params(params: Any) -> Any:
    return nnx.state(params, nnx.Param) if isinstance(params, nnx.Module) else params


def param_paths(params: Any) -> dict[str, int]:
    """`{path: number of scalars}` of every array leaf of `params` (a module, State or dict), in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(_as_params(params))[0]
    return {path_str(kp): int(math.prod(jnp.shape(v))) for kp, v in leaves}


def _examples(paths: Sequence[str], n: int = 5) -> str:
    picks = list(paths)[:: max(1, len(paths) // n)][:n]
    return ", ".join(picks) + (", ..." if len(paths) > n else "")


# ----------------------------------------------------------------------------------------------------- groups


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Which group every param belongs to (`FROZEN` or a trained group) and each trained group's lr multiplier."""

    assignment: Mapping[str, str]  # path -> group, in tree order
    multipliers: Mapping[str, float]  # trained group -> lr multiplier
    sizes: Mapping[str, int]  # path -> number of scalars

    def group_of(self, path: str) -> str:
        if path not in self.assignment:
            raise KeyError(f"param {path!r} is not one of the {len(self.assignment)} params these groups were built "
                           f"from (e.g. {_examples(list(self.assignment), 3)}); rebuild the groups for this model")
        return self.assignment[path]

    def is_trainable(self, path: str) -> bool:
        return self.group_of(path) != FROZEN

    def multiplier(self, path: str) -> float:
        group = self.group_of(path)
        if group == FROZEN:
            raise ValueError(f"param {path!r} is frozen but reached the optimizer; split the model with "
                             "ParamGroups.split and optimise only the trainable part")
        return self.multipliers[group]

    @property
    def trainable_paths(self) -> list[str]:
        return [p for p, g in self.assignment.items() if g != FROZEN]

    def trainable_filter(self, path: Sequence[Any], value: Any) -> bool:
        """nnx filter `(path, value) -> bool` selecting the trained params (use with nnx.split / nnx.state)."""
        return isinstance(value, nnx.Param) and self.assignment.get(path_str(path)) not in (None, FROZEN)

    def split(self, model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
        """`(graphdef, trainable, frozen, rest)`; `nnx.merge(graphdef, trainable, frozen, rest)` rebuilds the model."""
        return nnx.split(model, self.trainable_filter, nnx.Param, ...)

    def partition(self, params: Any) -> tuple[Any, Any]:
        """`(trainable, frozen)` of an nnx.State or (nested/flat) dict of params, same container type."""
        def keep(path: Sequence[Any]) -> bool:
            return self.is_trainable(path_str(path))

        if isinstance(params, nnx.State):
            return nnx.split_state(params, lambda path, _: keep(path), ...)
        if isinstance(params, Mapping):
            return _filter_dict(params, keep, ()), _filter_dict(params, lambda p: not keep(p), ())
        raise TypeError(f"partition takes an nnx.State or a dict of params, got {type(params).__name__}")

    def summary(self) -> str:
        """One line per group: tensors, scalars, lr multiplier (for the start of a training log)."""
        rows: dict[str, list[int]] = {}
        for path, group in self.assignment.items():
            r = rows.setdefault(group, [0, 0])
            r[0] += 1
            r[1] += self.sizes[path]
        return "\n".join(f"{g:>12}: {n:5d} tensors {s / 1e6:10.2f}M params"
                         + ("" if g == FROZEN else f"  lr x{self.multipliers[g]:g}") for g, (n, s) in rows.items())


def _filter_dict(tree: Mapping, keep: Callable, prefix: tuple) -> dict:
    out = {}
    for k, v in tree.items():
        path = (*prefix, jax.tree_util.DictKey(k))
        if isinstance(v, Mapping):
            sub = _filter_dict(v, keep, path)
            if sub:
                out[k] = sub
        elif keep(path):
            out[k] = v
    return out


def param_groups(params: Any, rules: Sequence[Sequence[str]], lr_multipliers: Mapping[str, float] | None = None, *,
                 allow_unused_rules: bool = False, field: str = "train.param_groups") -> ParamGroups:
    """Assign every param of `params` (module, State or dict) to a group by `rules`, an ordered `(regex, group)` list.

    The first rule whose regex `re.search`-es the dotted path wins. Errors (naming `field`): a bad rule, a param no
    rule matches (add a catch-all such as `('.*', 'frozen')`), a rule that selects no param (a typo, or shadowed by
    earlier rules; `allow_unused_rules` permits it for rules shared across stages), a multiplier for a group no rule
    names. Groups without a multiplier get 1.0.
    """
    sizes = param_paths(params)
    if not sizes:
        raise ValueError("param_groups: the model has no params")
    compiled = []
    if isinstance(rules, (str, bytes)) or not rules:
        raise OptimConfigError(f"{field}.rules must be a non-empty list of (regex, group) pairs, got {rules!r}")
    for i, rule in enumerate(rules):
        if isinstance(rule, (str, bytes)) or len(rule) != 2 or not all(isinstance(s, str) for s in rule):
            raise OptimConfigError(f"{field}.rules[{i}] must be a (regex, group) pair of strings, got {rule!r}")
        pattern, group = rule
        if not group:
            raise OptimConfigError(f"{field}.rules[{i}] ({pattern!r}) has an empty group name")
        try:
            compiled.append((re.compile(pattern), pattern, group))
        except re.error as e:
            raise OptimConfigError(f"{field}.rules[{i}]: bad regex {pattern!r}: {e}") from None
    assignment, chosen, searched = {}, [0] * len(compiled), [0] * len(compiled)
    unmatched = []
    for path in sizes:
        first = None
        for i, (rx, _, group) in enumerate(compiled):
            if rx.search(path):
                searched[i] += 1
                if first is None:
                    first = i
        if first is None:
            unmatched.append(path)
        else:
            chosen[first] += 1
            assignment[path] = compiled[first][2]
    if unmatched:
        raise OptimConfigError(f"{field}.rules: {len(unmatched)} params match no rule, e.g. {_examples(unmatched)}; "
                               "add a catch-all rule such as ('.*', 'frozen') or ('.*', 'unet')")
    if not allow_unused_rules:
        for i, (_, pattern, group) in enumerate(compiled):
            if chosen[i]:
                continue
            why = ("matches no param" if not searched[i] else
                   f"matches {searched[i]} params but earlier rules take all of them (first match wins)")
            raise OptimConfigError(f"{field}.rules[{i}] ({pattern!r} -> {group!r}) {why}; param paths look like "
                                   f"{_examples(list(sizes))}")
    trained = {g for g in assignment.values() if g != FROZEN}
    if not trained:
        raise OptimConfigError(f"{field}.rules freeze every param; nothing would train")
    mults = dict(lr_multipliers or {})
    for group, m in mults.items():
        if group == FROZEN or group not in {r[2] for r in compiled}:
            raise OptimConfigError(f"{field}.lr_multipliers[{group!r}]: no rule assigns params to a trained group of "
                                   f"that name (groups: {sorted(trained)})")
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not math.isfinite(m) or m <= 0:
            raise OptimConfigError(f"{field}.lr_multipliers[{group!r}] must be a number > 0, got {m!r} "
                                   "(freeze a group with the group name 'frozen' instead)")
    return ParamGroups(assignment=assignment, multipliers={g: float(mults.get(g, 1.0)) for g in sorted(trained)},
                       sizes=sizes)


def param_groups_from_config(params: Any, train: Any, *, prefix: str = "train") -> ParamGroups:
    """`param_groups` with `train.param_groups.{rules, lr_multipliers, allow_unused_rules}`."""
    validate_train_optim_config(train, prefix=prefix)
    pg = train.param_groups
    return param_groups(params, tuple(tuple(r) for r in pg.rules), dict(pg.lr_multipliers),
                        allow_unused_rules=bool(pg.get("allow_unused_rules", False)), field=f"{prefix}.param_groups")


# ----------------------------------------------------------------------------------------------------- config


def _num(section: Any, name: str, prefix: str, *, kind: type = float) -> Any:
    if name not in section:
        raise OptimConfigError(f"{prefix}.{name} is missing")
    v = section[name]
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or (kind is float and not math.isfinite(v)):
        raise OptimConfigError(f"{prefix}.{name} must be {'an int' if kind is int else 'a number'}, got {v!r}")
    return v


def _check(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise OptimConfigError(f"{field} must be {rule}, got {value!r}")


def validate_train_optim_config(train: Any, *, prefix: str = "train") -> None:
    """Check the optimizer, param_groups, ema and micro_batches fields of a `train` section; errors name the field
    (`train.optimizer.lr`). The fields, their defaults and meanings: the packaged configs (configs/common.py,
    `train_config`)."""
    for section in ("optimizer", "param_groups", "ema"):
        if section not in train:
            raise OptimConfigError(f"{prefix}.{section} is missing (start from a packaged stage config, e.g. "
                                   "`load_config('base')`: configs/common.py `train_config` lists the fields)")
    o, p = train.optimizer, f"{prefix}.optimizer"
    _check(_num(o, "lr", p) > 0, f"{p}.lr", "> 0", o.lr)
    _check(_num(o, "warmup_steps", p, kind=int) >= 0, f"{p}.warmup_steps", ">= 0", o.warmup_steps)
    _check(o.get("schedule") in ("constant", "cosine"), f"{p}.schedule", "'constant' or 'cosine'", o.get("schedule"))
    if o.schedule == "cosine":
        _check(_num(o, "decay_steps", p, kind=int) > 0, f"{p}.decay_steps", "> 0 with the cosine schedule",
               o.decay_steps)
        _check(0 <= _num(o, "final_lr_ratio", p) <= 1, f"{p}.final_lr_ratio", "in [0, 1]", o.final_lr_ratio)
    for name in ("b1", "b2"):
        _check(0 <= _num(o, name, p) < 1, f"{p}.{name}", "in [0, 1)", o[name])
    _check(_num(o, "eps", p) > 0, f"{p}.eps", "> 0", o.eps)
    _check(_num(o, "weight_decay", p) >= 0, f"{p}.weight_decay", ">= 0", o.weight_decay)
    _check(_num(o, "clip_grad_norm", p) >= 0, f"{p}.clip_grad_norm", ">= 0 (0 = off)", o.clip_grad_norm)
    exclude = o.get("weight_decay_exclude")
    _check(exclude is None or isinstance(exclude, str), f"{p}.weight_decay_exclude", "a regex string or None",
           exclude)
    try:
        re.compile(exclude or "")
    except re.error as e:
        raise OptimConfigError(f"{p}.weight_decay_exclude: bad regex {exclude!r}: {e}") from None
    e, pe = train.ema, f"{prefix}.ema"
    _check(0 <= _num(e, "decay", pe) < 1, f"{pe}.decay", "in [0, 1) (0 = no EMA)", e.decay)
    _check(isinstance(e.get("warmup"), bool), f"{pe}.warmup", "true or false", e.get("warmup"))
    _check(_num(train, "micro_batches", prefix, kind=int) >= 1, f"{prefix}.micro_batches", ">= 1",
           train.micro_batches)
    pg = train.param_groups
    _check("rules" in pg, f"{prefix}.param_groups.rules", "set", None)
    mults = pg.get("lr_multipliers", {})
    _check(isinstance(mults, (Mapping, ml_collections.ConfigDict)), f"{prefix}.param_groups.lr_multipliers",
           "a dict group -> multiplier", mults)


# ----------------------------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(train: Any, *, prefix: str = "train") -> Callable[[Any], jax.Array]:
    """`lr_at(t)`: the base lr (multiplier 1) of update t (0-based, = updates already applied), float32.

    Linear warm-up `min(1, (t + 1) / warmup_steps)` (the first update is not wasted at lr 0), then constant, or a
    cosine from lr to `final_lr_ratio * lr` over `decay_steps`, constant afterwards.
    """
    validate_train_optim_config(train, prefix=prefix)
    o = train.optimizer
    lr, warm = float(o.lr), int(o.warmup_steps)
    cosine = o.schedule == "cosine"
    decay_steps, final = (int(o.decay_steps), float(o.final_lr_ratio)) if cosine else (1, 1.0)

    def lr_at(step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        factor = jnp.minimum(1.0, (t + 1.0) / warm) if warm > 0 else jnp.ones_like(t)
        if cosine:
            progress = jnp.clip((t - warm) / decay_steps, 0.0, 1.0)
            factor = factor * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return lr * factor

    return lr_at


def _decay_and_scale_by_group(groups: ParamGroups, weight_decay: float, exclude: str | None
                              ) -> optax.GradientTransformation:
    """Per param: `u + weight_decay * p` (unless its path matches `exclude`), times its group's lr multiplier.

    Stateless; multipliers and decay flags are looked up by path while tracing, so they cost nothing at run time.
    """
    exclude_rx = re.compile(exclude) if exclude else None

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError("AdamW weight decay needs the params: call tx.update(grads, opt_state, params)")

        def one(keypath, u, p):
            path = path_str(keypath)
            m = groups.multiplier(path)
            if weight_decay and not (exclude_rx and exclude_rx.search(path)):
                u = u + weight_decay * p.astype(u.dtype)
            return u * m if m != 1.0 else u

        ref = params if params is not None else updates
        return jax.tree_util.tree_map_with_path(one, updates, ref), state

    return optax.GradientTransformation(init, update)


def make_optimizer(train: Any, groups: ParamGroups, *, prefix: str = "train"
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """`(tx, lr_at)`: AdamW over the trained params with per-group learning rates, and the base lr of update t.

    `tx = clip_by_global_norm -> scale_by_adam (float32 mu/nu, same tree as the params) -> + weight_decay * p ->
    x group multiplier -> x -lr_at(t)`: group g's update is torch AdamW's with lr = lr_at(t) * multiplier[g]. Apply
    it to the trainable part only (`groups.split`): a frozen or unknown param is an error while tracing.
    """
    validate_train_optim_config(train, prefix=prefix)
    o = train.optimizer
    lr_at = learning_rate_schedule(train, prefix=prefix)
    parts = []
    if o.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(float(o.clip_grad_norm)))
    parts += [optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), mu_dtype=jnp.float32),
              _decay_and_scale_by_group(groups, float(o.weight_decay), o.get("weight_decay_exclude")),
              optax.scale_by_learning_rate(lr_at)]
    return optax.chain(*parts), lr_at


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any,
                        replicated: jax.sharding.Sharding) -> Any:
    """Shardings for `tx.init(params)`: each params-shaped leaf (mu, nu) takes its param's sharding, every other
    leaf (step counts) `replicated`. `param_shardings` has the tree of `params` with Shardings as leaves
    (e.g. `jax.tree.map(lambda x: x.sharding, params)`); `params` may be abstract."""
    state = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, s: s, state, param_shardings,
                                 transform_non_params=lambda _: replicated)


# ----------------------------------------------------------------------------------------------------- EMA


def init_ema(params: Any) -> Any:
    """A float32 copy of the trained params (copied, so donating params never frees the EMA)."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


def ema_decay(step: Any, decay: float, warmup: bool = False) -> jax.Array:
    """The EMA decay after update `step` (0-based): `decay`, or `min(decay, (1 + t) / (10 + t))` with warm-up."""
    d = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return d
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(d, (1.0 + t) / (10.0 + t))


def make_ema_decay(train: Any, *, prefix: str = "train") -> Callable[[Any], jax.Array] | None:
    """`decay_at(t)` from `train.ema`, or None when `train.ema.decay == 0` (no EMA kept)."""
    validate_train_optim_config(train, prefix=prefix)
    decay, warmup = float(train.ema.decay), bool(train.ema.warmup)
    if decay == 0:
        return None
    return lambda step: ema_decay(step, decay, warmup)


def ema_update(ema: Any, params: Any, decay: Any) -> Any:
    """`decay * ema + (1 - decay) * params` per leaf, in float32 (`decay` a scalar, python or traced)."""
    d = jnp.asarray(decay, jnp.float32)
    return jax.tree.map(lambda e, p: d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32), ema, params)


# ----------------------------------------------------------------------------------------------------- accumulation


def split_micro_batches(batch: Any, micro_batches: int) -> Any:
    """`[B, ...] -> [M, B/M, ...]` for every leaf, strided: micro-batch m holds examples m, M + m, 2M + m, ...

    Strided, not contiguous, so that each device's contiguous shard of a batch sharded on axis 0 feeds every
    micro-batch from its own examples (no data moves between devices).
    """
    def one(x):
        if x.shape[0] % micro_batches:
            raise ValueError(f"split_micro_batches: batch size {x.shape[0]} is not divisible by "
                             f"micro_batches={micro_batches} (leaf shape {tuple(x.shape)})")
        return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def accumulate_gradients(loss_and_grad_fn: Callable[..., Any], params: Any, batch: Any, *,
                         rng: jax.Array | None = None) -> tuple[tuple[jax.Array, Any], Any]:
    """Average `((loss, aux), grads)` over the micro-batches of `batch` (leaves `[M, b, ...]`), one at a time.

    `loss_and_grad_fn(params, micro_batch)` (or `(params, micro_batch, key)` when `rng` is given; micro-batch m gets
    `jax.random.fold_in(rng, m)`) returns `((loss, aux), grads)`, e.g. `jax.value_and_grad(f, has_aux=True)`.
    A `jax.lax.scan` sums loss, aux and grads in float32 and divides by M: for a loss that is a mean over equally
    sized micro-batches this equals the loss and grads of the whole batch. Returns float32 loss, aux and grads.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("accumulate_gradients: empty batch")
    m = leaves[0].shape[0]
    if any(x.shape[0] != m for x in leaves):
        raise ValueError("accumulate_gradients: every batch leaf needs the same leading micro-batch axis, got "
                         f"{sorted({x.shape[0] for x in leaves})}")

    def call(micro, i):
        out = (loss_and_grad_fn(params, micro) if rng is None
               else loss_and_grad_fn(params, micro, jax.random.fold_in(rng, i)))
        return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32), out)

    if m == 1:
        return call(jax.tree.map(lambda x: x[0], batch), 0)

    def body(total, xs):
        micro, i = xs
        return jax.tree.map(jnp.add, total, call(micro, i)), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                         jax.eval_shape(lambda: call(jax.tree.map(lambda x: x[0], batch), 0)))
    total, _ = jax.lax.scan(body, zeros, (batch, jnp.arange(m)))
    return jax.tree.map(lambda x: x / m, total)
