"""Preemption: stop at a step boundary that every process agrees on, so the loop can save and exit cleanly.

TPU VMs and SLURM announce preemption with SIGTERM (SLURM follows with SIGKILL after its KillWait, 30 s by
default; a TPU VM gets about as long): the loop saves the current step, waits for the save, prints one line and
exits 0, and the same command resumes from that step.

    with PreemptionHandler(sync_every=10) as preemption:
        for step in range(start + 1, num_steps + 1):
            state = train_step(state, next(it))
            ckpt.save(step, state, it.get_state)
            if preemption.should_stop(step):          # every process, every step
                ckpt.save(step, state, it.get_state, force=True); ckpt.close()
                print(preemption.stop_message(step)); return 0

Two ways to learn of it (`mode`):
- 'jax': JAX's preemption service. `jax.distributed.initialize()` starts it by default (`jax_enable_preemption_service`)
  and installs its own (C++) SIGTERM handler; on Cloud TPU it also hears maintenance events. `should_stop` asks
  `multihost_utils.reached_preemption_sync_point(step)`, a local check (no communication per step): the service
  agrees on the step in the background (the largest step any process reached, plus one). Our SIGTERM handler is
  NOT installed then (it would replace JAX's); SIGINT, if asked for, still is.
- 'signal': our Python handlers set a flag. With one process `should_stop` returns it at once. With several, every
  `sync_every` steps all processes all-gather their flags (`multihost_utils.process_allgather` of one bool) and
  stop together if any was signalled. Cost: a few ms of collective (2 ms between two CPU processes here) plus a
  host sync: the host waits for the steps already dispatched before it can dispatch more, i.e. one drained
  dispatch pipeline per `sync_every` steps. A stop is then seen up to `sync_every - 1` steps late: keep
  `sync_every * step_time` well inside the grace period.
- 'auto' (default): 'jax' when JAX's preemption service is running, else 'signal'.

Either way `should_stop(step)` must be called by every process at every step, with the same steps.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import types
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lavie_jax.io import interrupts

log = logging.getLogger(__name__)

MODES = ("auto", "jax", "signal")


def jax_preemption_service_running() -> bool:
    """Whether `jax.distributed` runs JAX's preemption sync manager (which then owns SIGTERM)."""
    if not jax.distributed.is_initialized():
        return False
    try:  # the manager itself is not public API: guard, and fall back on the public config flag
        from jax._src import distributed as _distributed

        return getattr(_distributed.global_state, "preemption_sync_manager", None) is not None
    except (ImportError, AttributeError):
        return bool(getattr(jax.config, "jax_enable_preemption_service", False))


class PreemptionHandler:
    """Context manager: catch SIGTERM (and SIGINT if asked) and answer `should_stop(step)` the same everywhere.

    sigint: also stop gracefully on the first Ctrl-C; a second one raises KeyboardInterrupt as usual (not when the
        process ignores SIGINT, as a background job does).
    sync_every: with several processes in 'signal' mode, how often (in steps) the flags are all-gathered.
    mode: 'auto', 'jax' or 'signal' (see the module docstring).
    Handlers are installed on entry (main thread only) and the previous ones put back on exit.
    """

    def __init__(self, *, sigint: bool = False, sync_every: int = 10, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.sigint, self.sync_every, self.requested_mode = sigint, sync_every, mode
        self.mode = mode
        self._reason: str | None = None  # first local cause: 'SIGTERM', 'SIGINT' or a request_stop reason
        self._received_at: float | None = None
        self._stopped_reason: str | None = None  # the cause `should_stop` agreed on
        self._previous: dict[int, Any] = {}

    # ---- signals

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        # Runs between bytecodes of the main thread: only set fields here (printing could re-enter the I/O
        # buffer that the interrupted code was writing to).
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self._reason == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        if self._reason is None:
            self._reason, self._received_at = name, time.time()

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be entered on the main thread (Python delivers signals there)")
        running = jax_preemption_service_running()
        if self.requested_mode == "jax" and not running:
            raise RuntimeError("mode='jax' needs JAX's preemption service: call jax.distributed.initialize() with "
                               "jax_enable_preemption_service on (the default)")
        self.mode = "jax" if self.requested_mode == "jax" or (self.requested_mode == "auto" and running) else "signal"
        # under lavie-train's guard, a signal that came before is an interrupt (nothing saved, exit 143) even if its
        # exception was lost or its delivery is still due: our handler would take that delivery for a new signal
        interrupts.raise_lost()
        # an ignored SIGINT stays ignored: a job started in the background without job control inherits it so,
        # as the terminal's Ctrl-C is not meant for it (lavie-sample does the same, interrupts.terminate_as_interrupt)
        sigint = self.sigint and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        signals = ([] if self.mode == "jax" else [signal.SIGTERM]) + ([signal.SIGINT] if sigint else [])
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the closest we can restore.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    # ---- queries

    @property
    def signalled(self) -> bool:
        """Whether this process received a stop signal or request (not yet agreed with the others)."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why `should_stop` returned True ('SIGTERM', 'SIGINT', 'preemption notice', a request), else None."""
        return self._stopped_reason

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask for a stop as if signalled (e.g. a time budget ran out), on this process."""
        if self._reason is None:
            self._reason, self._received_at = reason, time.time()

    def _any_process(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return flag
        return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag))).any())

    def should_stop(self, step: int) -> bool:
        """True when the loop should save `step` and exit; the same answer on every process at every step.

        Call it on every process at every step (it may be a collective, see the module docstring)."""
        if self._stopped_reason is not None:
            return True
        stop, reason = False, self._reason
        if self.mode == "jax" and multihost_utils.reached_preemption_sync_point(step):
            stop, reason = True, reason or "preemption notice"
        if jax.process_count() == 1:
            stop = stop or self._reason is not None
        elif step % self.sync_every == 0:
            stop = self._any_process(stop or self._reason is not None) or stop
        if stop:
            self._stopped_reason = reason or "stop on another process"
            late = f" ({time.time() - self._received_at:.1f} s after it arrived)" if self._received_at else ""
            log.warning("stopping at step %d: %s%s", step, self._stopped_reason, late)
        return stop

    def stop_message(self, step: int) -> str:
        """The one line to print after the final save: which step was saved and how to resume."""
        return f"{self._stopped_reason or 'stopped'}: saved checkpoint at step {step}; rerun the same command to resume"

