"""Samplers as pure functions: per-step coefficient tables (host, float64) and one jax update rule.

Every sampler LaVie uses (DDPM, DDIM, guided-diffusion's respaced DDIM, Euler; epsilon- or v-prediction; no clipping)
makes a step that is linear in the current sample x_t, the model output and fresh noise:

    x_prev = coef_x * x_t + coef_out * model_output + noise_std * noise

so `make_sampler` derives the three coefficients of every step on the host in float64 (the derivations are below) and
rounds them to float32 once, and `step` is a single fused multiply-add. This is more accurate than evaluating the
textbook formulas in float32, which cancel badly near t = 0 (1 - alpha_bar_t / alpha_bar_prev ~ 4e-3 at t = 20).

A `Sampler` is a static `SamplerSpec` (hashable: a jit static argument) plus `tables`, a dict of `[num_steps]`
float32 arrays in the order the steps run: `timestep` (what the model receives), `input_scale` (the model sees
`x * input_scale`), `coef_x`, `coef_out`, `noise_std`. `sample_loop` runs all steps as one `lax.scan` over the rows.

Samplers (the names the stage configs use; see ../shared/spec/lavie.md section 4):
- 'ddpm': ancestral DDPM with the `fixed_small` variance; the previous timestep is the next one in the list and
  alpha_bar_prev = 1 after the last; fresh noise when t > 0 (official base stage).
- 'ddim': DDIM (eta >= 0); the previous timestep is t - T // n, alpha_bar_prev = alpha_bar[0] below 0 unless
  `set_alpha_to_one` (official VSR stage, and the base stage's 'ddim' option).
- 'ddim_respaced': guided-diffusion's DDIM over a respaced chain; the model sees the original t, alpha_bar_prev is
  the alpha_bar of the next timestep in the list, 1 after the last (official interpolation stage).
- 'euler': Euler steps of dx/dsigma = (x - x_0) / sigma; the model input is x / sqrt(sigma^2 + 1) (the base stage's
  'eulerdiscrete' option).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lavie_jax.diffusion import schedules

SAMPLERS = ("ddpm", "ddim", "ddim_respaced", "euler")
PREDICTION_TYPES = ("epsilon", "v_prediction")


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
    v = prediction_type == "v_prediction"
    abar = schedules.alphas_cumprod(schedules.make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps))
    if name == "euler":
        ts = schedules.continuous_timesteps(num_steps, num_train_timesteps, timestep_spacing, steps_offset)
        sig = schedules.euler_sigmas(abar, ts)
        s, dt = sig[:-1], sig[1:] - sig[:-1]
        # x_0 = x - s * eps, or (x - s * v * sqrt(s^2 + 1)) / (s^2 + 1) for v (x is in sigma space), so
        # (x - x_0) / s = eps, or (s * x + sqrt(s^2 + 1) * v) / (s^2 + 1)
        coef_x = 1 + dt * s / (s ** 2 + 1) if v else np.ones_like(s)
        coef_out = dt / np.sqrt(s ** 2 + 1) if v else dt
        # diffusers: the initial noise scale is sigma_max for 'linspace'/'trailing', sqrt(sigma_max^2 + 1) otherwise
        init = sig.max() if timestep_spacing in ("linspace", "trailing") else np.sqrt(sig.max() ** 2 + 1)
        return _sampler(name, prediction_type, float(init), False, ts, 1 / np.sqrt(s ** 2 + 1), coef_x, coef_out,
                        np.zeros_like(s))

    if name == "ddim_respaced":
        ts = schedules.respaced_timesteps(num_steps, num_train_timesteps)
    else:
        ts = schedules.spaced_timesteps(num_steps, num_train_timesteps, timestep_spacing, steps_offset)
    if name == "ddim":
        prev = ts - num_train_timesteps // num_steps
        below = 1.0 if set_alpha_to_one else abar[0]
    else:  # ddpm, ddim_respaced: the next timestep in the list, then alpha_bar = 1
        prev = np.append(ts[1:], -1)
        below = 1.0
    a = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], below)
    sa, sn = np.sqrt(a), np.sqrt(1 - a)
    # the model output gives x_0 = cx0_x * x + cx0_out * out and eps = ceps_x * x + ceps_out * out:
    # epsilon: x_0 = (x - sn * out) / sa, eps = out; v: x_0 = sa * x - sn * out, eps = sn * x + sa * out
    cx0_x, cx0_out = (sa, -sn) if v else (1 / sa, -sn / sa)
    ceps_x, ceps_out = (sn, sa) if v else (np.zeros_like(a), np.ones_like(a))
    beta = 1 - a / a_prev  # the effective beta of the jump t -> prev
    variance = (1 - a_prev) / (1 - a) * beta
    if name == "ddpm":
        # posterior mean: coef_x0 * x_0 + coef_xt * x, with fixed_small noise (diffusers clamps the variance at 1e-20)
        coef_x0, coef_xt = np.sqrt(a_prev) * beta / (1 - a), np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        std = np.where(ts > 0, np.sqrt(np.maximum(variance, 1e-20)), 0.0)
        return _sampler(name, prediction_type, 1.0, True, ts, np.ones_like(a), coef_x0 * cx0_x + coef_xt,
                        coef_x0 * cx0_out, std)
    # DDIM (eq. 12 of 2010.02502): sqrt(a_prev) * x_0 + sqrt(1 - a_prev - std^2) * eps + std * noise
    std = eta * np.sqrt(variance)
    c_dir = np.sqrt(np.maximum(1 - a_prev - std ** 2, 0.0))
    return _sampler(name, prediction_type, 1.0, eta > 0, ts, np.ones_like(a),
                    np.sqrt(a_prev) * cx0_x + c_dir * ceps_x, np.sqrt(a_prev) * cx0_out + c_dir * ceps_out, std)


def _sampler(name: str, prediction_type: str, init: float, stochastic: bool, timestep, input_scale, coef_x,
             coef_out, noise_std) -> Sampler:
    tables = dict(timestep=timestep, input_scale=input_scale, coef_x=coef_x, coef_out=coef_out, noise_std=noise_std)
    return Sampler(SamplerSpec(name, prediction_type, init, stochastic),
                   {k: np.asarray(v, np.float64).astype(np.float32) for k, v in tables.items()})


def step(spec: SamplerSpec, row: Mapping[str, jax.Array], x: jax.Array, model_output: jax.Array,
         noise: jax.Array | None = None) -> jax.Array:
    """One update with the coefficients of one step (`row`: scalars of the tables): `x [...] -> x_prev [...]`."""
    out = row["coef_x"] * x + row["coef_out"] * model_output
    if spec.stochastic:
        if noise is None:
            raise ValueError(f"the {spec.name} sampler adds fresh noise each step; pass `noise` shaped like x")
        out = out + row["noise_std"] * noise
    return out


ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (scaled x, timestep, step index) -> output
NoiseFn = Callable[[jax.Array], jax.Array]  # step index -> noise shaped like x


def sample_loop(spec: SamplerSpec, tables: Mapping[str, jax.Array], x_init: jax.Array, model_fn: ModelFn,
                noise_fn: NoiseFn | None = None, callback: Callable[[jax.Array], None] | None = None) -> jax.Array:
    """Run every step of a sampler as one `lax.scan` (call it inside `jax.jit`): returns x after the last step.

    `x_init` is the starting sample, already multiplied by `spec.init_noise_sigma`; `model_fn(x * input_scale, t, i)`
    predicts epsilon or v; `noise_fn(i)` gives step i's fresh noise (stochastic samplers only); `callback(i)` runs on
    the host after step i (an unordered `jax.debug.callback`: progress bars; works on multi-device meshes).
    """
    if spec.stochastic and noise_fn is None:
        raise ValueError(f"the {spec.name} sampler is stochastic: pass noise_fn")
    tables = {k: jnp.asarray(v, jnp.float32) for k, v in tables.items()}
    num_steps = tables["timestep"].shape[0]

    def body(x, inputs):
        i, row = inputs
        out = model_fn(x * row["input_scale"], row["timestep"], i).astype(jnp.float32)
        x = step(spec, row, x, out, noise_fn(i) if spec.stochastic else None)
        if callback is not None:
            jax.debug.callback(callback, i)
        return x, None

    x, _ = jax.lax.scan(body, x_init.astype(jnp.float32), (jnp.arange(num_steps), tables))
    return x


def classifier_free_guidance(pairs: jax.Array, scale: jax.Array | float, cond_first: bool) -> jax.Array:
    """Combine model outputs `[N, 2, ...]` (each sample's two rows) into `uncond + scale * (cond - uncond)` `[N, ...]`.

    The row order is the stage's batch order: base and VSR run [uncond, cond] (`cond_first=False`), interpolation
    runs [cond, uncond] (`cond_first=True`); see ../shared/spec/lavie.md section 8.
    """
    cond, uncond = (pairs[:, 0], pairs[:, 1]) if cond_first else (pairs[:, 1], pairs[:, 0])
    return uncond + scale * (cond - uncond)
