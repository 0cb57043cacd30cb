"""Whether a train state is fit to be saved: checked at each save (never per step), so that the checkpoint a stopped
run names as its last good one is one a rerun can go on from.

A state is unfit when its params, optimizer state or EMA hold a NaN or an infinity, or when its params exploded:
their largest magnitude grew more than `EXPLODE_FACTOR` times since the last good state (the run's start or its
last save; at least 1.0 is taken as the reference, for params initialised small). A learning rate far too high
does that in one step while the loss still looks finite (measured: lr 5e10 at the first step of the tiny base
turned params of magnitude 2.3 into 5e10, and only the next step's loss was NaN); healthy training moves the
largest param by well under 10x between checkpoints.

The check reads the scan the checkpoint is saved with (lavie_jax.io.state_scan): one host pass over the state.
"""

from __future__ import annotations

import math

from lavie_jax.io.state_scan import StateScan

EXPLODE_FACTOR = 1000.0
CHECKED = ("params", "opt_state", "ema")  # the TrainState groups the check reads (frozen params never change)


def unfit(scan: StateScan, reference: float, factor: float | None = None) -> str | None:
    """Why the scanned state must not be saved (None if it may be): non-finite values, or params whose largest
    magnitude exceeds `factor` (default EXPLODE_FACTOR) times `reference` (the last good state's, at least 1)."""
    factor = EXPLODE_FACTOR if factor is None else factor
    bad = [g for g in CHECKED if g in scan.max_abs and not math.isfinite(scan.max_abs[g])]
    if bad:
        return f"its {' and '.join(_names(bad))} {'hold' if len(bad) > 1 else 'holds'} NaN or infinite values"
    top, limit = scan.max_abs.get("params", 0.0), factor * max(reference, 1.0)
    if top > limit:
        return (f"its params exploded: the largest is {top:.3g}, {top / max(reference, 1.0):.3g} times the "
                f"{max(reference, 1.0):.3g} of the last good state (more than {factor:g} times is taken for a "
                "diverged run)")
    return None


def _names(groups: list[str]) -> list[str]:
    return [{"params": "params", "opt_state": "optimizer state", "ema": "EMA"}[g] for g in groups]
