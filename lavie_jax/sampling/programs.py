"""The compiled programs of a sampling request: the stage's conditioning, the denoising steps, VAE decoding.

Each is one `jax.jit` with the model graph and every shape-deciding option static, so a request of the same
shape reuses the compiled program (and the next process loads it whole: `program`, lavie_jax.runtime.program_cache). The denoising loop runs `steps_per_call` steps per call (`lax.scan` inside
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

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lavie_jax.diffusion import SamplerSpec, classifier_free_guidance, sample_loop
from lavie_jax.runtime.program_cache import program
from lavie_jax.stages import Stage

LATENT_STREAM, STEP_STREAM = 0, 1
# the random streams a stage's conditioning draws from (`Stage.sample_condition`), by name
CONDITION_STREAMS = {"low_res": 2, "encode": 3}
NOISE_SHUFFLE_STREAM = 4  # the stage's own draws for its initial noise (FreeNoise's shuffles)


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


def guided_model(graphdef: nnx.GraphDef, state: nnx.State, stage: Stage, text: jax.Array, cond: jax.Array | None,
                 labels: jax.Array | None, guidance: jax.Array, cond_first: bool
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The model one denoising step calls: `(x [N, ...], t) -> guided prediction [N, ...]`.

    text `[N, P, L, D]` holds each row's P = 2 guidance rows in the stage's batch order (or P = 1, no guidance);
    cond `[N, F, h, w, c]` is the stage's conditioning (`condition`, fed by `Stage.unet_sample`); labels `[N]` are class
    labels (VSR noise level). The UNet sees `[N * P, ...]` with each row's pair adjacent.
    """
    n, pairs = text.shape[:2]
    flat_text = text.reshape(n * pairs, *text.shape[2:])

    def repeat(a):
        return None if a is None else jnp.repeat(a, pairs, axis=0)

    cond_rows, label_rows = repeat(cond), repeat(labels)

    def model(x, t):
        inp = stage.unet_sample(repeat(x), cond_rows)
        out = nnx.merge(graphdef, state)(inp, jnp.full((n * pairs,), t), flat_text, label_rows)
        if pairs == 1:
            return out
        return classifier_free_guidance(out.reshape(n, pairs, *out.shape[1:]), guidance, cond_first)

    return model


@program(static_argnames=("spec", "latent_shape", "stage", "settings"))
def initial_latents(seed_ids: jax.Array, row_ids: jax.Array, *, spec: SamplerSpec, latent_shape: tuple[int, ...],
                    stage: Stage | None = None, settings: tuple = ()) -> jax.Array:
    """The starting noise of N rows `[N, *latent_shape]`, already scaled by the sampler's `init_noise_sigma`;
    with `stage`, made by `stage.initial_noise` (`settings` = `Stage.noise_settings(options)`)."""
    keys = row_keys(seed_ids, row_ids)
    noise = row_normal(keys, (LATENT_STREAM,), latent_shape)
    if stage is not None:
        noise = stage.initial_noise(noise, jax.vmap(lambda k: jax.random.fold_in(k, NOISE_SHUFFLE_STREAM))(keys),
                                    settings)
    return noise * spec.init_noise_sigma


@program(static_argnames=("graphdef", "chunk", "stage", "vae_factor", "settings"))
def input_latents(state: nnx.State, frames: jax.Array, signal: jax.Array, noise_scale: jax.Array,
                  seed_ids: jax.Array, row_ids: jax.Array, *, graphdef: nnx.GraphDef, chunk: int, stage: Stage,
                  vae_factor: int, settings: tuple) -> jax.Array:
    """The sample before step `Stage.start_step` of N rows: `signal * z + noise_scale * eps`, z the stage's
    `input_latents` of the uint8 input frames `[N, F, H, W, 3]` (posterior means), eps the row's initial-noise
    normals; `signal` / `noise_scale` are the sampler's sqrt(alpha_bar) / sqrt(1 - alpha_bar) at that step."""
    vae = nnx.merge(graphdef, state)

    def encode(videos: jax.Array) -> jax.Array:
        return jax.vmap(lambda v: vae.encode(v, frame_chunk=chunk).mean * vae.scaling_factor)(videos)

    z = stage.input_latents(frames, encode, vae_factor, settings)
    eps = row_normal(row_keys(seed_ids, row_ids), (LATENT_STREAM,), z.shape[1:])
    return signal * z + noise_scale * eps


@program(static_argnames=("graphdef", "spec", "stage", "cond_first", "num_steps"))
def denoise_steps(state: nnx.State, tables: dict, x: jax.Array, start: jax.Array, text: jax.Array,
                  seed_ids: jax.Array, row_ids: jax.Array, cond: jax.Array | None, labels: jax.Array | None,
                  guidance: jax.Array, *, graphdef: nnx.GraphDef, spec: SamplerSpec, stage: Stage, cond_first: bool,
                  num_steps: int) -> jax.Array:
    """Steps `start .. start + num_steps - 1` of the denoising loop for a batch of N rows: `x [N, F, h, w, 4]` ->
    the latents after them (scaled latents after the last step). Inputs as in `guided_model`; `seed_ids` /
    `row_ids` as in the module docstring (step i's fresh noise is drawn from the row's key and i)."""
    model = guided_model(graphdef, state, stage, text, cond, labels, guidance, cond_first)
    keys = row_keys(seed_ids, row_ids)
    return sample_loop(spec, tables, x, lambda x, t, i: model(x, t),
                       lambda i: row_normal(keys, (STEP_STREAM, i), x.shape[1:]), start=start, num_steps=num_steps)


@program(static_argnames=("graphdef", "stage", "cond_first"))
def guided_model_call(state: nnx.State, x: jax.Array, t: jax.Array, text: jax.Array, cond: jax.Array | None,
                      labels: jax.Array | None, guidance: jax.Array, *, graphdef: nnx.GraphDef, stage: Stage,
                      cond_first: bool) -> jax.Array:
    """One call of the loop's model, compiled on its own: the unit that `denoise_steps` repeats (for benchmarks)."""
    return guided_model(graphdef, state, stage, text, cond, labels, guidance, cond_first)(x, t)


@program(static_argnames=("graphdef", "chunk", "stage"))
def decode(state: nnx.State, latents: jax.Array, *, graphdef: nnx.GraphDef, chunk: int, stage: Stage) -> jax.Array:
    """Scaled latents `[N, F, h, w, 4]` -> uint8 frames `[N, F, h * f, w * f, 3]` by the stage's pixel rule,
    `chunk` frames per VAE call."""
    vae = nnx.merge(graphdef, state)
    pixels = jax.vmap(lambda z: vae.decode(z / vae.scaling_factor, frame_chunk=chunk))(latents)
    return stage.to_uint8(pixels)


@program(static_argnames=("graphdef", "chunk", "stage", "settings"))
def condition(state: nnx.State, frames: jax.Array, seed_ids: jax.Array, row_ids: jax.Array, *,
              graphdef: nnx.GraphDef, chunk: int, stage: Stage, settings: tuple
              ) -> tuple[jax.Array | None, jax.Array | None]:
    """uint8 input frames of N rows `[N, F, H, W, 3]` -> the stage's (condition, class labels), one program
    (`Stage.sample_condition` with `settings` = `Stage.condition_settings(options)`). The stage may encode frames
    with the VAE (`chunk` frames per call; each row's posterior sampled from its key) and draw per-row normals from
    its named streams (`CONDITION_STREAMS`)."""
    vae = nnx.merge(graphdef, state)
    keys = row_keys(seed_ids, row_ids)

    def encode(videos: jax.Array) -> jax.Array:  # [N, K, H, W, 3] in [-1, 1] -> scaled latents [N, K, h, w, 4]
        def one(video, key):
            post = vae.encode(video, frame_chunk=chunk)
            return post.sample(jax.random.fold_in(key, CONDITION_STREAMS["encode"])) * vae.scaling_factor

        return jax.vmap(one)(videos, keys)

    def normal(stream: str, shape: tuple[int, ...]) -> jax.Array:
        return row_normal(keys, (CONDITION_STREAMS[stream],), shape)

    return stage.sample_condition(frames, encode, normal, settings)


@program(static_argnames=("sharding",))
def take_rows(values: jax.Array, rows: jax.Array, *, sharding: jax.sharding.Sharding) -> jax.Array:
    """`values[rows]` laid out by `sharding`, on the devices: a batch's text rows gathered from a request's
    embeddings `[B, ...]` (no trip through the host)."""
    return jax.lax.with_sharding_constraint(jnp.take(values, rows, axis=0), sharding)
