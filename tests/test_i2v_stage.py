"""The i2v stage's masks and conditioning (SEINE's `mask_generation_before` and `with_mask_sample.py`, spec 1.2),
and the random training masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavie_jax.stages.i2v import (MASK_KINDS, frame_mask, given_index, i2v_condition, masked_video, random_mask,
                                  resolve_mask)


def test_masks_and_where_given_frames_come_from():
    np.testing.assert_array_equal(frame_mask("first1", 6), [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(frame_mask("first2", 6), [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(frame_mask("onelast1", 6), [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(frame_mask("onelast2", 6), [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(given_index("first2", 6, 1), [0, 0, -1, -1, -1, -1])  # an image, repeated
    np.testing.assert_array_equal(given_index("first2", 6, 5), [3, 4, -1, -1, -1, -1])  # a video: its last 2
    np.testing.assert_array_equal(given_index("onelast2", 6, 2), [0, 0, -1, -1, 1, 1])  # two images
    np.testing.assert_array_equal(given_index("onelast1", 6, 2), [0, -1, -1, -1, -1, 1])
    assert [resolve_mask("auto", 3, k) for k in (1, 2, 7)] == ["first1", "onelast1", "first3"]
    assert resolve_mask("first2", 3, 1) == "first2"


@pytest.mark.parametrize("call,match", [
    (lambda: frame_mask("all", 6), "mask 'all': use first{n}.*onelast{n}"),
    (lambda: frame_mask("first0", 6), "mask 'first0'"),
    (lambda: frame_mask("onelast3", 6), "gives 6 of 6 frames: nothing is left"),
    (lambda: given_index("first3", 6, 2), "needs 1 image or a video of at least 3 frames, got 2"),
    (lambda: given_index("onelast1", 6, 3), "needs 2 images .* or 2 frames, got 3"),
])
def test_bad_masks(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_masked_video_is_grey_where_not_given_and_the_channel_order():
    frames = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 2, 4, 4, 3)), jnp.float32)
    video = np.asarray(masked_video(frames, given_index("onelast1", 5, 2)))
    np.testing.assert_array_equal(video[:, 0], frames[:, 0])
    np.testing.assert_array_equal(video[:, 4], frames[:, 1])
    assert (video[:, 1:4] == 0.0).all()  # mid-grey in [-1, 1], as SEINE's video * (mask == 0)
    latents = jnp.arange(2 * 5 * 3 * 3 * 4, dtype=jnp.float32).reshape(2, 5, 3, 3, 4)
    mask = jnp.broadcast_to(jnp.asarray(frame_mask("onelast1", 5)), (2, 5))
    cond = np.asarray(i2v_condition(mask, latents))
    assert cond.shape == (2, 5, 3, 3, 5)
    np.testing.assert_array_equal(cond[..., 0], np.broadcast_to(np.asarray(mask)[:, :, None, None], (2, 5, 3, 3)))
    np.testing.assert_array_equal(cond[..., 1:], latents)  # [x_t | mask | masked latents] once x_t is prepended


def test_random_training_masks():
    keys = jax.random.split(jax.random.key(0), 2000)
    masks = np.asarray(jax.vmap(lambda k: random_mask(k, 8, (0.5, 0.3, 0.2), 2))(keys))
    given = masks == 0
    first = given[:, 0] & ~given[:, -1]
    both = given[:, 0] & given[:, -1]
    none = ~given.any(axis=1)
    assert (first | both | none).all()  # every mask is one of MASK_KINDS
    np.testing.assert_allclose([first.mean(), both.mean(), none.mean()], (0.5, 0.3, 0.2), atol=0.04)
    assert set(given[first].sum(axis=1)) == {1, 2} and set(given[both].sum(axis=1)) == {2, 4}
    assert len(MASK_KINDS) == 3
