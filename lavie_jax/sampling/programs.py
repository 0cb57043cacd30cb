"""The compiled programs of a sampling request: condition preparation, the denoising loop, VAE decoding.

Each is one `jax.jit` with the model graph and every shape-deciding option static, so a request of the same
shape reuses the compiled program. The denoising loop is a single `lax.scan` over all steps (see
`lavie_jax.diffusion.sample_loop`): no host round trip per step; only an unordered host callback reports each
finished step to the progress bar, if any.

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
import numpy as np
from flax import nnx

from lavie_jax.diffusion import SamplerSpec, add_noise, classifier_free_guidance, sample_loop

LATENT_STREAM, STEP_STREAM, LOW_RES_STREAM, ENCODE_STREAM = 0, 1, 2, 3

_progress_hooks: list[Callable[[int], None]] = []


def _report_step(i: jax.Array) -> None:
    for hook in _progress_hooks:
        hook(int(i))


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


def pixels_to_unit(frames: jax.Array) -> jax.Array:
    """uint8 frames -> float32 in [-1, 1] (x / 127.5 - 1, the official `x / 255 * 2 - 1`)."""
    return frames.astype(jnp.float32) / 127.5 - 1.0


def unit_to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 with LaVie's rounding, `((x / 2 + 0.5) * 255 + 0.5)` clamped (as `video.to_uint8`)."""
    return jnp.clip((x.astype(jnp.float32) / 2 + 0.5) * 255 + 0.5, 0, 255).astype(jnp.uint8)


def guided_model(graphdef: nnx.GraphDef, state: nnx.State, text: jax.Array, cond: jax.Array | None,
                 labels: jax.Array | None, guidance: jax.Array, cond_first: bool
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The model one denoising step calls: `(x [N, ...], t) -> guided prediction [N, ...]`.

    text `[N, P, L, D]` holds each row's P = 2 guidance rows in the stage's batch order (or P = 1, no guidance);
    cond `[N, F, h, w, c]` is concatenated to the latents on channels (interpolation, VSR); labels `[N]` are class
    labels (VSR noise level). The UNet sees `[N * P, ...]` with each row's pair adjacent.
    """
    n, pairs = text.shape[:2]
    flat_text = text.reshape(n * pairs, *text.shape[2:])

    def repeat(a):
        return None if a is None else jnp.repeat(a, pairs, axis=0)

    cond_rows, label_rows = repeat(cond), repeat(labels)

    def model(x, t):
        inp = repeat(x)
        if cond_rows is not None:
            inp = jnp.concatenate([inp, cond_rows.astype(inp.dtype)], axis=-1)
        out = nnx.merge(graphdef, state)(inp, jnp.full((n * pairs,), t), flat_text, label_rows)
        if pairs == 1:
            return out
        return classifier_free_guidance(out.reshape(n, pairs, *out.shape[1:]), guidance, cond_first)

    return model


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "latent_shape", "cond_first"))
def denoise(state: nnx.State, tables: dict, text: jax.Array, seed_ids: jax.Array, row_ids: jax.Array,
            cond: jax.Array | None, labels: jax.Array | None, guidance: jax.Array, *, graphdef: nnx.GraphDef,
            spec: SamplerSpec, latent_shape: tuple[int, ...], cond_first: bool) -> jax.Array:
    """The whole denoising loop of one batch of N rows -> final latents `[N, *latent_shape]` (scaled latents).

    Inputs as in `guided_model`; `seed_ids`/`row_ids` as in the module docstring. After each step an unordered host
    callback reports the step to the progress hooks (one program with or without a progress bar; its cost is part
    of the loop overhead that `bench.sampling_bench` measures).
    """
    model = guided_model(graphdef, state, text, cond, labels, guidance, cond_first)
    keys = row_keys(seed_ids, row_ids)
    x = row_normal(keys, (LATENT_STREAM,), latent_shape) * spec.init_noise_sigma
    return sample_loop(spec, tables, x, lambda x, t, i: model(x, t),
                       lambda i: row_normal(keys, (STEP_STREAM, i), latent_shape), callback=_report_step)


@functools.partial(jax.jit, static_argnames=("graphdef", "cond_first"))
def guided_model_call(state: nnx.State, x: jax.Array, t: jax.Array, text: jax.Array, cond: jax.Array | None,
                      labels: jax.Array | None, guidance: jax.Array, *, graphdef: nnx.GraphDef, cond_first: bool
                      ) -> jax.Array:
    """One call of the loop's model, compiled on its own: the unit that `denoise` repeats (for benchmarks)."""
    return guided_model(graphdef, state, text, cond, labels, guidance, cond_first)(x, t)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def decode(state: nnx.State, latents: jax.Array, *, graphdef: nnx.GraphDef, chunk: int) -> jax.Array:
    """Scaled latents `[N, F, h, w, 4]` -> uint8 frames `[N, F, h * f, w * f, 3]`, `chunk` frames per VAE call."""
    vae = nnx.merge(graphdef, state)
    pixels = jax.vmap(lambda z: vae.decode(z / vae.scaling_factor, frame_chunk=chunk))(latents)
    return unit_to_uint8(pixels)


def interpolation_index(num_inputs: int) -> np.ndarray:
    """Conditioning frame of each of the 4K - 3 output positions: floor((j + 1) / 4).

    The official code VAE-encodes linspace(0, K-1, 4K-3).astype(int) frames (each original 4 times), keeps latent
    frames 0, 4, ..., i.e. one per original, repeats each 4 times and drops the first and the last two
    (spec 4.2); original k thus conditions positions 4k-1..4k+2.
    """
    return np.minimum((np.arange(4 * num_inputs - 3) + 1) // 4, num_inputs - 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def interpolation_condition(state: nnx.State, frames: jax.Array, seed_ids: jax.Array, row_ids: jax.Array, *,
                            graphdef: nnx.GraphDef, chunk: int) -> jax.Array:
    """Key frames `[N, K, H, W, 3]` in [-1, 1] -> conditioning latents `[N, 4K - 3, H/8, W/8, 4]`.

    Each original frame is encoded once and its posterior sampled once (the official code encodes 61 frames, four
    copies of each original, and keeps one sample of each: the same distribution at a quarter of the cost).
    """
    vae = nnx.merge(graphdef, state)

    def encode(video, key):
        post = vae.encode(video, frame_chunk=chunk)
        return post.sample(jax.random.fold_in(key, ENCODE_STREAM)) * vae.scaling_factor

    latents = jax.vmap(encode)(frames, row_keys(seed_ids, row_ids))
    return latents[:, interpolation_index(frames.shape[1])]


@jax.jit
def low_res_condition(frames: jax.Array, seed_ids: jax.Array, row_ids: jax.Array, signal: jax.Array,
                      noise: jax.Array) -> jax.Array:
    """VSR low-res input: uint8 `[N, F, h, w, 3]` -> signal * x + noise * eps in float32 (x in [-1, 1])."""
    x = pixels_to_unit(frames)
    eps = row_normal(row_keys(seed_ids, row_ids), (LOW_RES_STREAM,), x.shape[1:])
    return add_noise(x, eps, signal, noise)


@functools.partial(jax.jit, static_argnames=("size",))
def resize_frames(frames: jax.Array, *, size: tuple[int, int]) -> jax.Array:
    """uint8 `[F, H, W, 3]` -> float32 `[F, *size, 3]` in [-1, 1], bilinear with half-pixel centres and no
    antialiasing (torch's `interpolate(mode='bilinear', align_corners=False)`, as the official interpolation)."""
    x = pixels_to_unit(frames)
    if x.shape[1:3] == size:
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "linear", antialias=False)
