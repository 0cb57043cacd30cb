"""The demo autoencoder's training terms, checked without training (`make demo` trains it; docs/demo_quality.md
has what each term does to its reconstructions).

- the edge loss is zero for a copy, and larger for a blurred square than a plain L1 on the same pixels is;
- a written autoencoder names the recipe it was trained with, so the demo can refuse a stale one;
- `init_autoencoder` starts the posterior's log-variance around the configured value (its bias; the random kernel
  adds a term of order one).
"""

import json

import jax.numpy as jnp
import numpy as np

from lavie_jax.cli.config_flags import load_config
from lavie_jax.demo.encoders import edge_loss, init_autoencoder, recipe_changes


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
