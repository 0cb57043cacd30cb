"""Whether a state is fit to be saved (lavie_jax.train.health), from its scan; the loop's use of it is
tests/train/test_loop.py."""

from __future__ import annotations

import math

from lavie_jax.io.state_scan import StateScan
from lavie_jax.train import health


def _scan(**max_abs: float) -> StateScan:
    return StateScan({}, {"params": 2.3, "opt_state": 1e6, "ema": 2.0, **max_abs})


def test_non_finite_values_or_exploded_params_are_unfit():
    assert health.unfit(_scan(), reference=2.3) is None  # a large optimizer state (Adam's nu) is fine
    assert health.unfit(_scan(opt_state=math.nan), 2.3) == "its optimizer state holds NaN or infinite values"
    assert health.unfit(_scan(params=math.inf, ema=math.nan), 2.3) == "its params and EMA hold NaN or infinite values"
    # lr 5e10 at the first step of the tiny base: finite params of 5e10, the next loss NaN
    assert health.unfit(_scan(params=5e10), 2.3).startswith("its params exploded: the largest is 5e+10, 2.17e+10 "
                                                            "times the 2.3 of the last good state")
    assert health.unfit(_scan(params=999.0), 0.01) is None  # a reference below 1 counts as 1
    assert health.unfit(_scan(params=1001.0), 0.01) is not None
