"""preprocess_frames against transformers' CLIPImageProcessor (PIL bicubic on uint8, the pipeline CLIP checkpoints
are evaluated with): the same geometry exactly, values at most one grey level apart on a few pixels."""

import numpy as np
import pytest

from lavie_jax.models.clip_vision import CLIP_STD, crop_offset, preprocess_frames, resized_size

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("h,w", [(320, 512), (150, 100)])  # LaVie's frame (shrink), a small one (enlarge)
def test_matches_clip_image_processor(h, w):
    rng = np.random.RandomState(0)
    # smooth content plus noise: what frames look like, and no constant areas that would hide errors
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    frames = np.clip(base + rng.randn(2, h, w, 3) * 20, 0, 255).astype(np.uint8)
    processor = transformers.CLIPImageProcessor()  # shortest edge 224, crop 224, OpenAI's mean/std, PIL bicubic
    want = processor(images=list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = np.asarray(preprocess_frames(frames, 224, crop_rounding="floor"))
    assert got.shape == want.shape == (2, 224, 224, 3)
    levels = np.abs(got - want) * np.asarray(CLIP_STD) * 255  # differences in grey levels
    # measured: at most one grey level apart (PIL's fixed-point weights), on ~0.02% of the values
    assert levels.max() <= 1.0 + 1e-3, levels.max()
    assert (levels > 0.5).mean() <= 1e-3


def test_geometry():
    assert resized_size(320, 512, 224) == (224, 358)  # LaVie's 320x512 -> 224x358, crop x-offset 67
    assert crop_offset(358, 224, "round") == crop_offset(358, 224, "floor") == 67
    assert (crop_offset(359, 224, "round"), crop_offset(359, 224, "floor")) == (68, 67)  # 67.5: round half to even
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        preprocess_frames(np.zeros((2, 3, 8, 8), np.uint8))
