"""FreeNoise on the base UNet: the windowed forward and the rescheduled noise equal FreeNoise-LaVie's (the torch
reference's branch, written from the spec of arthur-qiu/FreeNoise-LaVie), and the lengths it cannot cover fail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lavie_jax.convert.state_dict import load_state_dict
from lavie_jax.diffusion import freenoise
from lavie_jax.models import abstract_unet
from lavie_jax.models.options import ExecutionOptions, ExecutionOptionsError, configure
from tests.models.tiny_configs import SD_SMALL, rel_err

pytest.importorskip("diffusers")
from tests.models.torch_reference import (UNet3DReference, freenoise_noise, randomize_,  # noqa: E402
                                          set_freenoise_)

WINDOW, STRIDE, FRAMES = 16, 4, 24  # the official window and stride; 3 windows (starts 0, 4, 8)
CONFIG = dict(SD_SMALL, norm_eps=0.05)


@pytest.fixture(scope="module")
def models():
    ref = UNet3DReference(CONFIG, "base").eval()
    state = randomize_(ref, seed=11)
    ours = abstract_unet(dict(CONFIG, stage="base"))
    load_state_dict(ours, state)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, FRAMES, 4, 4)).astype(np.float32)
    text = rng.standard_normal((1, 5, CONFIG["cross_attention_dim"])).astype(np.float32)
    t = np.array([417], np.int64)
    return ref, ours, (x, t, text)


def _reference(ref, x, t, text, window) -> np.ndarray:
    set_freenoise_(ref, window)
    with torch.no_grad():
        return ref(torch.tensor(x), torch.tensor(t), torch.tensor(text)).numpy()


def test_windowed_unet_matches_freenoise_reference(models):
    ref, ours, (x, t, text) = models
    configure(ours, temporal_window=(WINDOW, STRIDE))
    graphdef, state = nnx.split(ours)
    fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a), compiler_options={"xla_backend_optimization_level": 0})
    out = np.transpose(np.asarray(fn(state, np.transpose(x, (0, 2, 3, 4, 1)), t, text)), (0, 4, 1, 2, 3))
    expected = _reference(ref, x, t, text, (WINDOW, STRIDE))
    err = rel_err(out, expected)
    print(f"windowed UNet vs FreeNoise reference: relative error {err:.2e}")
    assert err <= 1e-5
    # the windows matter: attending over all 24 frames gives another output
    assert rel_err(_reference(ref, x, t, text, None), expected) > 1e-3


def test_rescheduled_noise_equals_the_official_loop():
    """Our permutations replayed through the official loop (its `random.shuffle` swapped for them) give our noise
    bit for bit; only the first `window` frames are independent; each group permutes the one `window` before."""
    frames = 36
    noise = jax.random.normal(jax.random.key(0), (frames, 2, 3, 4))
    key = jax.random.key(7)
    ours = np.asarray(freenoise.reschedule_noise(noise, key, WINDOW, STRIDE))
    perms = [list(map(int, p)) for p in np.asarray(freenoise.noise_permutations(key, frames, WINDOW, STRIDE))]
    assert len(perms) == (frames - WINDOW) // STRIDE and any(p != sorted(p) for p in perms)

    def replay(index):  # for the official (unseeded) random.shuffle of [f-16, ..., f-13], in place
        index[:] = [index[j] for j in perms.pop(0)]

    torch_noise = torch.tensor(np.asarray(noise)).permute(1, 0, 2, 3)[None]  # [1, C, L, H, W]
    expected = freenoise_noise(torch_noise, WINDOW, STRIDE, replay)[0].permute(1, 0, 2, 3).numpy()
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(ours[:WINDOW], np.asarray(noise)[:WINDOW])
    for f in range(WINDOW, frames, STRIDE):
        group, before = ours[f:f + STRIDE], ours[f - WINDOW:f - WINDOW + STRIDE]
        assert sorted(map(bytes, group)) == sorted(map(bytes, before))
    # seeded: the same key gives the same noise, another key another order
    np.testing.assert_array_equal(ours, np.asarray(freenoise.reschedule_noise(noise, key, WINDOW, STRIDE)))
    assert not np.array_equal(ours, np.asarray(freenoise.reschedule_noise(noise, jax.random.key(8), WINDOW,
                                                                           STRIDE)))


def test_one_window_is_the_plain_map():
    """At exactly `window` frames the fusion is the map itself (FreeNoise at 16 frames = the original model)."""
    x = jax.random.normal(jax.random.key(1), (3, WINDOW, 8))
    fn = lambda t: jnp.cumsum(t, axis=1) * 0.5  # noqa: E731  (mixes frames, like attention)
    np.testing.assert_allclose(np.asarray(freenoise.windowed(fn, x, WINDOW, STRIDE)), np.asarray(fn(x)), rtol=1e-6)


@pytest.mark.parametrize("frames", [18, 12, 0])
def test_lengths_off_the_window_grid_fail(frames):
    with pytest.raises(freenoise.FreeNoiseError, match=f"{frames} frames.*16 \\+ 4k.*choose such a length"):
        freenoise.check_length(frames, WINDOW, STRIDE)


@pytest.mark.parametrize("value", [(4,), (4, 8), (0, 0), (16, 4, 1)])
def test_bad_temporal_window_option(value):
    with pytest.raises(ExecutionOptionsError, match="temporal_window.*window, stride"):
        ExecutionOptions(temporal_window=value)


@pytest.mark.parametrize("window,stride,frames", [(16, 4, 28), (5, 2, 9), (4, 1, 7)])
def test_window_fusion_equals_the_weighted_mean(window, stride, frames):
    """Both fusion paths (whole stride groups: shifted slices; otherwise gather / scatter) give each frame the
    weighted mean of the windows covering it."""
    x = jax.random.normal(jax.random.key(2), (2, frames, 3))
    fn = lambda t: jnp.cumsum(t, axis=1) * 0.3 + t ** 2  # noqa: E731
    total, count = np.zeros((2, frames, 3)), np.zeros(frames)
    w = freenoise.window_weights(window)
    for s in freenoise.window_starts(frames, window, stride):
        total[:, s:s + window] += np.asarray(fn(x[:, s:s + window])) * w[:, None]
        count[s:s + window] += w
    np.testing.assert_allclose(np.asarray(freenoise.windowed(fn, x, window, stride)), total / count[:, None],
                               rtol=1e-5, atol=1e-6)
