"""Sampler parity over whole 50-step trajectories, float32 against float32: diffusers' torch DDPM / DDIM / Euler, and
a torch reference of guided-diffusion's respaced DDIM (the official interpolation sampler: `create_diffusion('50')`,
linear betas, `ddim_sample_loop` with eta 0 and no clipping, the model seeing the original timestep);
float64 references check the math of Euler and the respaced DDIM.

The "model" is `out_i = c_i * x + d_i * z_i` (per-step scalars, fixed random z_i): it depends on the trajectory, so
errors would feed back, and it is computed identically in torch and jax.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lavie_jax.diffusion import classifier_free_guidance, make_sampler, sample_loop, step
from lavie_jax.diffusion.schedules import alphas_cumprod, diffusers_alphas_cumprod, make_betas
from tests.conftest import rerun_with_fusion_emitters
from tests.models.tiny_configs import rel_err

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 5, 4)  # [B, F, H, W, C]
STEPS = 50
TOL = 1e-6
TOL_STOCK_FREE_RUNNING = 2e-6  # see correctly_rounded_sqrt


def fake_model(num_steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.2, 0.8, num_steps).astype(np.float32)
    d = rng.uniform(0.3, 0.7, num_steps).astype(np.float32)
    z = rng.standard_normal((num_steps, *SHAPE)).astype(np.float32)
    return c, d, z


def ours_trajectory(sampler, x_init: np.ndarray, noises: list | None = None) -> list[np.ndarray]:
    """x after every step of the compiled `sample_loop` (the model's inputs, collected by a host callback)."""
    c, d, z = fake_model(sampler.num_steps)
    c, dz = jnp.asarray(c), jnp.asarray(d[:, None, None, None, None, None] * z)  # d_i * z_i, rounded as in torch
    noise_arr = None if noises is None else jnp.asarray(np.stack(noises), jnp.float32)
    seen = {}

    def model_fn(xs, t, i):
        jax.debug.callback(lambda i, x: seen.__setitem__(int(i), np.asarray(x)), i, xs)  # the scaled input
        # the barrier keeps XLA from fusing the multiply and the add into one FMA (torch rounds both)
        return jax.lax.optimization_barrier(c[i] * xs) + dz[i]

    final = jax.jit(lambda x0: sample_loop(sampler.spec, sampler.tables, x0, model_fn,
                                           (lambda i: noise_arr[i]) if noises is not None else None)
                    )(jnp.asarray(x_init))
    jax.effects_barrier()
    assert sorted(seen) == list(range(sampler.num_steps))  # the model saw every step
    # inputs of step i + 1 are the outputs of step i, undone by the input scaling
    xs = [seen[i + 1] * sampler.tables["input_div"][i + 1] for i in range(sampler.num_steps - 1)]
    return xs + [np.asarray(final)]


def ours_one_step(sampler, i: int, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    c, d, z = fake_model(sampler.num_steps)
    row = {k: jnp.asarray(v[i]) for k, v in sampler.tables.items()}
    out = c[i] * (jnp.asarray(x) / row["input_div"]) + d[i] * z[i]
    return np.asarray(jax.jit(step, static_argnums=0)(sampler.spec, row, jnp.asarray(x), out,
                                                      None if noise is None else jnp.asarray(noise, jnp.float32)))


def diffusers_run(scheduler, x_init: np.ndarray, step_kwargs=None):
    """(inputs, outputs) of every step of a diffusers scheduler driven by the fake model."""
    c, d, z = fake_model(len(scheduler.timesteps))
    x = torch.from_numpy(x_init.copy())
    inputs, outputs = [], []
    for i, t in enumerate(scheduler.timesteps):
        inputs.append(x.numpy().copy())
        out = float(c[i]) * scheduler.scale_model_input(x, t) + torch.from_numpy(d[i] * z[i])
        x = scheduler.step(out, t, x, **(step_kwargs(i) if step_kwargs else {})).prev_sample
        outputs.append(x.numpy().copy())
    return inputs, outputs


def worst(ours, ref) -> float:
    assert len(ours) == len(ref)
    return max(rel_err(a, b) for a, b in zip(ours, ref))


@contextlib.contextmanager
def correctly_rounded_sqrt():
    """Make torch's `scalar ** 0.5` on a 0-d float32 tensor the correctly rounded square root.

    diffusers forms each step's square roots that way (`alpha_prod_t ** 0.5`), and torch's float32 square root is
    not correctly rounded: it is 1 ulp off for 177 of the 1000 linear-schedule alpha_bars (MKL's vector sqrt, so
    the exact bits depend on the machine). A JAX program cannot reproduce those bits, and over a free-running
    50-step trajectory they alone move diffusers by up to 1.4e-6. Everything else in diffusers is left as is.
    """
    original = torch.Tensor.__pow__

    def power(self, exponent):
        if isinstance(exponent, float) and exponent == 0.5 and self.dim() == 0 and self.dtype == torch.float32:
            return torch.tensor(np.sqrt(self.numpy()))
        return original(self, exponent)

    torch.Tensor.__pow__ = power
    try:
        yield
    finally:
        torch.Tensor.__pow__ = original


def check_parity(sampler, make_ref, x0, noise=lambda: None, kwargs=lambda: None):
    """Our float32 sampler against diffusers' float32 scheduler, both driven by the fake model over all 50 steps:

    - per step, from diffusers' own x_t: within TOL (1e-6) of stock diffusers at every step;
    - free-running (our whole compiled loop against diffusers' whole loop): within TOL at every step of diffusers
      with correctly rounded square roots (see `correctly_rounded_sqrt`), and within TOL_STOCK_FREE_RUNNING of
      stock diffusers, whose trajectory also carries torch's 1-ulp square roots.
    """
    n = noise()
    inputs, outputs = diffusers_run(make_ref(), x0, kwargs())
    per_step = [rel_err(ours_one_step(sampler, i, x, None if n is None else n[i]), outputs[i])
                for i, x in enumerate(inputs)]
    assert max(per_step) <= TOL, f"step {int(np.argmax(per_step))}: rel err {max(per_step):.2e}"
    ours = ours_trajectory(sampler, x0, n)
    assert worst(ours, outputs) <= TOL_STOCK_FREE_RUNNING
    with correctly_rounded_sqrt():
        _, exact_sqrt_outputs = diffusers_run(make_ref(), x0, kwargs())
    assert worst(ours, exact_sqrt_outputs) <= TOL


def initial(scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(7).standard_normal(SHAPE)).astype(np.float32)


LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_ddpm_matches_diffusers(prediction_type, steps_offset):
    """steps_offset 0 is the official base stage (diffusers 0.16 DDPM: [980..0]); 1 is newer diffusers with SD's
    scheduler config ([981..1], where the last step still adds noise because t = 1 > 0)."""
    def make_ref():
        ref = diffusers.DDPMScheduler(num_train_timesteps=1000, **LINEAR, prediction_type=prediction_type,
                                      variance_type="fixed_small", clip_sample=False, timestep_spacing="leading",
                                      steps_offset=steps_offset)
        ref.set_timesteps(STEPS)
        return ref

    ours = make_sampler("ddpm", STEPS, **LINEAR, prediction_type=prediction_type, steps_offset=steps_offset)
    np.testing.assert_array_equal(ours.timesteps, make_ref().timesteps.numpy())
    if steps_offset == 0:
        np.testing.assert_array_equal(ours.timesteps, np.arange(980, -1, -20))

    def noise():  # diffusers draws torch.randn(shape) from the generator at every step with t > 0
        g = torch.Generator().manual_seed(3)
        return [torch.randn(SHAPE, generator=g).numpy() if t > 0 else np.zeros(SHAPE, np.float32)
                for t in ours.timesteps]

    def kwargs():
        g = torch.Generator().manual_seed(3)
        return lambda i: {"generator": g}

    check_parity(ours, make_ref, initial(), noise=noise, kwargs=kwargs)


@pytest.mark.parametrize("prediction_type,spacing,offset,eta,alpha_one", [
    ("epsilon", "leading", 1, 0.0, False),  # official base 'ddim' option: [981..1]
    ("v_prediction", "leading", 1, 0.0, False),  # official VSR stage
    ("epsilon", "trailing", 0, 0.0, False),
    ("v_prediction", "leading", 1, 0.5, True),  # stochastic DDIM with the final alpha set to one
])
def test_ddim_matches_diffusers(prediction_type, spacing, offset, eta, alpha_one):
    def make_ref():
        ref = diffusers.DDIMScheduler(num_train_timesteps=1000, **LINEAR, prediction_type=prediction_type,
                                      clip_sample=False, set_alpha_to_one=alpha_one, steps_offset=offset,
                                      timestep_spacing=spacing)
        ref.set_timesteps(STEPS)
        return ref

    ours = make_sampler("ddim", STEPS, **LINEAR, prediction_type=prediction_type, timestep_spacing=spacing,
                        steps_offset=offset, eta=eta, set_alpha_to_one=alpha_one)
    np.testing.assert_array_equal(ours.timesteps, make_ref().timesteps.numpy())
    if (spacing, offset) == ("leading", 1):
        np.testing.assert_array_equal(ours.timesteps, np.arange(981, 0, -20))
    draws = [np.random.default_rng(100 + i).standard_normal(SHAPE).astype(np.float32) for i in range(STEPS)]

    def kwargs():
        return (lambda i: {"eta": eta, "variance_noise": torch.from_numpy(draws[i])}) if eta else None

    check_parity(ours, make_ref, initial(), noise=lambda: draws if eta else None, kwargs=kwargs)


def euler_reference(timesteps: np.ndarray, x: np.ndarray, prediction_type: str) -> list[np.ndarray]:
    """Euler steps in exact float64 arithmetic, as a check of the math: sigma = sqrt((1 - alpha_bar) / alpha_bar)
    interpolated linearly at the timesteps, then 0; x_0 from the prediction; x += (x - x_0) / sigma * dsigma."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).numpy()
    sigmas = np.append(np.interp(timesteps, np.arange(1000), np.sqrt((1 - abar) / abar)), 0.0)
    c, d, z = fake_model(len(timesteps))
    x = x.astype(np.float64)
    traj = []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        out = c[i] * (x / np.sqrt(s ** 2 + 1)) + d[i] * z[i].astype(np.float64)
        x0 = x - s * out if prediction_type == "epsilon" else out * (-s / np.sqrt(s ** 2 + 1)) + x / (s ** 2 + 1)
        x = x + (x - x0) / s * (s_next - s)
        traj.append(x.copy())
    return traj


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_matches_diffusers(prediction_type):
    def make_ref():
        ref = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, **LINEAR, prediction_type=prediction_type)
        ref.set_timesteps(STEPS)
        return ref

    ref = make_ref()
    ours = make_sampler("euler", STEPS, **LINEAR, prediction_type=prediction_type, timestep_spacing="linspace")
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(ours.timesteps, np.linspace(0, 999, STEPS)[::-1], rtol=1e-6)
    assert ours.spec.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=3e-7)  # torch sqrt: 1 ulp
    assert ours.spec.init_noise_sigma == pytest.approx(157.4, abs=0.05)  # spec 4.1: sigma_max for linear betas
    x0 = initial(ours.spec.init_noise_sigma)
    check_parity(ours, make_ref, x0)
    # float32 arithmetic, ours or diffusers', stays close to the exact trajectory
    exact = euler_reference(np.linspace(0, 999, STEPS)[::-1], x0, prediction_type)
    assert worst(ours_trajectory(ours, x0), exact) <= 1e-5


def respaced_chain(num_steps: int):
    """guided-diffusion's respacing of a linear schedule, written from the spec (section 4.2) in float64: keep the
    steps of `space_timesteps(1000, str(num_steps))` (a float stride accumulated and rounded), rebuild the chain's
    betas from the kept alpha_bars, and give the model the original timestep of each kept step."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    stride, position, kept = 999 / (num_steps - 1), 0.0, []
    for _ in range(num_steps):
        kept.append(round(position))
        position += stride
    new_betas, last = [], 1.0
    for t in kept:
        new_betas.append(1 - abar[t] / last)
        last = abar[t]
    chain = np.cumprod(1 - np.asarray(new_betas))
    for t, a in zip(kept, chain):
        assert abs(a - abar[t]) < 1e-12
    return kept, chain, np.append(1.0, chain[:-1])


def respaced_ddim_reference(x: np.ndarray, num_steps: int, dtype) -> list[np.ndarray]:
    """guided-diffusion's ddim_sample (eta 0, eps-prediction, clip_denoised False) driven by the fake model.

    torch.float32: the official arithmetic (float64 tables, each step's values cast to float32 by
    `_extract_into_tensor`, then float32 torch ops in the library's order); torch.float64: exact math."""
    kept, chain, chain_prev = respaced_chain(num_steps)
    c, d, z = fake_model(num_steps)
    x = torch.from_numpy(x).to(dtype)
    traj = []
    for i, j in enumerate(reversed(range(num_steps))):  # j: the step's index in the short chain
        def scalar(value):
            return torch.tensor(value, dtype=torch.float64).to(dtype)

        recip, recipm1 = scalar(np.sqrt(1 / chain[j])), scalar(np.sqrt(1 / chain[j] - 1))
        alpha_bar_prev = scalar(chain_prev[j])
        eps = float(c[i]) * x + torch.from_numpy(d[i] * z[i]).to(dtype)
        x0 = recip * x - recipm1 * eps
        eps = (recip * x - x0) / recipm1
        x = x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev) * eps
        traj.append(x.numpy().copy())
    return traj


@pytest.mark.parametrize("num_steps", [STEPS, 21])
def test_respaced_ddim_matches_reference(num_steps):
    """21 steps is one of the counts where guided-diffusion's accumulated stride keeps other steps than
    round(k * 999 / (n - 1)) would: its 11th step is 499, not 500."""
    ours = make_sampler("ddim_respaced", num_steps, **LINEAR)
    kept, _, _ = respaced_chain(num_steps)
    np.testing.assert_array_equal(ours.timesteps, kept[::-1])
    if num_steps == STEPS:
        assert kept[:6] == [0, 20, 41, 61, 82, 102] and kept[-1] == 999  # spec 4.2
    else:
        assert kept[10] == 499 and round(10 * 999 / 20) == 500
    x0 = initial()
    assert worst(ours_trajectory(ours, x0), respaced_ddim_reference(x0, num_steps, torch.float32)) <= TOL
    assert worst(ours_trajectory(ours, x0), respaced_ddim_reference(x0, num_steps, torch.float64)) <= 1e-5


def respaced_ddpm_reference(x: np.ndarray, num_steps: int, noises: list) -> list[np.ndarray]:
    """guided-diffusion's p_sample (FIXED_LARGE, eps-prediction, clip_denoised False; SEINE's sampler) driven by the
    fake model: float64 tables, each step's values cast to float32, float32 torch ops in the library's order."""
    kept, chain, chain_prev = respaced_chain(num_steps)
    betas = 1 - chain / chain_prev
    posterior_variance = betas * (1 - chain_prev) / (1 - chain)
    log_variance = np.log(np.append(posterior_variance[1], betas[1:]))
    coef1 = betas * np.sqrt(chain_prev) / (1 - chain)
    coef2 = (1 - chain_prev) * np.sqrt(1 - betas) / (1 - chain)
    c, d, z = fake_model(num_steps)
    x = torch.from_numpy(x)
    traj = []
    for i, j in enumerate(reversed(range(num_steps))):
        def scalar(table):
            return torch.tensor(table[j], dtype=torch.float64).float()

        eps = float(c[i]) * x + torch.from_numpy(d[i] * z[i])
        x0 = scalar(np.sqrt(1 / chain)) * x - scalar(np.sqrt(1 / chain - 1)) * eps
        mean = scalar(coef1) * x0 + scalar(coef2) * x
        nonzero = float(j != 0)
        x = mean + nonzero * torch.exp(0.5 * scalar(log_variance)) * torch.from_numpy(noises[i])
        traj.append(x.numpy().copy())
    return traj


def test_respaced_ddpm_matches_reference():
    """SEINE's sampler: create_diffusion('250'), ancestral steps with fresh noise, none at the last step."""
    num_steps = 250
    ours = make_sampler("ddpm_respaced", num_steps, **LINEAR)
    kept, _, _ = respaced_chain(num_steps)
    np.testing.assert_array_equal(ours.timesteps, kept[::-1])
    assert kept[:3] == [0, 4, 8] and kept[-1] == 999 and ours.tables["std"][-1] == 0 and ours.tables["std"][0] > 0
    rng = np.random.default_rng(5)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(num_steps)]
    x0 = initial()
    # 250 steps, five times the others: XLA's FMA contractions add up to ~1.05e-6
    assert worst(ours_trajectory(ours, x0, noises), respaced_ddpm_reference(x0, num_steps, noises)) <= 2e-6


def test_classifier_free_guidance_order():
    cond, uncond = jnp.full((2, 3), 2.0), jnp.full((2, 3), 1.0)
    # base / VSR batches are [uncond, cond]; interpolation batches are [cond, uncond]
    np.testing.assert_allclose(classifier_free_guidance(jnp.stack([uncond, cond], 1), 7.5, cond_first=False), 8.5)
    np.testing.assert_allclose(classifier_free_guidance(jnp.stack([cond, uncond], 1), 4.0, cond_first=True), 5.0)


@pytest.mark.parametrize("schedule,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                                ("scaled_linear", 1e-4, 0.02), ("linear", 0.001, 0.03)])
def test_alphas_match_diffusers_schedules_bit_for_bit(schedule, start, end):
    ref = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=start, beta_end=end)
    np.testing.assert_array_equal(diffusers_alphas_cumprod(schedule, start, end), ref.alphas_cumprod.numpy())
    exact = alphas_cumprod(make_betas(schedule, start, end))
    assert rel_err(ref.alphas_cumprod.numpy(), exact) < 2e-6  # float32 rounding only


def test_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler 'pndm'"):
        make_sampler("pndm", 10)
    with pytest.raises(ValueError, match="prediction_type"):
        make_sampler("ddim", 10, prediction_type="sample")
    with pytest.raises(ValueError, match="ddim_respaced .* predicts epsilon only"):
        make_sampler("ddim_respaced", 10, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="steps must be an int in 1..1000"):
        make_sampler("ddpm", 0)
    with pytest.raises(ValueError, match="steps_offset"):
        make_sampler("ddim", 50, steps_offset=20)  # 980 + 20 is past the last training timestep
    spec = make_sampler("ddpm", 10).spec
    with pytest.raises(ValueError, match="adds fresh noise each step; pass `noise`"):
        step(spec, {}, jnp.zeros(3), jnp.zeros(3))


@pytest.mark.parametrize("name", ["ddpm", "ddim_respaced"])
def test_sample_loop_in_stretches_equals_one_scan(name, request):
    """Running the loop a few steps per call (as the interruptible samplers do) gives the one-scan result."""
    if rerun_with_fusion_emitters(request):  # bit for bit across two programs: under XLA's default emitters
        return
    sampler = make_sampler(name, 10)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((10, *SHAPE)), jnp.float32)
    model_fn = lambda x, t, i: 0.3 * x + 1e-3 * t  # noqa: E731
    noise_fn = (lambda i: noise[i]) if sampler.spec.stochastic else None
    run = jax.jit(lambda x, start, n: sample_loop(sampler.spec, sampler.tables, x, model_fn, noise_fn, start=start,
                                                  num_steps=n), static_argnums=2)
    whole = run(x0, 0, 10)
    x = x0
    for start, n in ((0, 3), (3, 3), (6, 3), (9, 1)):
        x = run(x, start, n)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(whole))
    with pytest.raises(ValueError, match="num_steps must be in 1..10"):
        sample_loop(sampler.spec, sampler.tables, x0, model_fn, noise_fn, num_steps=11)
