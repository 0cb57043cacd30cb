"""Training the i2v stage: a run initialised from a base checkpoint starts as the base model (conv_in widened, the
mask and masked-video channels at zero), and the training conditioning is the sampling one."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax import parallel
from lavie_jax.io.checkpoints import save_model
from lavie_jax.sampling.pipeline import random_pipeline
from lavie_jax.stages import TrainingInputs, get_stage
from lavie_jax.train.setup import build_run
from lavie_jax.train.step import Objective
from tests.models.tiny_configs import rel_err
from tests.train.conftest import HEIGHT, WIDTH, synthetic_batch, tiny_train_config

FRAMES = 4


def test_i2v_from_a_base_checkpoint_starts_as_the_base_and_trains(tmp_path):
    """Step 0 computes what the base computes; one full train step (the demo's: precomputed latents, a grey frame
    encoded in the step) moves the new channels off zero."""
    base = random_pipeline(tiny_train_config("base"), seed=3).unet
    save_model(base, tmp_path / "base-unet")
    config = tiny_train_config("i2v", **{"init": str(tmp_path / "base-unet"), "encoders": "random"})
    config.data.num_frames, config.data.height, config.data.width = FRAMES, HEIGHT, WIDTH
    mesh = parallel.make_mesh((1, 1, 1, 1), devices=jax.devices()[:1])
    run = build_run(config, mesh)
    unet = nnx.merge(run.graphdef, run.state.params, run.state.frozen)
    kernel = run.state.params["conv_in"]["kernel"][...]
    assert kernel.shape[-2] == 9 and not np.asarray(kernel[:, :, 4:]).any()
    np.testing.assert_array_equal(np.asarray(kernel[:, :, :4]), np.asarray(base.conv_in.kernel[...]))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, FRAMES, HEIGHT // 8, WIDTH // 8, 4)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((1, FRAMES, HEIGHT // 8, WIDTH // 8, 5)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((1, 5, base.arch.cross_attention_dim)), jnp.float32)
    t = jnp.array([500])
    ours = np.asarray(nnx.jit(lambda m, *a: m(*a))(unet, jnp.concatenate([x, cond], -1), t, text))
    assert rel_err(ours, np.asarray(nnx.jit(lambda m, *a: m(*a))(base, x, t, text))) <= 1e-6
    with jax.set_mesh(run.mesh):
        state, metrics = run.step_fn(run.state, run.encoders, run.tables,
                                     jax.device_put(synthetic_batch("i2v"), run.batch_sharding))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    new = np.asarray(state.params["conv_in"]["kernel"][...])
    assert (np.abs(new[:, :, 4:]).max(axis=(0, 1, 3)) > 0).all()  # every mask / masked-video channel learns


def test_training_inputs_build_the_sampling_conditioning():
    """Per clip: a random mask; the masked video (given frames, grey elsewhere) encoded as in sampling; with
    precomputed latents, the clip's own latents on given frames and a grey frame's latent elsewhere (a full step
    runs in the test above)."""
    stage = get_stage("i2v")
    b, f, h, w = 64, 4, 2, 3
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal((b, f, h, w, 4)), jnp.float32)
    pixels = jnp.asarray(rng.uniform(-1, 1, (b, f, h * 8, w * 8, 3)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), b)

    def encode(p, stream):  # a stand-in VAE: the mean colour of each 8x8 block, + 1 in the 4th channel
        pooled = p.reshape(*p.shape[:2], p.shape[2] // 8, 8, p.shape[3] // 8, 8, 3).mean((3, 5))
        return jnp.concatenate([pooled, jnp.ones_like(pooled[..., :1])], -1)

    objective = Objective(stage=stage, prediction_type="epsilon", i2v_mask_weights=(0.5, 0.3, 0.2), i2v_max_given=2)
    for batch in ({"video": pixels}, {"latents": x0}):
        inputs = TrainingInputs(batch=batch, latents=encode, text=None, tables={}, settings=objective,
                                draw=lambda stream, fn: jax.vmap(fn)(keys))
        _, cond, _, labels = stage.training_inputs(inputs, x0, jnp.zeros((b, 5, 8)))
        assert cond.shape == (b, f, h, w, 5) and labels is None
        mask = np.asarray(cond[..., 0, 0, 0])  # per frame
        given = (mask == 0)[..., None, None, None]
        assert set(np.unique(mask)) == {0.0, 1.0} and (given[:, 0] | ~given.any(1)).all()  # given frames lead
        own = encode(pixels, "") if "video" in batch else x0
        grey = encode(jnp.zeros_like(pixels[:, :1]), "")
        np.testing.assert_allclose(np.asarray(cond[..., 1:]), np.where(given, own, grey), atol=1e-6)
