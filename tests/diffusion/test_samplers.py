"""Sampler parity over whole 50-step trajectories: diffusers' torch DDPM / DDIM / Euler, and an independent float64
numpy reference of guided-diffusion's respaced DDIM written from the spec (../shared/spec/lavie.md section 4.2).

The "model" is `out_i = c_i * x + d_i * z_i` (per-step scalars, fixed random z_i): it depends on the trajectory, so
errors would feed back, and it is computed identically in torch, numpy and jax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lavie_jax.diffusion import classifier_free_guidance, make_sampler, sample_loop, step
from lavie_jax.diffusion.schedules import alphas_cumprod, make_betas
from tests.models.tiny_configs import rel_err

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 5, 4)  # [B, F, H, W, C]
STEPS = 50
TOL = 1e-6


def fake_model(num_steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.2, 0.8, num_steps).astype(np.float32)
    d = rng.uniform(0.3, 0.7, num_steps).astype(np.float32)
    z = rng.standard_normal((num_steps, *SHAPE)).astype(np.float32)
    return c, d, z


def ours_trajectory(sampler, x_init: np.ndarray, noises: list | None = None) -> list[np.ndarray]:
    """x after every step of the compiled `sample_loop` (collected by its host callback)."""
    c, d, z = (jnp.asarray(a) for a in fake_model(sampler.num_steps))
    noise_arr = None if noises is None else jnp.asarray(np.stack(noises), jnp.float32)
    seen = {}

    def model_fn(xs, t, i):
        jax.debug.callback(lambda i, x: seen.__setitem__(int(i), np.asarray(x)), i, xs / 1)  # scaled input
        return c[i] * xs + d[i] * z[i]

    traj = {}

    def record(i):
        traj[int(i)] = None

    final = jax.jit(lambda x0: sample_loop(sampler.spec, sampler.tables, x0, model_fn,
                                           (lambda i: noise_arr[i]) if noises is not None else None,
                                           callback=record))(jnp.asarray(x_init))
    jax.effects_barrier()
    assert sorted(traj) == list(range(sampler.num_steps))  # the callback saw every step
    # inputs of step i + 1 are the outputs of step i, undone by the input scaling
    xs = [seen[i + 1] / sampler.tables["input_scale"][i + 1] for i in range(sampler.num_steps - 1)]
    return xs + [np.asarray(final)]


def ours_one_step(sampler, i: int, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    c, d, z = fake_model(sampler.num_steps)
    row = {k: jnp.asarray(v[i]) for k, v in sampler.tables.items()}
    out = c[i] * (jnp.asarray(x) * row["input_scale"]) + d[i] * z[i]
    return np.asarray(jax.jit(step, static_argnums=0)(sampler.spec, row, jnp.asarray(x), out,
                                                      None if noise is None else jnp.asarray(noise, jnp.float32)))


def diffusers_run(scheduler, x_init: np.ndarray, step_kwargs=None, dtype=torch.float32):
    """(inputs, outputs) of every step of a diffusers scheduler driven by the fake model, in `dtype`."""
    c, d, z = fake_model(len(scheduler.timesteps))
    x = torch.from_numpy(x_init.copy()).to(dtype)
    inputs, outputs = [], []
    for i, t in enumerate(scheduler.timesteps):
        inputs.append(x.numpy().copy())
        out = float(c[i]) * scheduler.scale_model_input(x, t) + float(d[i]) * torch.from_numpy(z[i]).to(dtype)
        x = scheduler.step(out, t, x, **(step_kwargs(i) if step_kwargs else {})).prev_sample
        outputs.append(x.numpy().copy())
    return inputs, outputs


def in_float64(scheduler, set_alpha_to_one: bool = False):
    """The same diffusers scheduler computing in float64: its float32 alphas_cumprod is replaced by a float64 one
    (built here with torch, independently of lavie_jax.diffusion.schedules)."""
    scheduler.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.final_alpha_cumprod = scheduler.one if set_alpha_to_one else scheduler.alphas_cumprod[0]
    return scheduler


def worst(ours, ref) -> float:
    assert len(ours) == len(ref)
    return max(rel_err(a, b) for a, b in zip(ours, ref))


def check_parity(sampler, make_ref, x0, run64=None, noise=lambda dtype: None, kwargs=lambda dtype: None,
                 set_alpha_to_one=False):
    """Two references, both driven by the fake model through all 50 steps:

    - `run64` (diffusers' own scheduler computing in float64, or a float64 reference): our free-running float32
      trajectory is within 1e-6 of it at every step (the acceptance bar);
    - stock diffusers in float32: within 1e-5, per step (from its own x_t) and free-running. The bar is looser
      because diffusers' float32 arithmetic is itself that far from its float64 result: it forms
      1 - alpha_bar_t / alpha_bar_prev in float32 (about 4e-3 near t = 20, with an absolute error of 6e-8) and
      drifts up to 5e-6 over 50 steps, while ours stays within 6e-7 of float64.
    """
    n32 = noise(np.float32)
    inputs, outputs = diffusers_run(make_ref(), x0, kwargs(np.float32))
    per_step = [rel_err(ours_one_step(sampler, i, x, None if n32 is None else n32[i]), outputs[i])
                for i, x in enumerate(inputs)]
    assert max(per_step) <= 1e-5, f"step {int(np.argmax(per_step))}: rel err {max(per_step):.2e}"
    assert worst(ours_trajectory(sampler, x0, n32), outputs) <= 1e-5
    n64 = noise(np.float64)
    ref64 = run64(x0) if run64 else diffusers_run(in_float64(make_ref(), set_alpha_to_one), x0, kwargs(np.float64),
                                                  dtype=torch.float64)[1]
    assert worst(ours_trajectory(sampler, x0, None if n64 is None else [n.astype(np.float32) for n in n64]),
                 ref64) <= TOL


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

    def noise(dtype):  # diffusers draws torch.randn(shape, dtype) from the generator at every step with t > 0
        g = torch.Generator().manual_seed(3)
        return [torch.randn(SHAPE, generator=g, dtype=TORCH[dtype]).numpy() if t > 0 else np.zeros(SHAPE, dtype)
                for t in ours.timesteps]

    def kwargs(dtype):
        g = torch.Generator().manual_seed(3)
        return lambda i: {"generator": g}

    check_parity(ours, make_ref, initial(), noise=noise, kwargs=kwargs)


TORCH = {np.float32: torch.float32, np.float64: torch.float64}


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
    draws = [np.random.default_rng(100 + i).standard_normal(SHAPE) for i in range(STEPS)]

    def noise(dtype):
        return [d.astype(dtype) for d in draws] if eta else None

    def kwargs(dtype):
        return (lambda i: {"eta": eta, "variance_noise": torch.from_numpy(draws[i].astype(dtype))}) if eta else None

    check_parity(ours, make_ref, initial(), noise=noise, kwargs=kwargs, set_alpha_to_one=alpha_one)


def euler_reference(timesteps: np.ndarray, x: np.ndarray, prediction_type: str) -> list[np.ndarray]:
    """Euler steps in float64 (diffusers' Euler step casts the sample to float32, and its float32 sigmas are 3e-4 off
    near t = 0, so it cannot serve as a float64 reference): sigma = sqrt((1 - alpha_bar) / alpha_bar) interpolated
    linearly at the timesteps, then 0; x_0 from the prediction; x += (x - x_0) / sigma * (sigma_next - sigma)."""
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
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.timesteps, np.linspace(0, 999, STEPS)[::-1], rtol=1e-6)
    assert ours.spec.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert ours.spec.init_noise_sigma == pytest.approx(157.4, abs=0.05)  # spec 4.1: sigma_max for linear betas
    check_parity(ours, make_ref, initial(ours.spec.init_noise_sigma),
                 run64=lambda x0: euler_reference(np.linspace(0, 999, STEPS)[::-1], x0, prediction_type))


def respaced_ddim_reference(x: np.ndarray, num_steps: int) -> list[np.ndarray]:
    """guided-diffusion DDIM (eta 0, eps-prediction, clip_denoised False) over a respaced linear schedule, in float64,
    written from the spec: keep the steps round(k * 999 / (n - 1)), rebuild the chain's betas from the kept
    alpha_bars, run DDIM on the short chain, and give the model the original timestep of each kept step."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    kept = [int(round(k * 999 / (num_steps - 1))) for k in range(num_steps)]
    new_betas, last = [], 1.0
    for t in kept:
        new_betas.append(1 - abar[t] / last)
        last = abar[t]
    chain = np.cumprod(1 - np.asarray(new_betas))
    chain_prev = np.append(1.0, chain[:-1])
    c, d, z = fake_model(num_steps)
    x = x.astype(np.float64)
    traj = []
    for i, j in enumerate(reversed(range(num_steps))):  # j: index in the short chain
        t_model = kept[j]
        assert abs(chain[j] - abar[t_model]) < 1e-12
        eps = c[i] * x + d[i] * z[i].astype(np.float64)
        x0 = np.sqrt(1 / chain[j]) * x - np.sqrt(1 / chain[j] - 1) * eps
        eps = (np.sqrt(1 / chain[j]) * x - x0) / np.sqrt(1 / chain[j] - 1)
        x = x0 * np.sqrt(chain_prev[j]) + np.sqrt(1 - chain_prev[j]) * eps
        traj.append(x.copy())
    return traj


def test_respaced_ddim_matches_reference():
    ours = make_sampler("ddim_respaced", STEPS, **LINEAR)
    ts = ours.timesteps.astype(int).tolist()
    assert ts[::-1][:6] == [0, 20, 41, 61, 82, 102] and ts[0] == 999 and len(set(ts)) == STEPS
    x0 = initial()
    assert worst(ours_trajectory(ours, x0), respaced_ddim_reference(x0, STEPS)) <= TOL


def test_classifier_free_guidance_order():
    cond, uncond = jnp.full((2, 3), 2.0), jnp.full((2, 3), 1.0)
    # base / VSR batches are [uncond, cond]; interpolation batches are [cond, uncond]
    np.testing.assert_allclose(classifier_free_guidance(jnp.stack([uncond, cond], 1), 7.5, cond_first=False), 8.5)
    np.testing.assert_allclose(classifier_free_guidance(jnp.stack([cond, uncond], 1), 4.0, cond_first=True), 5.0)


def test_alphas_match_diffusers_schedules():
    for schedule in ("linear", "scaled_linear"):
        ref = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=1e-4, beta_end=0.02)
        ours = alphas_cumprod(make_betas(schedule, 1e-4, 0.02))
        assert rel_err(make_betas(schedule, 1e-4, 0.02), ref.betas.numpy()) < 1e-6
        assert np.max(np.abs(ours - ref.alphas_cumprod.numpy().astype(np.float64)) / ours) < 1e-6


def test_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler 'pndm'"):
        make_sampler("pndm", 10)
    with pytest.raises(ValueError, match="prediction_type"):
        make_sampler("ddim", 10, prediction_type="sample")
    with pytest.raises(ValueError, match="steps must be an int in 1..1000"):
        make_sampler("ddpm", 0)
    with pytest.raises(ValueError, match="steps_offset"):
        make_sampler("ddim", 50, steps_offset=20)  # 980 + 20 is past the last training timestep
