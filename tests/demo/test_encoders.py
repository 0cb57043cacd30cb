"""The demo autoencoder's training terms, checked without training (`make demo` trains it; docs/demo_quality.md
has what each term does to its reconstructions).

- the edge loss is zero for a copy, and larger for a blurred square than a plain L1 on the same pixels is;
- a written autoencoder names the recipe it was trained with, so the demo can refuse a stale one;
- `init_autoencoder` starts the posterior's log-variance around the configured value (its bias; the random kernel
  adds a term of order one);
- `finetune_decoder` trains the decoder alone: the encoder, and so the latents the stages train on, stay bit for bit;
- `frame_batches` with `shuffle_channels` gives each frame its channels in some order, every order in turn.
"""

import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.cli.config_flags import load_config
from lavie_jax.demo.encoders import edge_loss, finetune_decoder, frame_batches, init_autoencoder, recipe_changes


def _square() -> jnp.ndarray:
    x = -np.ones((1, 16, 16, 3), np.float32)
    x[:, 4:12, 4:12] = 1.0
    return jnp.asarray(x)


def test_edge_loss_penalises_blurred_edges():
    x = _square()
    w = jnp.ones(x.shape[:-1] + (1,))
    assert float(edge_loss(x, x, w)) == 0.0
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, i:i + 16, j:j + 16] for i in range(3) for j in range(3)) / 9  # 3x3 box blur
    l1 = float(jnp.mean(jnp.abs(blurred - x)))
    assert float(edge_loss(blurred, x, w)) > 1.5 * l1 > 0


def test_posterior_starts_around_the_configured_log_variance():
    cfg = load_config("demo").autoencoder
    assert cfg.logvar_init <= -3
    for start in (0.0, cfg.logvar_init):
        post = init_autoencoder(cfg.vae.to_dict(), seed=0, logvar_init=start).encode(_square(), frame_chunk=None)
        assert post.mean.shape == (1, 4, 4, cfg.vae.latent_channels)
        assert abs(float(jnp.mean(post.logvar)) - start) < 1.0


def test_a_changed_autoencoder_recipe_is_named():
    cfg = load_config("demo").autoencoder
    stored = {"autoencoder": json.loads(json.dumps(cfg.to_dict()))}  # as the pipeline's metadata reads back
    assert recipe_changes(stored, cfg) == []
    cfg.steps = 300
    assert recipe_changes(stored, cfg) == [f"steps: {stored['autoencoder']['steps']} -> 300"]
    assert recipe_changes({"made_by": "lavie_jax.demo"}, cfg) == [
        "no recipe stored (written before the demo stored it)"]


def test_the_decoder_finetune_leaves_the_encoder_and_its_latents_unchanged():
    cfg = load_config("demo").autoencoder
    with cfg.unlocked():
        cfg.vae.block_out_channels, cfg.vae.down_block_types = [8, 8], ["DownEncoderBlock2D"] * 2
        cfg.vae.up_block_types = ["UpDecoderBlock2D"] * 2
        cfg.decoder_steps, cfg.batch_size, cfg.crop, cfg.log_every = 3, 2, 16, 3
    vae = init_autoencoder(cfg.vae.to_dict(), seed=0, logvar_init=cfg.logvar_init)
    before = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}
    frames = np.asarray((_square()[0] + 1) * 127.5, np.uint8)[None].repeat(4, 0)
    latents = np.asarray(vae.encode(_square(), frame_chunk=None).mean)
    lines = []
    metrics = finetune_decoder(vae, cfg, frames, frames[:0], 1.0, log=lines.append)
    after = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder/", "post_quant_conv/")) for k in moved), sorted(moved)[:5]
    assert any(k.startswith("decoder/") for k in moved)
    np.testing.assert_array_equal(np.asarray(vae.encode(_square(), frame_chunk=None).mean), latents)
    assert set(metrics) == {"decoder_loss", "decoder_l1"} and all(np.isfinite(v) for v in metrics.values())
    assert lines and lines[-1].startswith("decoder step 3/3 (latents noised up to 1 std)")


def test_shuffled_channels_are_a_permutation_of_each_frame():
    frames = np.zeros((5, 8, 8, 3), np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 10, 100, 200
    frames[:, 2:5, 2:5] = (220, 40, 90)  # a shape in another colour
    batches = frame_batches(frames, frames[:0], 4, 8, 0.0, seed=0, shuffle_channels=True)
    orders = set()
    for _ in range(10):
        for x in np.round((next(batches) + 1) * 127.5).astype(np.uint8):
            order = tuple(int(np.flatnonzero(np.array((10, 100, 200)) == c)[0]) for c in x[0, 0])  # channel k's source
            np.testing.assert_array_equal(x[2:5, 2:5], np.broadcast_to(np.array((220, 40, 90))[list(order)], (3, 3, 3)))
            orders.add(order)
    assert len(orders) == 6
    plain = next(frame_batches(frames, frames[:0], 4, 8, 0.0, seed=0))
    assert np.all(np.round((plain + 1) * 127.5)[:, 0, 0] == (10, 100, 200))
