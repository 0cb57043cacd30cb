"""The input check every metric shares: uint8 RGB, channels last, as video files hold them.

Each metric adds its own rules on top (FVD: clip length per protocol; IS: exactly 16 frames) and raises its own
error class; the messages name the problem and the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_uint8_rgb(x: Any, *, layout: str, error: type[ValueError], what: str = "videos") -> np.ndarray:
    """`x` if it is a numpy uint8 array of `layout` ('[B, T, H, W, 3]' or '[N, H, W, 3]': its rank is the number of
    axes named) with at least one item and non-empty frames; else `error` naming the fix."""
    ndim = layout.count(",") + 1
    name = what if what.isidentifier() else "x"  # in the fixes' code
    if not isinstance(x, np.ndarray):
        raise error(f"{what} must be one numpy array {layout}, got a {type(x).__name__}: stack items of one size "
                    "with np.stack (items of different sizes or lengths cannot form one array)")
    if x.ndim != ndim:
        hint = f" (one item: add a batch axis with {name}[None])" if x.ndim == ndim - 1 else ""
        raise error(f"{what} must be RGB {layout} (channels last), got shape {list(x.shape)}{hint}")
    if x.shape[-1] != 3:
        order = (0, *range(2, ndim), 1)
        hint = (f"; channels-first? transpose with {name}.transpose{order}" if x.shape[1] == 3
                else "; grayscale? repeat to 3 channels" if x.shape[-1] == 1 else "")
        raise error(f"{what} must be RGB {layout} (channels last), got shape {list(x.shape)}{hint}")
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and x.size:
            lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
            fix = ("they look like [-1, 1]: pass np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)" if lo < 0
                   else "they look like [0, 1]: pass np.round(x * 255).clip(0, 255).astype(np.uint8)" if hi <= 1.0
                   else "they look like [0, 255]: pass np.round(x).clip(0, 255).astype(np.uint8)")
            raise error(f"{what} must be uint8 0..255 (as video files hold them), got {x.dtype} values in "
                        f"[{lo:.3g}, {hi:.3g}]: {fix}")
        raise error(f"{what} must be uint8 0..255 (as video files hold them), got dtype {x.dtype}")
    if x.shape[0] == 0 or 0 in x.shape[-3:-1]:
        raise error(f"{what} are empty (shape {list(x.shape)})")
    return x
