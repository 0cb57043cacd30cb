"""Whether JAX has started a backend in this process, asked without starting one (and without importing jax).

XLA reads XLA_FLAGS once, when JAX creates its first backend client (the first `jax.devices()`, array or compiled
call), not when jax is imported: `import jax; import flax` leave it unread. So `lavie_jax.runtime.startup` may still
set XLA:CPU options as long as no backend exists. JAX has no public query for that (checked for jax 0.10: neither
`jax` nor `jax.extend.backend` offers one, and the XLA-flags guide only says to set flags "before backend
initialization"); its own code (`jax.distributed.initialize`, `jax.clear_backends`) asks
`jax._src.xla_bridge.backends_are_initialized()`. `started()` uses that private function behind guards:

- jax not imported yet (`sys.modules`): no backend can exist; nothing is imported to find out.
- jax imported: `backends_are_initialized()` if this jax has it, else its `_backends` dict; if neither is there (a
  future jax), the answer is None, "unknown", and callers act as if no backend had started (setting an environment
  variable then does no harm: it only comes too late).
"""

from __future__ import annotations

import sys

_BRIDGE = "jax._src.xla_bridge"


def started() -> bool | None:
    """True if a JAX backend exists in this process, False if none does, None if this jax version gives no way to
    tell. Never starts a backend, never imports jax."""
    if "jax" not in sys.modules:
        return False
    bridge = sys.modules.get(_BRIDGE)
    if bridge is None:  # jax half-imported (lavie_jax imported from inside jax's import): no backend yet
        return False
    query = getattr(bridge, "backends_are_initialized", None)
    if callable(query):
        try:
            return bool(query())
        except Exception:  # noqa: BLE001 - a private function: any change of it means "unknown", never a crash
            return None
    backends = getattr(bridge, "_backends", None)
    return bool(backends) if isinstance(backends, dict) else None


def default_platform() -> str | None:
    """The platform of JAX's default backend ('cpu', 'gpu', 'tpu', ...) if a backend has started, else None (asking
    JAX otherwise would start one)."""
    if not started():
        return None
    try:
        return sys.modules["jax"].default_backend()
    except Exception:  # noqa: BLE001 - only used to word a warning
        return None
