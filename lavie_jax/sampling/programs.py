"""The compiled programs of a sampling request: condition preparation, the denoising steps, VAE decoding.

Each is one `jax.jit` with the model graph and every shape-deciding option static, so a request of the same
shape reuses the compiled program. The denoising loop runs `steps_per_call` steps per call (`lax.scan` inside
`denoise_steps`, see `lavie_jax.diffusion.sample_loop`): the latents stay on the mesh between calls, and control
returns to Python every few steps, so progress is reported and Ctrl-C / SIGTERM land within a call.

Randomness: every row of a batch (a prompt, or a prompt's chunk in VSR) gets its own PRNG key, derived inside the
programs from `seed_ids = (seed, stage id)` and the row's `row_ids = (prompt index, chunk)`; each use folds a stream
id (and the step) into it. Noise therefore depends on the seed and the row, never on the batch size, the padding,
or how the batch is split over devices (threefry keys are partitionable).

Row layout of the UNet batch: each sample's guidance pair is adjacent (`[N, P, ...] -> [N * P, ...]`), so a
batch split over devices keeps each pair on one device and the guidance combine needs no communication.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lavie_jax import stages
from lavie_jax.diffusion import SamplerSpec, classifier_free_guidance, sample_loop

LATENT_STREAM, STEP_STREAM, LOW_RES_STREAM, ENCODE_STREAM = 0, 1, 2, 3


def row_keys(seed_ids: jax.Array, row_ids: jax.Array) -> jax.Array:
    """`[N]` keys: fold_in(fold_in(fold_in(key(seed), stage id), prompt index), chunk) for `row_ids [N, 2]`."""
    root = jax.random.fold_in(jax.random.key(seed_ids[0].astype(jnp.uint32)), seed_ids[1])
    return jax.vmap(lambda ids: jax.random.fold_in(jax.random.fold_in(root, ids[0]), ids[1]))(row_ids)


def row_normal(keys: jax.Array, stream: tuple, shape: tuple[int, ...]) -> jax.Array:
    """`[N, *shape]` float32 standard normals, row r drawn from `keys[r]` folded with the `stream` ids."""

    def one(key):
        for s in stream:
            key = jax.random.fold_in(key, s)
        return jax.random.normal(key, shape, jnp.float32)

    return jax.vmap(one)(keys)


def guided_model(graphdef: nnx.GraphDef, state: nnx.State, stage: str, text: jax.Array, cond: jax.Array | None,
                 labels: jax.Array | None, guidance: jax.Array, cond_first: bool
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The model one denoising step calls: `(x [N, ...], t) -> guided prediction [N, ...]`.

    text `[N, P, L, D]` holds each row's P = 2 guidance rows in the stage's batch order (or P = 1, no guidance);
    cond `[N, F, h, w, c]` is the stage's conditioning (`lavie_jax.stages.unet_sample`); labels `[N]` are class
    labels (VSR noise level). The UNet sees `[N * P, ...]` with each row's pair adjacent.
    """
    n, pairs = text.shape[:2]
    flat_text = text.reshape(n * pairs, *text.shape[2:])

    def repeat(a):
        return None if a is None else jnp.repeat(a, pairs, axis=0)

    cond_rows, label_rows = repeat(cond), repeat(labels)

    def model(x, t):
        inp = stages.unet_sample(stage, repeat(x), cond_rows)
        out = nnx.merge(graphdef, state)(inp, jnp.full((n * pairs,), t), flat_text, label_rows)
        if pairs == 1:
            return out
        return classifier_free_guidance(out.reshape(n, pairs, *out.shape[1:]), guidance, cond_first)

    return model


@functools.partial(jax.jit, static_argnames=("spec", "latent_shape"))
def initial_latents(seed_ids: jax.Array, row_ids: jax.Array, *, spec: SamplerSpec,
                    latent_shape: tuple[int, ...]) -> jax.Array:
    """The starting noise of N rows `[N, *latent_shape]`, already scaled by the sampler's `init_noise_sigma`."""
    return row_normal(row_keys(seed_ids, row_ids), (LATENT_STREAM,), latent_shape) * spec.init_noise_sigma


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "stage", "cond_first", "num_steps"))
def denoise_steps(state: nnx.State, tables: dict, x: jax.Array, start: jax.Array, text: jax.Array,
                  seed_ids: jax.Array, row_ids: jax.Array, cond: jax.Array | None, labels: jax.Array | None,
                  guidance: jax.Array, *, graphdef: nnx.GraphDef, spec: SamplerSpec, stage: str, cond_first: bool,
                  num_steps: int) -> jax.Array:
    """Steps `start .. start + num_steps - 1` of the denoising loop for a batch of N rows: `x [N, F, h, w, 4]` ->
    the latents after them (scaled latents after the last step). Inputs as in `guided_model`; `seed_ids` /
    `row_ids` as in the module docstring (step i's fresh noise is drawn from the row's key and i)."""
    model = guided_model(graphdef, state, stage, text, cond, labels, guidance, cond_first)
    keys = row_keys(seed_ids, row_ids)
    return sample_loop(spec, tables, x, lambda x, t, i: model(x, t),
                       lambda i: row_normal(keys, (STEP_STREAM, i), x.shape[1:]), start=start, num_steps=num_steps)


@functools.partial(jax.jit, static_argnames=("graphdef", "stage", "cond_first"))
def guided_model_call(state: nnx.State, x: jax.Array, t: jax.Array, text: jax.Array, cond: jax.Array | None,
                      labels: jax.Array | None, guidance: jax.Array, *, graphdef: nnx.GraphDef, stage: str,
                      cond_first: bool) -> jax.Array:
    """One call of the loop's model, compiled on its own: the unit that `denoise_steps` repeats (for benchmarks)."""
    return guided_model(graphdef, state, stage, text, cond, labels, guidance, cond_first)(x, t)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "stage"))
def decode(state: nnx.State, latents: jax.Array, *, graphdef: nnx.GraphDef, chunk: int, stage: str) -> jax.Array:
    """Scaled latents `[N, F, h, w, 4]` -> uint8 frames `[N, F, h * f, w * f, 3]` by the stage's pixel rule,
    `chunk` frames per VAE call."""
    vae = nnx.merge(graphdef, state)
    pixels = jax.vmap(lambda z: vae.decode(z / vae.scaling_factor, frame_chunk=chunk))(latents)
    return stages.to_uint8(pixels, stage)


def resize_frames(frames: jax.Array, size: tuple[int, int]) -> jax.Array:
    """uint8 `[..., H, W, 3]` -> float32 `[..., *size, 3]` in [-1, 1], bilinear with half-pixel centres and no
    antialiasing (torch's `interpolate(mode='bilinear', align_corners=False)`, as the official interpolation)."""
    x = stages.pixels_to_unit(frames)
    if tuple(x.shape[-3:-1]) == tuple(size):
        return x
    return jax.image.resize(x, (*x.shape[:-3], *size, x.shape[-1]), "linear", antialias=False)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "size"))
def interpolation_condition(state: nnx.State, frames: jax.Array, seed_ids: jax.Array, row_ids: jax.Array, *,
                            graphdef: nnx.GraphDef, chunk: int, size: tuple[int, int]) -> jax.Array:
    """uint8 key frames `[N, K, H, W, 3]` -> conditioning latents `[N, 4K - 3, size / 8, 4]`.

    The frames are resized to `size`, and each original frame is encoded once and its posterior sampled once (the
    official code encodes 61 frames, four copies of each original, and keeps one sample of each: the same
    distribution at a quarter of the cost); `stages.key_frame_condition` spreads them over the output positions.
    """
    vae = nnx.merge(graphdef, state)

    def encode(video, key):
        post = vae.encode(video, frame_chunk=chunk)
        return post.sample(jax.random.fold_in(key, ENCODE_STREAM)) * vae.scaling_factor

    latents = jax.vmap(encode)(resize_frames(frames, size), row_keys(seed_ids, row_ids))
    return stages.key_frame_condition(latents)


@jax.jit
def low_res_condition(frames: jax.Array, seed_ids: jax.Array, row_ids: jax.Array, signal: jax.Array,
                      noise: jax.Array) -> jax.Array:
    """VSR low-res input: uint8 `[N, F, h, w, 3]` -> `stages.low_res_condition` of it, float32 (x in [-1, 1])."""
    x = stages.pixels_to_unit(frames)
    eps = row_normal(row_keys(seed_ids, row_ids), (LOW_RES_STREAM,), x.shape[1:])
    return stages.low_res_condition(x, eps, signal, noise)


@functools.partial(jax.jit, static_argnames=("sharding",))
def take_rows(values: jax.Array, rows: jax.Array, *, sharding: jax.sharding.Sharding) -> jax.Array:
    """`values[rows]` laid out by `sharding`, on the devices: a batch's text rows gathered from a request's
    embeddings `[B, ...]` (no trip through the host)."""
    return jax.lax.with_sharding_constraint(jnp.take(values, rows, axis=0), sharding)
