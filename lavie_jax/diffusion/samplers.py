"""Samplers as pure functions: per-step scalar tables (host, numpy) and one jax update rule per sampler.

Each sampler reproduces the arithmetic of the library the official stage runs (diffusers 0.16 for base and VSR,
guided-diffusion for interpolation), so sampling an official checkpoint follows the official trajectory, not merely
the same math:
- the per-step scalars are computed on the host in that library's precision and operation order: float32 from a
  float32 alpha_bar for diffusers' DDPM / DDIM / Euler, float64 tables cast to float32 for guided-diffusion's
  respaced DDIM (see `schedules`);
- `step` then applies them to the arrays in the library's order, in float32. XLA may contract a multiply and an
  add into one FMA and turns a division by a scalar into a multiplication by its reciprocal, so results differ
  from torch in the last bit of some elements; over 50 steps that stays within 1e-6 (tests/diffusion).

A `Sampler` is a static `SamplerSpec` (hashable: a jit static argument) plus `tables`, a dict of `[num_steps]`
float32 arrays in the order the steps run: `timestep` (what the model receives), `input_div` (the model sees
`x / input_div`) and the scalars of the sampler's rule (listed in `step`). `sample_loop` runs a stretch of steps
(all of them by default) as one `lax.scan` over the rows.

Samplers (the names the stage configs use):
- 'ddpm': diffusers' ancestral DDPM with the `fixed_small` variance; the previous timestep is the next one in the
  list, alpha_bar_prev = 1 after the last; fresh noise when t > 0 (official base stage).
- 'ddim': diffusers' DDIM (eta >= 0); the previous timestep is t - T // n, alpha_bar_prev = alpha_bar[0] below 0
  unless `set_alpha_to_one` (official VSR stage, and the base stage's 'ddim' option).
- 'ddim_respaced': guided-diffusion's DDIM over a respaced chain, epsilon-prediction; the model sees the original
  t, alpha_bar_prev is the alpha_bar of the next kept timestep, 1 after the last (official interpolation stage).
- 'ddpm_respaced': guided-diffusion's ancestral `p_sample` over a respaced chain, epsilon-prediction, FIXED_LARGE
  variance (the chain's [posterior variance 1, beta_1, beta_2, ...]), no noise at the last step; the model sees the
  original t (SEINE, the i2v stage: `create_diffusion("250")`).
- 'euler': diffusers' EulerDiscrete: Euler steps of dx/dsigma = (x - x_0) / sigma; the model input is
  x / sqrt(sigma^2 + 1) (the base stage's 'eulerdiscrete' option).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lavie_jax.diffusion import schedules

SAMPLERS = ("ddpm", "ddim", "ddim_respaced", "ddpm_respaced", "euler")
RESPACED = ("ddim_respaced", "ddpm_respaced")  # guided-diffusion's chains: epsilon-prediction only
PREDICTION_TYPES = ("epsilon", "v_prediction")
_F32 = np.float32
_ONE = _F32(1.0)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The static part of a sampler: its name, prediction type, initial noise scale and whether steps draw noise."""

    name: str
    prediction_type: str
    init_noise_sigma: float
    stochastic: bool  # DDPM, DDIM with eta > 0


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler for one number of steps: `spec` and per-step `tables` (see the module docstring)."""

    spec: SamplerSpec
    tables: dict[str, np.ndarray]

    @property
    def num_steps(self) -> int:
        return int(self.tables["timestep"].shape[0])

    @property
    def timesteps(self) -> np.ndarray:
        return self.tables["timestep"]


def make_sampler(name: str, num_steps: int, *, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, num_train_timesteps: int = 1000, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0, eta: float = 0.0,
                 set_alpha_to_one: bool = False) -> Sampler:
    """Build sampler `name` (one of SAMPLERS) for `num_steps` steps; see the module docstring for each rule.

    `timestep_spacing` and `steps_offset` apply to 'ddpm', 'ddim' and 'euler' ('ddim_respaced' has its own
    spacing); `eta` to the DDIM kinds; `set_alpha_to_one` to 'ddim'.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if name in RESPACED:
        if prediction_type != "epsilon":
            raise ValueError(f"the {name} sampler (guided-diffusion) predicts epsilon only; use sampler 'ddim' "
                             "for v_prediction")
        betas = schedules.make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
        return _respaced_ddim(num_steps, betas, eta) if name == "ddim_respaced" else _respaced_ddpm(num_steps, betas)
    abar = schedules.diffusers_alphas_cumprod(beta_schedule, beta_start, beta_end, num_train_timesteps)
    if name == "euler":
        return _euler(num_steps, abar, prediction_type, timestep_spacing, steps_offset)
    ts = schedules.spaced_timesteps(num_steps, num_train_timesteps, timestep_spacing, steps_offset)
    a = abar[ts]
    if name == "ddpm":  # diffusers' DDPMScheduler.step and _get_variance, in their order
        prev = np.append(ts[1:], -1)
        a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], _ONE)
        b, b_prev = _ONE - a, _ONE - a_prev
        current_alpha = a / a_prev
        current_beta = _ONE - current_alpha
        c0 = (np.sqrt(a_prev) * current_beta) / b
        cs = np.sqrt(current_alpha) * b_prev / b
        variance = np.maximum((_ONE - a_prev) / (_ONE - a) * (_ONE - a / a_prev), _F32(1e-20))
        std = np.where(ts > 0, np.sqrt(variance), _F32(0.0))
        return _sampler(name, prediction_type, 1.0, True, ts, dict(sa=np.sqrt(a), sb=np.sqrt(b), c0=c0, cs=cs,
                                                                   std=std))
    # DDIM: diffusers' DDIMScheduler.step and _get_variance
    prev = ts - num_train_timesteps // num_steps
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], _ONE if set_alpha_to_one else abar[0])
    b = _ONE - a
    variance = ((_ONE - a_prev) / b) * (_ONE - a / a_prev)
    std = _F32(eta) * np.sqrt(variance)
    c_dir = np.sqrt(np.maximum(_ONE - a_prev - std ** 2, _F32(0.0)))
    return _sampler(name, prediction_type, 1.0, eta > 0, ts, dict(sa=np.sqrt(a), sb=np.sqrt(b),
                                                                  sa_prev=np.sqrt(a_prev), c_dir=c_dir, std=std))


def _euler(num_steps: int, abar: np.ndarray, prediction_type: str, spacing: str, steps_offset: int) -> Sampler:
    """diffusers' EulerDiscreteScheduler (no churn, 'linear' sigma interpolation, final sigma 0)."""
    ts = schedules.continuous_timesteps(num_steps, len(abar), spacing, steps_offset)
    sigmas = schedules.euler_sigmas(abar, ts)
    sigma, dt = sigmas[:-1], sigmas[1:] - sigmas[:-1]
    v_div = sigma ** 2 + _ONE
    # diffusers: the initial noise scale is sigma_max for 'linspace'/'trailing', sqrt(sigma_max^2 + 1) otherwise
    init = sigmas.max() if spacing in ("linspace", "trailing") else np.sqrt(sigmas.max() ** 2 + _ONE)
    return _sampler("euler", prediction_type, float(init), False, ts,
                    dict(sigma=sigma, dt=dt, v_scale=-sigma / np.sqrt(v_div), v_div=v_div), input_div=np.sqrt(v_div))


def _respaced_ddim(num_steps: int, betas: np.ndarray, eta: float) -> Sampler:
    """guided-diffusion's SpacedDiffusion + ddim_sample: the kept steps' alpha_bars become a short chain (rebuilt
    through its betas, in float64); each step's scalars are cast to float32 and combined in float32."""
    base = schedules.alphas_cumprod(betas)
    kept = schedules.respaced_timesteps(num_steps, len(betas))[::-1]  # ascending, as the chain is built
    chain_betas, last = [], 1.0
    for t in kept:
        chain_betas.append(1.0 - base[t] / last)
        last = base[t]
    chain = np.cumprod(1.0 - np.asarray(chain_betas))
    chain_prev = np.append(1.0, chain[:-1])
    recip, recipm1 = np.sqrt(1.0 / chain), np.sqrt(1.0 / chain - 1)
    a, a_prev = chain.astype(_F32), chain_prev.astype(_F32)
    sigma = _F32(eta) * np.sqrt((_ONE - a_prev) / (_ONE - a)) * np.sqrt(_ONE - a / a_prev)
    c_dir = np.sqrt(np.maximum(_ONE - a_prev - sigma ** 2, _F32(0.0)))
    std = np.where(np.arange(num_steps) > 0, sigma, _F32(0.0))  # no noise at the chain's step 0
    rows = dict(recip=recip.astype(_F32), recipm1=recipm1.astype(_F32), sa_prev=np.sqrt(a_prev), c_dir=c_dir, std=std)
    return _sampler("ddim_respaced", "epsilon", 1.0, eta > 0, kept[::-1], {k: v[::-1] for k, v in rows.items()})


def _respaced_ddpm(num_steps: int, betas: np.ndarray) -> Sampler:
    """guided-diffusion's SpacedDiffusion + p_sample (FIXED_LARGE, clip_denoised False): the chain's tables in
    float64, each cast to float32 as `_extract_into_tensor` does; std = exp(0.5 * log variance) in float32."""
    base = schedules.alphas_cumprod(betas)
    kept = schedules.respaced_timesteps(num_steps, len(betas))[::-1]
    chain_betas, last = [], 1.0
    for t in kept:
        chain_betas.append(1.0 - base[t] / last)
        last = base[t]
    chain_betas = np.asarray(chain_betas)
    chain = np.cumprod(1.0 - chain_betas)
    chain_prev = np.append(1.0, chain[:-1])
    posterior_variance = chain_betas * (1.0 - chain_prev) / (1.0 - chain)
    log_variance = np.log(np.append(posterior_variance[1], chain_betas[1:]))  # FIXED_LARGE
    c1 = chain_betas * np.sqrt(chain_prev) / (1.0 - chain)
    c2 = (1.0 - chain_prev) * np.sqrt(1.0 - chain_betas) / (1.0 - chain)
    std = np.exp(_F32(0.5) * log_variance.astype(_F32))
    std = np.where(np.arange(num_steps) > 0, std, _F32(0.0))  # no noise at the chain's step 0
    rows = dict(recip=np.sqrt(1.0 / chain).astype(_F32), recipm1=np.sqrt(1.0 / chain - 1).astype(_F32),
                c1=c1.astype(_F32), c2=c2.astype(_F32), std=std.astype(_F32))
    return _sampler("ddpm_respaced", "epsilon", 1.0, True, kept[::-1], {k: v[::-1] for k, v in rows.items()})


def _sampler(name: str, prediction_type: str, init: float, stochastic: bool, timestep: np.ndarray,
             scalars: dict[str, np.ndarray], input_div: np.ndarray | None = None) -> Sampler:
    for key, value in scalars.items():
        assert value.dtype == _F32, (key, value.dtype)  # every scalar was formed in float32, as the library does
    tables = dict(timestep=np.asarray(timestep, _F32),
                  input_div=np.ones(len(timestep), _F32) if input_div is None else input_div, **scalars)
    return Sampler(SamplerSpec(name, prediction_type, init, stochastic), tables)


def step(spec: SamplerSpec, row: Mapping[str, jax.Array], x: jax.Array, model_output: jax.Array,
         noise: jax.Array | None = None) -> jax.Array:
    """One update with the scalars of one step (`row`: scalars of the tables): `x [...] -> x_prev [...]`.

    The operations are those of the official library's step, in its order (v: v_prediction, out: model output):
    ddpm: x0 = (x - sb * out) / sa [v: sa * x - sb * out]; x_prev = c0 * x0 + cs * x + std * noise.
    ddim: x0 as ddpm, eps = out [v: sa * out + sb * x]; x_prev = sa_prev * x0 + c_dir * eps (+ std * noise).
    ddim_respaced: x0 = recip * x - recipm1 * out; eps = (recip * x - x0) / recipm1;
      x_prev = x0 * sa_prev + c_dir * eps (+ std * noise).
    ddpm_respaced: x0 as ddim_respaced; x_prev = c1 * x0 + c2 * x + std * noise.
    euler: x0 = x - sigma * out [v: out * v_scale + x / v_div]; x_prev = x + (x - x0) / sigma * dt.
    """
    if spec.stochastic and noise is None:
        raise ValueError(f"the {spec.name} sampler adds fresh noise each step; pass `noise` shaped like x")
    v = spec.prediction_type == "v_prediction"
    r = row
    if spec.name == "euler":
        x0 = model_output * r["v_scale"] + x / r["v_div"] if v else x - r["sigma"] * model_output
        return x + (x - x0) / r["sigma"] * r["dt"]
    if spec.name == "ddim_respaced":
        x0 = r["recip"] * x - r["recipm1"] * model_output
        out = x0 * r["sa_prev"] + r["c_dir"] * ((r["recip"] * x - x0) / r["recipm1"])
    elif spec.name == "ddpm_respaced":
        x0 = r["recip"] * x - r["recipm1"] * model_output
        out = r["c1"] * x0 + r["c2"] * x
    else:
        x0 = r["sa"] * x - r["sb"] * model_output if v else (x - r["sb"] * model_output) / r["sa"]
        if spec.name == "ddpm":
            out = r["c0"] * x0 + r["cs"] * x
        else:
            eps = r["sa"] * model_output + r["sb"] * x if v else model_output
            out = r["sa_prev"] * x0 + r["c_dir"] * eps
    if spec.stochastic:
        out = out + r["std"] * noise
    return out


ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (scaled x, timestep, step index) -> output
NoiseFn = Callable[[jax.Array], jax.Array]  # step index -> noise shaped like x


def sample_loop(spec: SamplerSpec, tables: Mapping[str, jax.Array], x: jax.Array, model_fn: ModelFn,
                noise_fn: NoiseFn | None = None, *, start: jax.Array | int = 0, num_steps: int | None = None
                ) -> jax.Array:
    """Run steps `start .. start + num_steps - 1` of a sampler (default: all) as one `lax.scan`, inside `jax.jit`.

    `x` is the sample before step `start` (before step 0: the initial noise, already multiplied by
    `spec.init_noise_sigma`); `model_fn(x / input_div, t, i)` predicts epsilon or v; `noise_fn(i)` gives step i's
    fresh noise (stochastic samplers only). `start` may be traced, so one compiled program runs any stretch of
    `num_steps` steps: callers that must stay interruptible run the loop a few steps per call.
    """
    if spec.stochastic and noise_fn is None:
        raise ValueError(f"the {spec.name} sampler is stochastic: pass noise_fn")
    tables = {k: jnp.asarray(v, jnp.float32) for k, v in tables.items()}
    total = tables["timestep"].shape[0]
    num_steps = total if num_steps is None else num_steps
    if not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must be in 1..{total}, got {num_steps}")
    index = jnp.asarray(start, jnp.int32) + jnp.arange(num_steps, dtype=jnp.int32)
    rows = {k: jnp.take(v, index) for k, v in tables.items()}

    def body(x, inputs):
        i, row = inputs
        out = model_fn(x / row["input_div"], row["timestep"], i).astype(jnp.float32)
        return step(spec, row, x, out, noise_fn(i) if spec.stochastic else None), None

    x, _ = jax.lax.scan(body, x.astype(jnp.float32), (index, rows))
    return x


def classifier_free_guidance(pairs: jax.Array, scale: jax.Array | float, cond_first: bool) -> jax.Array:
    """Combine model outputs `[N, 2, ...]` (each sample's two rows) into `uncond + scale * (cond - uncond)` `[N, ...]`.

    The row order is the stage's batch order: base and VSR run [uncond, cond] (`cond_first=False`), interpolation
    runs [cond, uncond] (`cond_first=True`), as the official scripts batch them.
    """
    cond, uncond = (pairs[:, 0], pairs[:, 1]) if cond_first else (pairs[:, 1], pairs[:, 0])
    return uncond + scale * (cond - uncond)
