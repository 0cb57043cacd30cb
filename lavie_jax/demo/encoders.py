"""The demo's frozen components, made on the spot: no pretrained autoencoder or text encoder exists on a fresh
machine, so the demo trains a small KL autoencoder on the dataset's frames and draws a small text encoder at random.

- Autoencoder: the project's `AutoencoderKL` with a small config (the `demo` config's `autoencoder`: f4, no
  attention), trained with L1 + L2 reconstruction, an edge term (L1 of pixel differences) and a small KL term on
  32x32 frames of the low-res dataset and 32x32 crops of the high-res one (whose frames the VSR stage decodes), in
  many small batches, with the posterior starting narrow (docs/demo_quality.md, Shapes). Then its decoder alone
  (the encoder, and so the latents the stages train on, fixed) learns to decode noised latents: a diffusion model's
  latents are not exactly an encoder's, and the first decoder drew their errors as rounded corners and wavy edges
  (`finetune_decoder`). Its `scaling_factor` is set to 1 / std of the latents, as Stable Diffusion's 0.18215 was,
  so the diffusion models see unit-variance latents.
- Text encoder: `text_encoder_config('tiny', 64)`, a 2-layer CLIP text tower, random and never trained; token and
  position embeddings are N(0, 1) (as torch.nn.Embedding) so captions differ clearly. With the real CLIP tokenizer.
  It adds the sum of the caption's token embeddings to every output token (`add_caption_sum`, see
  lavie_jax.models.clip for why): without it the demo's UNets did not learn the direction word.

Both are written as a pipeline directory without a UNet (`vae/`, `text_encoder/`, `tokenizer/`): what the stage
configs' `train.encoders` name, and what `lavie-sample` loads again from each training run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lavie_jax.io import checkpoints
from lavie_jax.models.clip import CLIPTextEncoder, abstract_text_encoder, text_encoder_config
from lavie_jax.models.vae import AutoencoderKL, abstract_vae
from lavie_jax.demo.console import duration
from lavie_jax.io.safe_io import atomic_directory
from lavie_jax.io.store import randomize
from lavie_jax.io.text import default_tokenizer, tokenize

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ frames

def frame_batches(low: np.ndarray, high: np.ndarray, batch: int, crop: int, high_fraction: float, seed: int,
                  shuffle_channels: bool = False) -> Iterator[np.ndarray]:
    """Endless float32 batches `[batch, crop, crop, 3]` in [-1, 1]: whole frames of `low` uint8 `[N, crop, crop, 3]`
    and random crops of `high` uint8 `[M, H, W, 3]` (a `high_fraction` of each batch); `shuffle_channels`: each
    frame's RGB channels in a random order (six colours per palette colour, backgrounds alike)."""
    rng = np.random.default_rng(seed)
    orders = np.array(list(itertools.permutations(range(3))))
    n_high = int(round(batch * high_fraction)) if len(high) else 0
    while True:
        parts = [low[rng.integers(len(low), size=batch - n_high)]]
        if n_high:
            frames = high[rng.integers(len(high), size=n_high)]
            ys = rng.integers(high.shape[1] - crop + 1, size=n_high)
            xs = rng.integers(high.shape[2] - crop + 1, size=n_high)
            parts.append(np.stack([f[y:y + crop, x:x + crop] for f, y, x in zip(frames, ys, xs)]))
        frames = np.concatenate(parts)
        if shuffle_channels:
            frames = np.take_along_axis(frames, orders[rng.integers(len(orders), size=batch)][:, None, None], -1)
        yield frames.astype(np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------ training

def foreground_weights(x: jax.Array, weight: float) -> jax.Array:
    """Per-pixel loss weights `[N, H, W, 1]` of images `x [N, H, W, 3]`: 1 + `weight` x the pixel's distance from
    the mean border colour (in [0, 1]). A shape covers ~5% of a frame: unweighted, the autoencoder spends its first
    few hundred steps reproducing only the background."""
    border = jnp.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1).mean(axis=1)  # [N, 3]
    distance = jnp.linalg.norm(x - border[:, None, None], axis=-1, keepdims=True) / (2 * 3 ** 0.5)
    return 1.0 + weight * distance


def edge_loss(y: jax.Array, x: jax.Array, w: jax.Array) -> jax.Array:
    """L1 between the horizontal and vertical pixel differences of `y` and `x` `[N, H, W, 3]`, weighted by `w`
    `[N, H, W, 1]` (at each difference's second pixel): L1 and L2 of the pixels alone are content with a blurred
    edge, which rounds a square's corners and a triangle's apex at 32x32 (shapes ~8-13 pixels across)."""
    loss = 0.0
    for axis in (1, 2):
        dy, dx = jnp.diff(y, axis=axis), jnp.diff(x, axis=axis)
        wa = jax.lax.slice_in_dim(w, 1, w.shape[axis], axis=axis)
        loss = loss + jnp.mean(wa * jnp.abs(dy - dx)) / jnp.mean(wa)
    return loss


def _reconstruction(y: jax.Array, x: jax.Array, fg_weight: float) -> dict[str, jax.Array]:
    """L1 and L2 per pixel of the reconstruction `y` of `x`, foreground-weighted, and the `edge_loss`."""
    w = jax.lax.stop_gradient(foreground_weights(x, fg_weight))
    l1 = jnp.mean(w * jnp.abs(y - x)) / jnp.mean(w)
    l2 = jnp.mean(w * jnp.square(y - x)) / jnp.mean(w)
    return {"l1": l1, "l2": l2, "edge": edge_loss(y, x, w)}


def _losses(vae: AutoencoderKL, x: jax.Array, key: jax.Array, kl_weight: float, fg_weight: float,
            edge_weight: float) -> tuple[jax.Array, dict]:
    """Reconstruction (L1 + L2 per pixel, foreground-weighted) of a posterior sample, plus `edge_weight` x the
    `edge_loss`, plus `kl_weight` x the KL per latent element."""
    post = vae.encode(x, frame_chunk=None)
    z = post.mean + post.std * jax.random.normal(key, post.mean.shape)
    r = _reconstruction(vae.decode(z, frame_chunk=None), x, fg_weight)
    kl = 0.5 * jnp.mean(jnp.square(post.mean) + jnp.exp(post.logvar) - 1.0 - post.logvar)
    return r["l1"] + r["l2"] + edge_weight * r["edge"] + kl_weight * kl, dict(r, kl=kl)


def _run_steps(step: Callable, params: Any, opt_state: Any, batches: Iterator[np.ndarray], seed: int, steps: int,
               log_every: int, line: Callable[[int, dict[str, float]], str], log: Log) -> tuple[Any, dict[str, float]]:
    """`steps` calls of the jitted `step(params, opt_state, x, key)`, logging `line(step, mean metrics)` with the time
    per step and the ETA every `log_every` steps; returns the params and the last window's mean metrics."""
    key = jax.random.key(seed)
    start, window, metrics = time.perf_counter(), [], {}
    for i in range(steps):
        params, opt_state, m = step(params, opt_state, jnp.asarray(next(batches)), jax.random.fold_in(key, i))
        window.append(m)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            metrics = {k: float(np.mean([float(w[k]) for w in window])) for k in window[0]}
            window.clear()
            per_step = (time.perf_counter() - start) / (i + 1)
            log(f"{line(i + 1, metrics)} | {per_step:.2f} s/step | ETA {duration(per_step * (steps - i - 1))}")
    return params, metrics


def init_autoencoder(config: dict[str, Any], seed: int, logvar_init: float = 0.0) -> AutoencoderKL:
    """Host-drawn random weights (`randomize`) with every resnet's last conv at zero: each residual block starts as
    the identity, which gets the small network past reproducing only the background sooner. The posterior's
    log-variance starts around `logvar_init` (the bias of the last encoder conv's log-variance half): at 0 the first
    steps decode unit noise, larger than the latents' own spread, and the short training spends itself shrinking it."""
    vae = randomize(abstract_vae(config), seed)
    state = nnx.state(vae, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if path[-2:] == ("conv2", "kernel"):
            var.set_value(jnp.zeros(var.shape, jnp.float32))
    nnx.update(vae, state)
    bias = (vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out).bias
    bias.set_value(bias[...].at[bias.shape[-1] // 2:].set(logvar_init))
    return vae


def train_autoencoder(cfg: ml_collections.ConfigDict, low: np.ndarray, high: np.ndarray, *, seed: int = 0,
                      log: Log = print) -> tuple[AutoencoderKL, float, dict[str, Any]]:
    """Train `cfg.vae` (a diffusers AutoencoderKL dict) for `cfg.steps` AdamW steps on frames of `low` and crops of
    `high` (uint8 `[N, H, W, 3]`), then its decoder for `cfg.decoder_steps` (`finetune_decoder`); returns the model
    (its config's scaling_factor still 1), the scaling factor its latents need (`latent_scale` of `low[::8]`; the
    decoder's tuning leaves the encoder, and so this, as it is) and its final losses."""
    vae = init_autoencoder(cfg.vae.to_dict(), seed, float(cfg.logvar_init))
    graphdef, params = nnx.split(vae)
    lr = optax.join_schedules([optax.linear_schedule(cfg.lr / cfg.warmup_steps, cfg.lr, cfg.warmup_steps),
                               optax.cosine_decay_schedule(cfg.lr, cfg.steps - cfg.warmup_steps, cfg.final_lr_ratio)],
                              [cfg.warmup_steps])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    kl_weight, fg_weight, edge_weight = float(cfg.kl_weight), float(cfg.foreground_weight), float(cfg.edge_weight)

    @jax.jit
    def step(params, opt_state, x, key):
        def loss_fn(p):
            return _losses(nnx.merge(graphdef, p), x, key, kl_weight, fg_weight, edge_weight)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(aux, loss=loss)

    batches = frame_batches(low, high, cfg.batch_size, cfg.crop, cfg.high_res_fraction, seed, cfg.shuffle_channels)
    params, metrics = _run_steps(
        step, params, tx.init(params), batches, seed, cfg.steps, cfg.log_every,
        lambda i, m: f"autoencoder step {i}/{cfg.steps} | loss {m['loss']:.4f} | l1 {m['l1']:.4f} | kl {m['kl']:.3f}",
        log)
    nnx.update(vae, params)
    scale = latent_scale(vae, low[::8])
    if cfg.decoder_steps:
        metrics.update(finetune_decoder(vae, cfg, low, high, 1.0 / scale, seed=seed, log=log))
    return vae, scale, metrics


def _is_decoder(path: tuple, value: Any) -> bool:
    return isinstance(value, nnx.Param) and path[0] in ("decoder", "post_quant_conv")


def finetune_decoder(vae: AutoencoderKL, cfg: ml_collections.ConfigDict, low: np.ndarray, high: np.ndarray,
                     std: float, *, seed: int = 0, log: Log = print) -> dict[str, float]:
    """Train the decoder of `vae` alone (in place) for `cfg.decoder_steps` Adam steps (lr `cfg.decoder_lr`, cosine
    to a tenth) to reproduce the frames from noised posterior means: `mean + u * cfg.decoder_noise * std * noise`,
    u ~ U(0, 1) per frame, `std` the latents' own (posterior means, unscaled). The encoder is untouched, so the
    latents the stages train on are the same; what changes is how their errors are drawn. A small diffusion model's
    latents carry errors the first decoder had never seen and drew as rounded corners and wavy edges (its 2r
    squares read as circles); decoding the same latents, this one draws squares where the first drew circles
    (docs/demo_quality.md, Shapes that show). Returns the final losses, prefixed 'decoder_'."""
    steps, amount = int(cfg.decoder_steps), float(cfg.decoder_noise)
    graphdef, params, frozen = nnx.split(vae, _is_decoder, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adam(optax.cosine_decay_schedule(float(cfg.decoder_lr), steps, cfg.final_lr_ratio)))
    fg_weight, edge_weight = float(cfg.foreground_weight), float(cfg.edge_weight)

    @jax.jit
    def step(params, opt_state, x, key):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, frozen)
            z = jax.lax.stop_gradient(model.encode(x, frame_chunk=None).mean)
            k_amount, k_noise = jax.random.split(key)
            scale = jax.random.uniform(k_amount, (z.shape[0], 1, 1, 1)) * amount * std
            y = model.decode(z + scale * jax.random.normal(k_noise, z.shape), frame_chunk=None)
            r = _reconstruction(y, x, fg_weight)
            return r["l1"] + r["l2"] + edge_weight * r["edge"], {"l1": r["l1"]}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(aux, loss=loss)

    batches = frame_batches(low, high, cfg.batch_size, cfg.crop, cfg.high_res_fraction, seed + 1,
                            cfg.shuffle_channels)
    params, metrics = _run_steps(
        step, params, tx.init(params), batches, seed + 1, steps, cfg.log_every,
        lambda i, m: f"decoder step {i}/{steps} (latents noised up to {amount:g} std) | loss {m['loss']:.4f} | "
                     f"l1 {m['l1']:.4f}", log)
    nnx.update(vae, params)
    return {f"decoder_{k}": v for k, v in metrics.items()}


def latent_scale(vae: AutoencoderKL, frames: np.ndarray) -> float:
    """1 / std of the posterior means of uint8 frames `[N, H, W, 3]`: the scaling factor giving unit variance."""
    mean = jax.jit(lambda x: vae.encode(x, frame_chunk=None).mean)(jnp.asarray(frames, jnp.float32) / 127.5 - 1)
    return float(1.0 / np.std(np.asarray(mean)))


def psnr(vae: AutoencoderKL, frames: np.ndarray) -> float:
    """Reconstruction PSNR (dB, of the posterior mean) over uint8 frames `[N, H, W, 3]`."""
    x = jnp.asarray(frames, jnp.float32) / 127.5 - 1
    y = jax.jit(lambda x: vae.decode(vae.encode(x, frame_chunk=None).mean, frame_chunk=None))(x)
    mse = float(jnp.mean(jnp.square((jnp.clip(y, -1, 1) - x) / 2)))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def recipe_changes(info: dict[str, Any], cfg: ml_collections.ConfigDict) -> list[str]:
    """How the autoencoder recipe `cfg` differs from the one stored in a written pipeline's `info` (its `source`):
    'KEY: stored -> now' per setting that differs (an empty list: the same recipe)."""
    stored, now = info.get("autoencoder"), json.loads(json.dumps(cfg.to_dict()))  # as read back from JSON
    if not stored:
        return ["no recipe stored (written before the demo stored it)"]
    keys = sorted(set(stored) | set(now))
    return [f"{k}: {stored.get(k)} -> {now.get(k)}" for k in keys if stored.get(k) != now.get(k)]


# ------------------------------------------------------------------------------------------------ text encoder

def random_text_encoder(width: int, seed: int = 0) -> CLIPTextEncoder:
    """`text_encoder_config('tiny', width)` with `add_caption_sum` and host-drawn random weights; embeddings
    N(0, 1) (module docstring)."""
    config = {**text_encoder_config("tiny", width), "add_caption_sum": True}
    encoder = randomize(abstract_text_encoder(config), seed)
    rng = np.random.default_rng(seed + 1)
    emb = encoder.text_model.embeddings
    for table in (emb.token_embedding.embedding, emb.position_embedding.embedding):
        table.set_value(jnp.asarray(rng.standard_normal(table.shape, np.float32)))
    return encoder


# ------------------------------------------------------------------------------------------------ files

def write_encoders(directory: str | Path, vae: AutoencoderKL, vae_config: dict[str, Any],
                   text_encoder: CLIPTextEncoder, source: dict[str, Any]) -> Path:
    """Write an encoders-only pipeline directory (no `unet`): `vae/` (with `vae_config`, which carries the
    scaling factor), `text_encoder/`, `tokenizer/` (the real CLIP tokenizer); atomically."""
    with atomic_directory(directory, checkpoints.CHECKPOINTS, overwrite=True) as tmp:
        for kind, model, config in (("vae", vae, vae_config),
                                    ("text_encoder", text_encoder, dataclasses.asdict(text_encoder.config))):
            (tmp / kind).mkdir()
            checkpoints.write_component(tmp / kind, kind, config, checkpoints.model_leaves(model), source=source)
        default_tokenizer("sd14").save_pretrained(str(tmp / "tokenizer"))
        checkpoints.write_metadata(tmp, "pipeline", stage=None, source=source,
                                   components={k: k for k in ("vae", "text_encoder", "tokenizer")})
    return Path(directory)


# ------------------------------------------------------------------------------------------------ encoders as functions

class FrozenEncoders:
    """The demo's VAE and text encoder as the plain callables `data.precompute` takes, with fixed batch shapes so
    every call of a resolution reuses one compiled program."""

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextEncoder, tokenizer: Any, *, images: int = 64,
                 texts: int = 64):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.images, self.texts = images, texts
        scale = vae.scaling_factor
        self._encode = jax.jit(lambda x: vae.encode(x, frame_chunk=None).mean * scale)
        self._text = jax.jit(lambda ids: text_encoder(ids).last_hidden_state)

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """float32 `[B, F, H, W, 3]` in [-1, 1] -> scaled latents (posterior means) `[B, F, H/4, W/4, 4]`."""
        lead = frames.shape[:2]
        flat = frames.reshape(-1, *frames.shape[2:])
        out = [np.asarray(self._encode(_pad(flat[i:i + self.images], self.images)))[:len(flat[i:i + self.images])]
               for i in range(0, len(flat), self.images)]
        latents = np.concatenate(out)
        return latents.reshape(*lead, *latents.shape[1:])

    def encode_text(self, captions: list[str]) -> np.ndarray:
        """Captions -> last hidden states `[B, 77, D]`."""
        ids = tokenize(self.tokenizer, list(captions), max_length=self.text_encoder.config.max_position_embeddings)
        out = [np.asarray(self._text(_pad(ids[i:i + self.texts], self.texts)))[:len(ids[i:i + self.texts])]
               for i in range(0, len(ids), self.texts)]
        return np.concatenate(out)


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
    """`x [n, ...]` padded with copies of its last row to `rows` rows (n <= rows)."""
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)]) if len(x) < rows else x


# ------------------------------------------------------------------------------------------------ the phase

def make_encoders(directory: str | Path, cfg: ml_collections.ConfigDict, low: np.ndarray, high: np.ndarray,
                  held_out: dict[str, np.ndarray], text_width: int, *, seed: int = 0, log: Log = print
                  ) -> dict[str, Any]:
    """Train the autoencoder on `low` frames and `high` crops, set its scaling factor, measure its reconstruction
    PSNR on `held_out` (name -> uint8 frames), draw the text encoder and write the pipeline directory. Returns what
    was measured (also stored as the components' `source`)."""
    trained, scale, losses = train_autoencoder(cfg, low, high, seed=seed, log=log)
    vae_config = dict(cfg.vae.to_dict(), scaling_factor=scale)
    vae = abstract_vae(vae_config)  # the same params under the config that carries the scaling factor
    nnx.update(vae, nnx.state(trained, nnx.Param))
    quality = {f"psnr_db_{name}": round(psnr(vae, frames), 2) for name, frames in held_out.items()}
    info = {"made_by": "lavie_jax.demo", "autoencoder_steps": int(cfg.steps), "autoencoder": cfg.to_dict(),
            "final_losses": {k: round(v, 5) for k, v in losses.items()}, "scaling_factor": round(scale, 5),
            **quality, "text_encoder": f"random tiny CLIP text tower, width {text_width}, seed {seed}, caption sum "
                                        "added to every token"}
    log(f"autoencoder: scaling factor {scale:.4f}, reconstruction "
        + ", ".join(f"{k[8:]} {v:.1f} dB" for k, v in quality.items()))
    write_encoders(directory, vae, vae_config, random_text_encoder(text_width, seed), info)
    log(f"wrote {directory} (vae/, text_encoder/, tokenizer/)")
    return info
