"""lavie_jax.train.optim: regex param groups, AdamW with per-group lrs against a hand-written torch-style AdamW,
schedules, EMA formula, gradient accumulation == one big batch, config errors that name the field."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lavie_jax import parallel
from lavie_jax.models import abstract_unet
from lavie_jax.train import optim
from tests.conftest import stage_config
from tests.models.tiny_configs import X4_LIKE

TEMPORAL_RX = re.compile("temporal|attn_temp|norm_temp")


def _default_train():
    """The `train` section the stage configs start from (the official base config's: no stage changes it)."""
    return stage_config("base").train


def _temporal_only_rules():
    """The VSR config's param-group rules: only the inserted temporal layers train."""
    return stage_config("vsr").train.param_groups.rules


def _train_config(**opt):
    c = _default_train()
    c.optimizer.update(opt)
    return c


@pytest.fixture(scope="module")
def abstract_vsr():
    return abstract_unet(dict(X4_LIKE, stage="vsr"))


@pytest.fixture(scope="module")
def vsr_model(abstract_vsr):
    """A concrete tiny VSR UNet with random values (filled from the abstract one: no slow op-by-op init)."""
    graphdef, state = nnx.split(abstract_vsr)
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), state)
    return nnx.merge(graphdef, values)


# ----------------------------------------------------------------------------------------------------- groups


def test_temporal_only_is_one_rule_and_splits_the_model(vsr_model):
    groups = optim.param_groups(vsr_model, _temporal_only_rules())
    paths = optim.param_paths(vsr_model)
    assert set(groups.assignment) == set(paths)
    for path, group in groups.assignment.items():
        assert group == ("temporal" if TEMPORAL_RX.search(path) else "frozen"), path
    assert any("down_temporal_blocks" in p for p in groups.trainable_paths)
    assert any("resblock_temporal" in p for p in groups.trainable_paths)
    assert "up_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q.kernel" in groups.trainable_paths
    graphdef, trainable, frozen, rest = groups.split(vsr_model)
    assert {optim.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]} == \
        set(groups.trainable_paths)
    assert len(jax.tree.leaves(frozen)) == len(paths) - len(groups.trainable_paths)
    merged = nnx.merge(graphdef, trainable, frozen, rest)
    for a, b in zip(jax.tree.leaves(nnx.state(merged)), jax.tree.leaves(nnx.state(vsr_model))):
        assert a is b
    # the same partition on a State of raw arrays and on a pure nested dict
    values = jax.tree.map(lambda v: v.get_value(), nnx.state(vsr_model, nnx.Param),
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    for tree in (values, nnx.to_pure_dict(values)):
        t, f = groups.partition(tree)
        assert len(jax.tree.leaves(t)) == len(groups.trainable_paths)
        assert len(jax.tree.leaves(f)) == len(paths) - len(groups.trainable_paths)
    assert "temporal" in groups.summary() and "frozen" in groups.summary()


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(3, 4, rngs=rngs)
        self.attn_temp = nnx.Linear(4, 4, rngs=rngs)
        self.norm_temp = nnx.LayerNorm(4, rngs=rngs)


def test_optimizer_and_ema_on_a_split_off_state_of_variables():
    """The documented step: split by the groups, update the State of nnx.Variables as it is, merge back."""
    model = _Block(nnx.Rngs(0))
    groups = optim.param_groups(model, _temporal_only_rules())
    assert groups.trainable_paths == ["attn_temp.bias", "attn_temp.kernel", "norm_temp.bias", "norm_temp.scale"]
    graphdef, trainable, frozen, rest = groups.split(model)
    tx, _ = optim.make_optimizer(_train_config(warmup_steps=0, weight_decay=0.1), groups)
    opt_state, ema = tx.init(trainable), optim.init_ema(trainable)

    @jax.jit
    def step(trainable, opt_state, ema, x):
        def loss_fn(trainable):
            m = nnx.merge(graphdef, trainable, frozen, rest)
            return jnp.mean(m.norm_temp(m.attn_temp(m.proj(x))) ** 2)

        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, optim.ema_update(ema, trainable, 0.9)

    new, opt_state, ema = step(trainable, opt_state, ema, jnp.ones((2, 3)))
    assert jax.tree.structure(new) == jax.tree.structure(trainable) == jax.tree.structure(ema)
    assert jax.tree.structure(opt_state[1].mu) == jax.tree.structure(trainable)
    merged = nnx.merge(graphdef, new, frozen, rest)
    assert not np.allclose(merged.attn_temp.kernel[...], model.attn_temp.kernel[...])
    np.testing.assert_array_equal(merged.proj.kernel[...], model.proj.kernel[...])


def test_first_match_wins_and_multipliers(abstract_vsr):
    model = abstract_vsr
    rules = (("attn_temp", "tattn"), ("temporal", "tconv"), ("conv_in", "frozen"), (".*", "spatial"))
    groups = optim.param_groups(model, rules, {"tattn": 10.0})
    assert groups.group_of("down_blocks.1.attentions.0.transformer_blocks.0.attn_temp.to_q.kernel") == "tattn"
    assert groups.group_of("down_temporal_blocks.0.shift_conv.kernel") == "tconv"
    assert groups.group_of("conv_in.kernel") == "frozen"
    assert groups.multipliers == {"tattn": 10.0, "tconv": 1.0, "spatial": 1.0}
    with pytest.raises(ValueError, match="frozen but reached the optimizer"):
        groups.multiplier("conv_in.bias")
    with pytest.raises(KeyError, match="rebuild the groups"):
        groups.group_of("no.such.param")


@pytest.mark.parametrize("rules, mults, match", [
    ((("attn_temp", "t"),), None, r"params match no rule, e\.g\. .*add a catch-all"),
    ((("atn_temp", "t"), (".*", "frozen")), None,
     r"rules\[0\] \('atn_temp' -> 't'\) matches no param; param paths look like "),
    (((".*", "all"), ("attn_temp", "t")), None, r"rules\[1\] .*earlier rules take all of them"),
    ((("attn_temp(", "t"), (".*", "frozen")), None, r"rules\[0\]: bad regex"),
    (((".*", "frozen"),), None, "freeze every param"),
    ((("attn_temp", "t"), (".*", "frozen")), {"tmp": 2.0}, r"lr_multipliers\['tmp'\]: no rule"),
    ((("attn_temp", "t"), (".*", "frozen")), {"t": 0.0}, r"lr_multipliers\['t'\] must be a number > 0"),
    (("attn_temp",), None, r"rules\[0\] must be a \(regex, group\) pair"),
])
def test_group_rule_errors(rules, mults, match, abstract_vsr):
    with pytest.raises(optim.OptimConfigError, match=match):
        optim.param_groups(abstract_vsr, rules, mults)


def test_unused_rule_allowed_on_request(abstract_vsr):
    groups = optim.param_groups(abstract_vsr, (("no_such_layer", "x"), (".*", "all")), allow_unused_rules=True)
    assert set(groups.multipliers) == {"all"}


@pytest.mark.parametrize("section, field, value, match", [
    ("optimizer", "lr", 0.0, r"train\.optimizer\.lr must be > 0, got 0\.0"),
    ("optimizer", "schedule", "linear", r"train\.optimizer\.schedule must be 'constant' or 'cosine'"),
    ("optimizer", "warmup_steps", -1, r"train\.optimizer\.warmup_steps must be >= 0"),
    ("optimizer", "b2", 1.0, r"train\.optimizer\.b2 must be in \[0, 1\)"),
    ("optimizer", "eps", 0.0, r"train\.optimizer\.eps must be > 0"),
    ("optimizer", "weight_decay", -0.1, r"train\.optimizer\.weight_decay must be >= 0"),
    ("optimizer", "clip_grad_norm", -1.0, r"train\.optimizer\.clip_grad_norm must be >= 0"),
    ("optimizer", "weight_decay_exclude", "bias(", r"train\.optimizer\.weight_decay_exclude: bad regex"),
    ("ema", "decay", 1.0, r"train\.ema\.decay must be in \[0, 1\)"),
    ("ema", "decay", -0.5, r"train\.ema\.decay must be in \[0, 1\) \(0 = no EMA\), got -0\.5"),
    (None, "micro_batches", 0, r"train\.micro_batches must be >= 1"),
])
def test_config_errors_name_the_field(section, field, value, match):
    c = _default_train()
    (c if section is None else c[section])[field] = value
    with pytest.raises(optim.OptimConfigError, match=match):
        optim.validate_train_optim_config(c)


def test_cosine_needs_decay_steps_and_vsr_default_rules():
    c = _train_config(schedule="cosine")
    with pytest.raises(optim.OptimConfigError, match=r"train\.optimizer\.decay_steps must be > 0"):
        optim.make_optimizer(c, None)
    assert stage_config("vsr").train.param_groups.rules == \
        (("temporal|attn_temp|norm_temp", "temporal"), (".*", optim.FROZEN))
    assert stage_config("base").train.param_groups.rules == ((".*", "unet"),)
    assert stage_config("interpolation").train.param_groups.rules == ((".*", "unet"),)


# ----------------------------------------------------------------------------------------------------- optimizer


def test_schedules():
    lr_at = optim.learning_rate_schedule(_train_config(lr=2e-4, warmup_steps=10))
    np.testing.assert_allclose([float(lr_at(t)) for t in (0, 4, 9, 10, 1000)],
                               [2e-5, 1e-4, 2e-4, 2e-4, 2e-4], rtol=1e-6)
    lr_at = optim.learning_rate_schedule(_train_config(lr=1.0, warmup_steps=4, schedule="cosine", decay_steps=8,
                                                       final_lr_ratio=0.1))
    expect = [min(1, (t + 1) / 4) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.clip((t - 4) / 8, 0, 1))))
              for t in range(16)]
    np.testing.assert_allclose([float(lr_at(t)) for t in range(16)], expect, rtol=1e-6, atol=1e-7)
    assert float(lr_at(jnp.int32(3))) == pytest.approx(1.0)
    assert float(optim.learning_rate_schedule(_train_config(warmup_steps=0, lr=3e-4))(0)) == pytest.approx(3e-4)


def _reference_adamw(params, grads_seq, *, lrs, mult, decay_mask, b1, b2, eps, wd, clip):
    """torch.optim.AdamW + clip_grad_norm_, one param group per multiplier, in float64 numpy."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        if clip and norm > clip:
            g = {k: x * clip / norm for k, x in g.items()}
        for k in p:
            lr = lrs[t - 1] * mult[k]
            if decay_mask[k]:
                p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            p[k] = p[k] - lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
    return p


def test_adamw_per_group_lr_decay_and_clipping_match_torch_semantics():
    rng = np.random.default_rng(0)
    params = {"enc": {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal(3)},
              "temp": {"kernel": rng.standard_normal((3, 3)), "norm": {"scale": rng.standard_normal(3)}}}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    groups = optim.param_groups(params, (("^temp", "temporal"), (".*", "spatial")), {"temporal": 5.0})
    c = _train_config(lr=1e-2, warmup_steps=3, weight_decay=0.1, clip_grad_norm=0.5, b1=0.8, b2=0.95, eps=1e-6)
    tx, lr_at = optim.make_optimizer(c, groups)
    state = tx.init(params)
    adam = state[1]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((adam.mu, adam.nu)))
    grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
                 for _ in range(5)]
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    p = params
    for g in grads_seq:
        updates, state = step(g, state, p)
        p = optax.apply_updates(p, updates)

    def flat(tree):
        return {optim.path_str(kp): np.asarray(x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    ref = _reference_adamw(flat(params), [flat(g) for g in grads_seq], lrs=[float(lr_at(t)) for t in range(5)],
                           mult={k: 5.0 if k.startswith("temp") else 1.0 for k in flat(params)},
                           decay_mask={k: k.endswith("kernel") for k in flat(params)},
                           b1=0.8, b2=0.95, eps=1e-6, wd=0.1, clip=0.5)
    for k, x in flat(p).items():
        np.testing.assert_allclose(x, ref[k], rtol=2e-6, atol=1e-7, err_msg=k)


def test_frozen_param_in_the_optimizer_is_an_error():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    groups = optim.param_groups(params, (("a", "x"), ("b", "frozen")))
    tx, _ = optim.make_optimizer(_train_config(), groups)
    with pytest.raises(ValueError, match="'b' is frozen but reached the optimizer"):
        tx.update(params, tx.init(params), params)
    trainable, frozen = groups.partition(params)
    assert list(trainable) == ["a"] and list(frozen) == ["b"]
    tx.update(trainable, tx.init(trainable), trainable)


def test_opt_state_shards_like_the_params(vsr_model):
    """mu/nu take the trainable params' shardings; an update jitted with those out_shardings keeps them."""
    mesh = parallel.make_mesh((2, 4, 1, 1))
    groups = optim.param_groups(vsr_model, (("attn_temp", "temporal_attention"), (".*", "frozen")))
    _, trainable, _, _ = groups.split(vsr_model)
    params = parallel.place_state(trainable, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    assert any(s.spec != jax.sharding.PartitionSpec() and any(s.spec) for s in jax.tree.leaves(shardings))
    tx, _ = optim.make_optimizer(_train_config(weight_decay=0.01), groups)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = optim.opt_state_shardings(tx, params, shardings, replicated)
    adam_sh = state_sh[1]
    assert jax.tree.leaves(adam_sh.mu) == jax.tree.leaves(shardings)
    assert jax.tree.leaves(adam_sh.nu) == jax.tree.leaves(shardings)
    assert adam_sh.count == replicated
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
    _, state = jax.jit(tx.update, out_shardings=(shardings, state_sh))(grads, state, params)
    assert [x.sharding for x in jax.tree.leaves(state[1].mu)] == jax.tree.leaves(shardings)


# ----------------------------------------------------------------------------------------------------- EMA


def test_ema_follows_its_formula_exactly():
    """Op by op it is the formula rounded step by step (bit-equal to numpy float32); jitted, XLA may fuse the
    multiply-adds (FMA), which moves results by at most an ulp or so."""
    rng = np.random.default_rng(1)
    params = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(6)]
    ema = jit_ema = optim.init_ema({"w": jnp.asarray(params[0])})
    ref = params[0].copy()
    decay_at = optim.make_ema_decay(_default_train())
    for t, p in enumerate(params[1:]):
        d = np.float32(0.9999)
        assert np.float32(decay_at(t)) == d
        ema = optim.ema_update(ema, {"w": jnp.asarray(p)}, decay_at(t))
        jit_ema = jax.jit(optim.ema_update)(jit_ema, {"w": jnp.asarray(p)}, decay_at(t))
        ref = d * ref + (np.float32(1) - d) * p
        np.testing.assert_array_equal(np.asarray(ema["w"]), ref)
        np.testing.assert_allclose(np.asarray(jit_ema["w"]), ref, rtol=4e-7, atol=1e-7)
    assert ema["w"].dtype == jnp.float32
    # warm-up form through the same update: decay_t = min(0.9999, (1 + t) / (10 + t))
    c = _default_train()
    c.ema.warmup = True
    e = optim.ema_update({"w": jnp.asarray(params[0])}, {"w": jnp.asarray(params[1])}, optim.make_ema_decay(c)(0))
    d0 = np.float32(1) / np.float32(10)
    np.testing.assert_array_equal(np.asarray(e["w"]), d0 * params[0] + (np.float32(1) - d0) * params[1])


def test_ema_warmup_decay():
    c = _default_train()
    c.ema.warmup = True
    decay_at = optim.make_ema_decay(c)
    for t in (0, 1, 10, 1000, 10**5, 10**6):
        expect = min(np.float32(0.9999), np.float32(1 + t) / np.float32(10 + t))
        assert np.float32(decay_at(t)) == expect
        assert np.float32(jax.jit(decay_at)(t)) == expect
    assert float(decay_at(0)) == pytest.approx(0.1)
    c.ema.decay = 0.0
    assert optim.make_ema_decay(c) is None


def test_init_ema_copies():
    p = {"w": jnp.ones(3, jnp.bfloat16), "v": jnp.ones(2)}
    e = optim.init_ema(p)
    assert e["w"].dtype == jnp.float32 and e["v"] is not p["v"]


# ----------------------------------------------------------------------------------------------------- accumulation


def _mlp_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    pred = h @ params["w2"]
    err = (pred - batch["y"]) ** 2
    return err.mean(), {"mae": jnp.abs(pred - batch["y"]).mean(), "max_err": err.max()}


def test_accumulating_micro_batches_equals_one_big_batch():
    rng = np.random.default_rng(2)
    params = {"w1": rng.standard_normal((6, 16)), "b1": rng.standard_normal(16), "w2": rng.standard_normal((16, 3))}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    batch = {"x": jnp.asarray(rng.standard_normal((32, 6)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal((32, 3)), jnp.float32)}
    grad_fn = jax.value_and_grad(_mlp_loss, has_aux=True)
    (loss, aux), grads = jax.jit(grad_fn)(params, batch)
    micro = optim.split_micro_batches(batch, 4)
    assert micro["x"].shape == (4, 8, 6)
    np.testing.assert_array_equal(micro["x"][1, 2], batch["x"][2 * 4 + 1])  # strided layout
    (aloss, aaux), agrads = jax.jit(lambda p, b: optim.accumulate_gradients(grad_fn, p, b))(params, micro)

    def rel(a, b):
        return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

    assert rel(aloss, loss) <= 1e-5 and rel(aaux["mae"], aux["mae"]) <= 1e-5
    for k in grads:
        assert rel(agrads[k], grads[k]) <= 1e-5, k
    # aux metrics are means over micro-batches (a max is not a mean: it becomes the mean of the maxima)
    per_micro = [float(_mlp_loss(params, jax.tree.map(lambda x, i=i: x[i], micro))[1]["max_err"]) for i in range(4)]
    assert float(aaux["max_err"]) == pytest.approx(np.mean(per_micro), rel=1e-6)
    # one micro-batch: a plain call
    (l1, _), g1 = optim.accumulate_gradients(grad_fn, params, optim.split_micro_batches(batch, 1))
    assert rel(l1, loss) <= 1e-6


def test_accumulation_passes_a_key_per_micro_batch():
    params = {"w": jnp.ones(())}

    def fn(p, micro, key):
        noise = jax.random.normal(key, ())
        return jax.value_and_grad(lambda q: (q["w"] * micro["x"].sum() + noise, noise), has_aux=True)(p)

    batch = {"x": jnp.ones((3, 2))}
    rng = jax.random.key(0)
    (loss, noise), grads = jax.jit(lambda p, b, k: optim.accumulate_gradients(fn, p, b, rng=k))(params, batch, rng)
    expect = np.mean([float(jax.random.normal(jax.random.fold_in(rng, i), ())) for i in range(3)])
    assert float(noise) == pytest.approx(expect, abs=1e-6) and float(grads["w"]) == pytest.approx(2.0)
