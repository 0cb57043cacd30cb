"""Still images as inputs (the i2v stage: `lavie-sample --image FILE`): 8-bit RGB only, one clear error otherwise.

SEINE reads images with `np.array(PIL.Image.open(path))` and no `.convert('RGB')`, so a grey or RGBA picture fails
deep inside its transforms; here each such file is refused up front with the fix (converting silently would pick a
background colour or a tone curve for the user).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageReadError(ValueError):
    """An image cannot be used as given: the message says why and how to fix it."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 `[H, W, 3]` of an 8-bit RGB image file; ImageReadError for a missing file, another format, a grey,
    palette-less grey+alpha, RGBA or 16-bit image."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"--image {p}: no such file")
    try:
        with Image.open(p) as im:
            mode, bits = im.mode, im.info.get("bits")
            if mode == "P":  # palette images hold RGB colours: expand them (lossless) unless they carry alpha
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            fix = f"convert it to 8-bit RGB first, e.g. `convert {p} -flatten -depth 8 -type TrueColor out.png`"
            if mode in ("RGBA", "LA", "PA") or mode.endswith("A"):
                raise ImageReadError(f"--image {p} has an alpha channel ({mode}): the model takes opaque RGB; flatten "
                                     f"it onto a background: {fix}")
            if mode in ("I;16", "I;16B", "I;16L", "I", "F") or (bits is not None and bits > 8):
                raise ImageReadError(f"--image {p} is a 16-bit or float image ({mode}): the model takes 8-bit RGB; "
                                     f"{fix}")
            if mode in ("L", "1"):
                raise ImageReadError(f"--image {p} is greyscale ({mode}): the model takes RGB; {fix}")
            if mode != "RGB":
                raise ImageReadError(f"--image {p} is a {mode} image: the model takes 8-bit RGB; {fix}")
            array = np.asarray(im)
    except UnidentifiedImageError:
        raise ImageReadError(f"--image {p} is not an image PIL can read; give a PNG or JPEG") from None
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ImageReadError(f"--image {p}: expected 8-bit RGB pixels, got {array.dtype} {array.shape}")
    return array


def read_images(paths: list[str | os.PathLike]) -> np.ndarray:
    """The frames of one i2v request, uint8 `[K, H, W, 3]`: one image (animate) or two (a transition: first and
    last), of one size; ImageReadError otherwise."""
    if len(paths) not in (1, 2):
        raise ImageReadError(f"got {len(paths)} --image files: give 1 (animate it) or 2 (a transition from the first "
                             "to the second)")
    images = [read_image(p) for p in paths]
    if len({im.shape for im in images}) > 1:
        a, b = (f"{im.shape[1]}x{im.shape[0]}" for im in images)
        raise ImageReadError(f"the two --image files differ in size ({paths[0]}: {a}, {paths[1]}: {b}); give "
                             "images of one size (each is resized to sample.width x sample.height when sampled)")
    return np.stack(images)
