"""The training step of every stage: one jitted function over a sharded train state and a global batch.

    objective = Objective.from_config(config)                      # static: stage, prediction type, K, alpha, ...
    step_fn = make_train_step(objective, graphdef, tx, lr_at, ema_decay_at, shardings)
    state, metrics = step_fn(state, encoders, batch)               # state donated

Per stage (the UNet input is assembled by `lavie_jax.stages`, as the samplers assemble it):
- base: epsilon prediction; a joint image-video batch: each clip's F frames plus K still images appended on the frame
  axis (`num_image_frames=K`: spatial layers see them, temporal layers skip them, each with its own caption), loss =
  video MSE + `image_loss_weight` x image MSE.
- interpolation: epsilon prediction on the 4K - 3 frames of a clip; the input is the noisy latents plus the clean
  latents of its K key frames spread by `stages.key_frame_condition`; the loss is on the 4 output channels.
- vsr: v-prediction; the low-res clip is noised at a level drawn from [0, `noise_level_max`) with the x4
  upscaler's low-res schedule, and the level is the class label.
Text dropout (classifier-free guidance): each caption (each image caption too) is replaced, with probability
`text_dropout`, by the stage's dropped text (`stages.DROPPED_TEXT`).

Batches come from `lavie_jax.data.pipeline` on the mesh: pixels in [-1, 1] (`video`, `images`, `key_frames`, `hr`,
`lr`) with `tokens` / `image_tokens` from the tokenizer, or precomputed `latents`, `image_latents`, `key_latents`,
`lr`, `text_emb`, `image_text_emb`. The frozen encoders (`Encoders`) turn pixels and tokens into scaled latents
(a posterior sample, as the official scripts use `latent_dist.sample()`) and text embeddings inside the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lavie_jax import stages
from lavie_jax.diffusion import losses
from lavie_jax.diffusion.schedules import diffusers_alphas_cumprod
from lavie_jax.train.optim import accumulate_gradients, ema_update, split_micro_batches

PIXEL_KEYS = {"base": ("video", "images"), "interpolation": ("video", "key_frames"), "vsr": ("hr",)}
TEXT_KEYS = ("tokens", "image_tokens", "text_emb", "image_text_emb")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a run carries from step to step (and saves): step, trained params, optimizer state, EMA of the
    trained params (None without EMA), the frozen UNet params (spatial layers of VSR; empty when all train) and the
    root PRNG key (each step folds its step number in, so a resumed run draws what the uninterrupted one drew)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    frozen: Any
    rng: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Encoders:
    """The frozen models that turn a batch into UNet inputs: VAE and text encoder states (None when the data is
    precomputed), and the dropped text's tokens `[L]` and embedding `[L, D]`."""

    vae: Any
    text: Any
    null_tokens: jax.Array | None
    null_text: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static description of a stage's loss (hashable; everything the step's program depends on)."""

    stage: str
    prediction_type: str
    num_image_frames: int = 0  # base: K still images per clip
    image_loss_weight: float = 1.0
    text_dropout: float = 0.1
    noise_level_max: int = stages.VSR_MAX_NOISE_LEVEL
    low_res_schedule: tuple[str, float, float] = ("scaled_linear", 1e-4, 0.02)
    beta_schedule: tuple[str, float, float] = ("linear", 1e-4, 0.02)
    num_train_timesteps: int = 1000
    micro_batches: int = 1
    vae_frame_chunk: int = 4
    vae_scaling_factor: float = 0.18215

    def tables(self) -> dict[str, np.ndarray]:
        """Host tables the step indexes: forward-diffusion coefficients and the VSR low-res noise coefficients."""
        out = {f"q_{k}": v for k, v in losses.noise_tables(*self.beta_schedule, self.num_train_timesteps).items()}
        if self.stage == "vsr":
            abar = diffusers_alphas_cumprod(*self.low_res_schedule, self.num_train_timesteps)
            out["lr_signal"] = np.sqrt(abar).astype(np.float32)
            out["lr_noise"] = np.sqrt(np.float32(1.0) - abar).astype(np.float32)
        return out


def _split(tables: Mapping[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
    return {k[len(prefix):]: v for k, v in tables.items() if k.startswith(prefix)}


def _dropout(key: jax.Array, values: jax.Array, null: jax.Array, p: float, rows: tuple[int, ...]) -> jax.Array:
    """Replace each row of `values [*rows, ...]` by `null [...]` with probability p."""
    if p <= 0:
        return values
    drop = jax.random.bernoulli(key, p, rows).reshape(rows + (1,) * (values.ndim - len(rows)))
    return jnp.where(drop, null.astype(values.dtype), values)


class StageInputs:
    """Turns a micro-batch into `(x_0, condition, text, labels)` for `stages.unet_sample` and the UNet.

    Pixels are encoded by the frozen VAE, tokens by the frozen text encoder (after dropout); precomputed latents and
    embeddings are used as they are. Everything is under `stop_gradient`: the encoders never train.
    """

    def __init__(self, objective: Objective, vae_graphdef: nnx.GraphDef | None, text_graphdef: nnx.GraphDef | None):
        self.o = objective
        self.vae_graphdef, self.text_graphdef = vae_graphdef, text_graphdef

    def _latents(self, encoders: Encoders, pixels: jax.Array, key: jax.Array) -> jax.Array:
        if self.vae_graphdef is None or encoders.vae is None:
            raise ValueError("the batch holds pixels but the run has no VAE: give train.encoders (a pipeline "
                             "directory) or train on precomputed latents (data.dataset='precomputed')")
        vae = nnx.merge(self.vae_graphdef, encoders.vae)
        post = vae.encode(pixels, frame_chunk=self.o.vae_frame_chunk)
        return post.sample(key) * vae.scaling_factor

    def _text(self, encoders: Encoders, batch: Mapping[str, jax.Array], key: jax.Array, emb: str, tok: str,
              rows: tuple[int, ...]) -> jax.Array:
        """Embeddings `[*rows, L, D]` of the captions (precomputed `emb` or tokens `tok`), after text dropout."""
        p = self.o.text_dropout
        if emb in batch:
            return _dropout(key, batch[emb].astype(jnp.float32), encoders.null_text, p, rows)
        tokens = _dropout(key, batch[tok], encoders.null_tokens, p, rows)
        if self.text_graphdef is None or encoders.text is None:
            raise ValueError("the batch holds tokens but the run has no text encoder")
        encoder = nnx.merge(self.text_graphdef, encoders.text)
        flat = tokens.reshape(-1, tokens.shape[-1])
        out = encoder(flat).last_hidden_state.astype(jnp.float32)
        return out.reshape(*rows, *out.shape[1:])

    def __call__(self, encoders: Encoders, batch: Mapping[str, jax.Array], tables: Mapping[str, jax.Array],
                 key: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
        o = self.o
        k_lat, k_key, k_text, k_img_text, k_level, k_lr = jax.random.split(key, 6)
        sg = jax.lax.stop_gradient
        if o.stage == "vsr":
            x0 = batch["latents"] if "latents" in batch else self._latents(encoders, batch["hr"], k_lat)
        else:
            x0 = batch["latents"] if "latents" in batch else self._latents(encoders, batch["video"], k_lat)
        b, f = x0.shape[:2]
        text = self._text(encoders, batch, k_text, "text_emb", "tokens", (b,))
        condition = labels = None
        if o.stage == "base" and o.num_image_frames:
            k = o.num_image_frames
            images = (batch["image_latents"] if "image_latents" in batch
                      else self._latents(encoders, batch["images"], jax.random.fold_in(k_lat, 1)))
            image_text = self._text(encoders, batch, k_img_text, "image_text_emb", "image_tokens", (b, k))
            x0 = jnp.concatenate([x0, images.astype(x0.dtype)], axis=1)
            text = jnp.concatenate([jnp.repeat(text[:, None], f, axis=1), image_text], axis=1)  # per frame [B, F+K]
        elif o.stage == "interpolation":
            keys = batch["key_latents"] if "key_latents" in batch else self._latents(encoders, batch["key_frames"],
                                                                                      k_key)
            condition = stages.key_frame_condition(keys.astype(jnp.float32))
        elif o.stage == "vsr":
            level = jax.random.randint(k_level, (b,), 0, o.noise_level_max, dtype=jnp.int32)
            lr = batch["lr"].astype(jnp.float32)
            condition = stages.low_res_condition(lr, jax.random.normal(k_lr, lr.shape), jnp.take(tables["lr_signal"],
                                                 level), jnp.take(tables["lr_noise"], level))
            labels = level
        return sg(x0.astype(jnp.float32)), None if condition is None else sg(condition), sg(text), labels


def stage_loss(objective: Objective, graphdef: nnx.GraphDef, inputs: StageInputs):
    """`loss_fn(params, frozen, encoders, tables, micro_batch, key) -> (loss, aux)` of the stage."""
    o = objective

    def loss_fn(params, frozen, encoders, tables, batch, key):
        k_inputs, k_t, k_noise = jax.random.split(key, 3)
        x0, condition, text, labels = inputs(encoders, batch, tables, k_inputs)
        t = losses.sample_timesteps(k_t, x0.shape[0], o.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        q = _split(tables, "q_")
        sample = stages.unet_sample(o.stage, losses.q_sample(x0, noise, t, q), condition)
        unet = nnx.merge(graphdef, params, frozen)
        pred = unet(sample, t, text, labels, num_image_frames=o.num_image_frames)
        video, images = losses.frame_mse(pred, losses.target(o.prediction_type, x0, noise, t, q),
                                         o.num_image_frames)
        loss = video if images is None else video + o.image_loss_weight * images
        aux = {"video_loss": video} | ({} if images is None else {"image_loss": images})
        return loss, aux

    return loss_fn


def train_step(state: TrainState, encoders: Encoders, tables: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array], *, objective: Objective, loss_fn: Callable,
               tx: optax.GradientTransformation, lr_at: Callable, ema_decay_at: Callable | None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update over a global batch (as `objective.micro_batches` accumulated micro-batches)."""
    key = jax.random.fold_in(state.rng, state.step)
    micro = split_micro_batches(dict(batch), objective.micro_batches)

    def grad_fn(params, micro_batch, k):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, state.frozen, encoders, tables, micro_batch, k)

    (loss, aux), grads = accumulate_gradients(grad_fn, state.params, micro, rng=key)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema if ema_decay_at is None else ema_update(state.ema, params, ema_decay_at(state.step))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_at(state.step), **aux}
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, frozen=state.frozen,
                     rng=state.rng)
    return new, metrics
