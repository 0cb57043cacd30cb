"""The training step of every stage: one jitted function over a sharded train state and a global batch.

    objective = Objective.from_config(config)                      # static: stage, prediction type, K, alpha, ...
    step_fn = make_train_step(objective, graphdef, tx, lr_at, ema_decay_at, shardings)
    state, metrics = step_fn(state, encoders, batch)               # state donated

Per stage (the stage object assembles the UNet input, `Stage.training_inputs` / `Stage.unet_sample`, as the
samplers assemble it):
- base: epsilon prediction; a joint image-video batch: each clip's F frames plus K still images appended on the frame
  axis (`num_image_frames=K`: spatial layers see them, temporal layers skip them, each with its own caption), loss =
  video MSE + `image_loss_weight` x image MSE.
- interpolation: epsilon prediction on the 4K - 3 frames of a clip; the input is the noisy latents plus the clean
  latents of its K key frames spread by `interpolation.key_frame_condition`; the loss is on the 4 output channels.
- vsr: v-prediction; the low-res clip is noised at a level drawn from [0, `noise_level_max`) with the x4
  upscaler's low-res schedule, and the level is the class label.
Text dropout (classifier-free guidance): each caption (each image caption too) is replaced, with probability
`text_dropout`, by the stage's dropped text (`Stage.dropped_text`). Every random draw of an example (timestep,
noise, posterior sample, dropout, VSR level) comes from the step's key and the example's index in the global batch,
so a step gives the same update on any mesh and with any number of accumulated micro-batches.

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

from lavie_jax.diffusion import losses
from lavie_jax.models.tokens import ATTRIBUTE, with_rows
from lavie_jax.stages import Stage, TrainingInputs
from lavie_jax.stages.vsr import MAX_NOISE_LEVEL
from lavie_jax.train.optim import accumulate_gradients, ema_update, split_micro_batches


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

    stage: Stage
    prediction_type: str
    num_image_frames: int = 0  # base: K still images per clip
    image_loss_weight: float = 1.0
    text_dropout: float = 0.1
    noise_level_max: int = MAX_NOISE_LEVEL
    low_res_schedule: tuple[str, float, float] = ("scaled_linear", 1e-4, 0.02)
    beta_schedule: tuple[str, float, float] = ("linear", 1e-4, 0.02)
    num_train_timesteps: int = 1000
    micro_batches: int = 1
    vae_frame_chunk: int = 4
    vae_scaling_factor: float = 0.18215
    vae_factor: int = 8  # pixels per latent pixel
    i2v_mask_weights: tuple[float, ...] = (0.5, 0.3, 0.2)  # i2v: random masks (lavie_jax.stages.i2v.random_mask)
    i2v_max_given: int = 2

    def tables(self) -> dict[str, np.ndarray]:
        """Host tables the step indexes: forward-diffusion coefficients and the stage's own (`training_tables`: the
        VSR low-res noise coefficients)."""
        out = {f"q_{k}": v for k, v in losses.noise_tables(*self.beta_schedule, self.num_train_timesteps).items()}
        return out | self.stage.training_tables(self)


# Random streams: every draw of an example comes from its own key (the step's key folded with the example's index in
# the global batch) and a stream id, so the draws do not depend on micro-batching or on how the batch is sharded.
# Stages draw from theirs by name (`TrainingInputs`).
STREAMS = {name: i for i, name in enumerate(("latent", "image_latent", "key_latent", "text_drop", "image_text_drop",
                                             "level", "low_res", "timestep", "noise", "mask",
                                             "masked_latent"))}


def _split(tables: Mapping[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
    return {k[len(prefix):]: v for k, v in tables.items() if k.startswith(prefix)}


def _draw(keys: jax.Array, stream: int, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """`fn(key)` for each example's key `keys [b]` folded with `stream`, stacked: `[b, ...]`."""
    return jax.vmap(lambda k: fn(jax.random.fold_in(k, stream)))(keys)


def _dropout(keys: jax.Array, stream: int, values: jax.Array, null: jax.Array, p: float, per_example: int | None
             ) -> jax.Array:
    """Replace rows of `values [b, (K,) ...]` by `null [...]` with probability p each (K rows per example if given)."""
    if p <= 0:
        return values
    shape = () if per_example is None else (per_example,)
    drop = _draw(keys, stream, lambda k: jax.random.bernoulli(k, p, shape))
    drop = drop.reshape(drop.shape + (1,) * (values.ndim - drop.ndim))
    return jnp.where(drop, null.astype(values.dtype), values)


class StageInputs:
    """Turns a micro-batch into `(x_0, condition, text, labels)` for `Stage.unet_sample` and the UNet.

    Pixels are encoded by the frozen VAE (a posterior sample), tokens by the frozen text encoder (after dropout);
    precomputed latents and embeddings are used as they are. The clip and its caption are common to all stages; the
    stage adds the rest (`Stage.training_inputs`). All under `stop_gradient`: the encoders never train.
    """

    def __init__(self, objective: Objective, vae_graphdef: nnx.GraphDef | None, text_graphdef: nnx.GraphDef | None):
        self.o = objective
        self.vae_graphdef, self.text_graphdef = vae_graphdef, text_graphdef

    def _latents(self, encoders: Encoders, pixels: jax.Array, keys: jax.Array, stream: str) -> jax.Array:
        if self.vae_graphdef is None or encoders.vae is None:
            raise ValueError("the batch holds pixels but the run has no VAE: give train.encoders (a pipeline "
                             "directory) or train on precomputed latents (data.dataset='precomputed')")
        vae = nnx.merge(self.vae_graphdef, encoders.vae)
        post = vae.encode(pixels, frame_chunk=self.o.vae_frame_chunk)
        eps = _draw(keys, STREAMS[stream], lambda k: jax.random.normal(k, post.mean.shape[1:], post.mean.dtype))
        return (post.mean + post.std * eps) * vae.scaling_factor

    def _text(self, encoders: Encoders, batch: Mapping[str, jax.Array], keys: jax.Array, stream: str, emb: str,
              tok: str, per_example: int | None = None, learned: Any = None) -> jax.Array:
        """Embeddings `[b, (K,) L, D]` of the captions (precomputed `emb` or tokens `tok`), after text dropout;
        `learned` (a `models.tokens.TextTokens`) replaces its tokens' rows of the encoder's table."""
        p = self.o.text_dropout
        if emb in batch:
            return _dropout(keys, STREAMS[stream], batch[emb].astype(jnp.float32), encoders.null_text, p, per_example)
        tokens = _dropout(keys, STREAMS[stream], batch[tok], encoders.null_tokens, p, per_example)
        if self.text_graphdef is None or encoders.text is None:
            raise ValueError("the batch holds tokens but the run has no text encoder")
        encoder = nnx.merge(self.text_graphdef, encoders.text)
        if learned is not None:
            encoder = with_rows(encoder, learned.ids, learned.embedding[...])
        out = encoder(tokens.reshape(-1, tokens.shape[-1])).last_hidden_state.astype(jnp.float32)
        return out.reshape(*tokens.shape[:-1], *out.shape[1:])

    def __call__(self, encoders: Encoders, batch: Mapping[str, jax.Array], tables: Mapping[str, jax.Array],
                 keys: jax.Array, learned: Any = None
                 ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
        """`learned`: the run's learned token rows (`models.tokens.TextTokens`, trained): the text then keeps
        their gradient (the encoders' own params never get one: they are not the differentiated argument)."""
        stage = self.o.stage
        x0 = batch["latents"] if "latents" in batch else self._latents(encoders, batch[stage.pixel_key], keys,
                                                                        "latent")
        text = self._text(encoders, batch, keys, "text_drop", "text_emb", "tokens", learned=learned)
        inputs = TrainingInputs(
            batch=batch, latents=lambda pixels, stream: self._latents(encoders, pixels, keys, stream),
            text=lambda stream, emb, tok, per_example=None: self._text(encoders, batch, keys, stream, emb, tok,
                                                                       per_example, learned=learned),
            draw=lambda stream, fn: _draw(keys, STREAMS[stream], fn), tables=tables, settings=self.o)
        x0, condition, text, labels = stage.training_inputs(inputs, x0, text)
        sg = jax.lax.stop_gradient
        return (sg(x0.astype(jnp.float32)), None if condition is None else sg(condition),
                text if learned is not None else sg(text), labels)


def stage_loss(objective: Objective, graphdef: nnx.GraphDef, inputs: StageInputs):
    """`loss_fn(params, frozen, encoders, tables, micro_batch, key, timestep=None) -> (loss, aux)` of the stage; the
    micro-batch carries `index [b]`, each example's position in the global batch (its random draws come from it).
    `timestep` (fixed timesteps `[T]`, for held-out evaluation) replaces the drawn ones: the inputs are encoded and
    the noise drawn once, the UNet runs at each timestep in turn, and loss and aux get a leading axis `[T]`."""
    o = objective

    def loss_fn(params, frozen, encoders, tables, batch, key, timestep=None):
        batch = dict(batch)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch.pop("index"))
        unet = nnx.merge(graphdef, params, frozen)
        x0, condition, text, labels = inputs(encoders, batch, tables, keys, getattr(unet, ATTRIBUTE, None))
        drawn = (_draw(keys, STREAMS["timestep"],
                       lambda k: jax.random.randint(k, (), 0, o.num_train_timesteps, dtype=jnp.int32))
                 if timestep is None else None)
        noise = _draw(keys, STREAMS["noise"], lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))
        q = _split(tables, "q_")

        def at(t):  # [b] timesteps -> (loss, aux)
            sample = o.stage.unet_sample(losses.q_sample(x0, noise, t, q), condition)
            pred = unet(sample, t, text, labels, num_image_frames=o.num_image_frames)
            video, images = losses.frame_mse(pred, losses.target(o.prediction_type, x0, noise, t, q),
                                             o.num_image_frames)
            loss = video if images is None else video + o.image_loss_weight * images
            return loss, {"video_loss": video} | ({} if images is None else {"image_loss": images})

        if timestep is None:
            return at(drawn)
        # one UNet in the program, run at each timestep (unrolled, 5 of them took XLA as long to compile as a step)
        return jax.lax.map(lambda s: at(jnp.full(keys.shape[:1], s, jnp.int32)), jnp.asarray(timestep, jnp.int32))

    return loss_fn


def train_step(state: TrainState, encoders: Encoders, tables: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array], *, objective: Objective, loss_fn: Callable,
               tx: optax.GradientTransformation, lr_at: Callable, ema_decay_at: Callable | None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update over a global batch `{key: [B, ...]}`, run as `objective.micro_batches` accumulated
    micro-batches (which gives the update of the whole batch: every example draws its own randomness)."""
    key = jax.random.fold_in(state.rng, state.step)
    size = jax.tree.leaves(batch)[0].shape[0]
    micro = split_micro_batches(dict(batch, index=jnp.arange(size, dtype=jnp.int32)), objective.micro_batches)

    def grad_fn(params, micro_batch):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, state.frozen, encoders, tables, micro_batch, key)

    (loss, aux), grads = accumulate_gradients(grad_fn, state.params, micro)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema if ema_decay_at is None else ema_update(state.ema, params, ema_decay_at(state.step))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_at(state.step), **aux}
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, frozen=state.frozen,
                     rng=state.rng)
    return new, metrics
