"""Named shapes against a model's: `check_keys` and its `KeyMismatchError`.

Both the checkpoint loader (io layer) and the PyTorch converters (convert layer) compare a set of `name -> shape`
with what a model expects, so the comparison lives here, below both; it imports nothing from lavie_jax.
"""

from __future__ import annotations

from collections.abc import Mapping


class KeyMismatchError(KeyError):
    """State dict and model disagree; the message lists the first offending keys with expected/actual shapes."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def _first(items: list[str], n: int = 8) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_keys(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]], *,
               what: str = "checkpoint") -> None:
    """Raise KeyMismatchError listing missing, unexpected and wrongly shaped keys (first few of each)."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    shapes = sorted(k for k in set(expected) & set(actual) if tuple(expected[k]) != tuple(actual[k]))
    if not (missing or unexpected or shapes):
        return
    lines = [f"{what} does not match the model architecture:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys: " + _first([f"{k} {list(expected[k])}" for k in missing]))
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: " + _first([f"{k} {list(actual[k])}" for k in unexpected]))
    if shapes:
        lines.append(f"  {len(shapes)} keys with wrong shapes: " +
                     _first([f"{k} expected {list(expected[k])} got {list(actual[k])}" for k in shapes]))
    lines.append("  Check that the checkpoint belongs to this stage and that the UNet config matches it.")
    raise KeyMismatchError("\n".join(lines))
