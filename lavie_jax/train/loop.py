"""The training loop of `lavie-train`: resume, step, log, checkpoint, stop cleanly.

    result = train(config, workdir)        # returns when train.num_steps is reached, or at a preemption

The work directory (`lavie_jax.io.workdir`): `checkpoints/` (orbax, async, the last `train.keep` steps), `metrics.jsonl`
and `tb/` (lavie_jax.train.metrics), `config.json` (the run's config), and `lavie_workdir.json` (what makes it ours).
A rerun of the same command resumes from the latest complete checkpoint (params, EMA, optimizer state, step, data
iterator position); a rerun with a config that changes the run is refused unless `overwrite` (a new workdir is the
other way). SIGTERM (preemption on TPU VMs and SLURM) and a first Ctrl-C save at the next step boundary and return;
a second Ctrl-C stops at once. A NaN or infinite loss stops the run naming the step; the last good checkpoint stays.

Host work overlaps the devices: step k + 1 is dispatched before step k's metrics are read (the loss check and the
logs lag one step), and the next batch is prepared while a step runs (grain's read threads). Every step's loss is
checked; a logged line holds the mean of each loss and of the grad norm over the steps since the previous line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from lavie_jax import parallel
from lavie_jax.io import safe_io
from lavie_jax.io import workdir as workdirs
from lavie_jax.io.workdir_lock import WorkdirLock
from lavie_jax.data import distributed as data_distributed
from lavie_jax.data.pipeline import make_iterator
from lavie_jax.io.text import tokenize
from lavie_jax.io.state_scan import scan_state
from lavie_jax.train import health
from lavie_jax.train.held_out import HeldOutLoss
from lavie_jax.train.metrics import MetricsWriter
from lavie_jax.train.preemption import PreemptionHandler
from lavie_jax.train.setup import (Run, TrainConfigError, build_run, check_run, checkpointed, peak_tflops,
                                  personalising, with_frozen)

CONFIG_FILE = "config.json"
CONFIG_TMP = CONFIG_FILE + ".tmp"
METRIC_ORDER = ("loss", "video_loss", "image_loss", "grad_norm", "lr")  # the order of a logged line


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the checkpoint kept."""


@dataclasses.dataclass
class TrainResult:
    step: int  # the last step whose update was applied (and saved)
    stopped: str | None  # why the run stopped early ('SIGTERM', 'SIGINT', ...), None when it finished
    resumed_from: int | None
    metrics: dict[str, float]  # the last logged values


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[lavie-train] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ work directory

def _agreed(fn: Callable[[], Any], what: str) -> Any:
    """`fn()` on every process; if it raised on any, every process raises (its own error, or one naming the
    processes that failed), so no process goes on to wait for the others in a collective."""
    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after every process knows
        error = e
    failed = parallel.failed_processes(error is not None)
    if error is not None:
        raise error
    if failed:
        raise TrainConfigError(f"process(es) {failed} {what} (their errors say why)")
    return result


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The run's mesh (`mesh.shape` over all devices, or `devices`); a shape that does not fit is a
    TrainConfigError naming the field."""
    try:
        return parallel.make_mesh(config.mesh.shape, devices)
    except ValueError as e:
        raise TrainConfigError(f"config field {e}; -1 takes the remaining devices, e.g. "
                               "--config.mesh.shape=(-1,1,1,1)") from None


def prepare_workdir(path: str | os.PathLike, config: ml_collections.ConfigDict, overwrite: bool
                    ) -> tuple[Path, WorkdirLock | None]:
    """Make `path` this run's work directory and take its lock (process 0 writes and holds the lock, returned
    to it, None elsewhere; every process returns after it did). Release the lock when the run ends.

    A missing or empty directory becomes a new work directory; one of ours is resumed if its stored config is this
    run's up to the fields a resumed run may change (`lavie_jax.io.run_config`; one without a checkpoint takes this
    run's config), or replaced with `overwrite`; anything else is refused, nothing touched. A work directory in use
    by another trainer is refused before anything is read or written (`lavie_jax.io.workdir_lock`)."""
    path = safe_io.absolute(path)
    lock = _agreed(lambda: _prepare_on_primary(path, config, overwrite) if jax.process_index() == 0 else None,
                   f"could not prepare --workdir {path}")
    return path, lock


def _prepare_on_primary(path: Path, config: ml_collections.ConfigDict, overwrite: bool) -> WorkdirLock:
    for attempt in range(2):
        exists = path.exists() and (not path.is_dir() or any(path.iterdir()))
        if exists:
            reason = workdirs.WORKDIRS.why_not(path)
            if reason is not None:
                raise safe_io.OutputPathError(f"--workdir {path} is not a lavie-train work directory ({reason}); "
                                              "lavie-train never writes into or replaces other directories: choose a "
                                              "new or empty --workdir")
            lock = WorkdirLock.acquire(path)  # a second trainer stops here, before reading or writing anything
            if not overwrite:
                with _released_on_error(lock):
                    _resume_config(path, config)
                return lock
        else:
            lock = None
        try:
            return _create(path, config, overwrite)
        except safe_io.OutputPathError:
            if exists or attempt or not path.exists():
                raise
            # another trainer created it meanwhile: go the way of an existing work directory (its lock refuses)
        finally:
            if lock is not None:  # the replaced directory's lock: that directory is gone
                lock.release()
    raise AssertionError("unreachable")


def _create(path: Path, config: ml_collections.ConfigDict, overwrite: bool) -> WorkdirLock:
    """A new work directory at `path` (replacing ours with `overwrite`); it appears with its lock held."""
    safe_io.check_output_directory(path, workdirs.WORKDIRS, overwrite=overwrite, flag="--workdir")
    lock = None
    try:
        with safe_io.atomic_directory(path, workdirs.WORKDIRS, overwrite=overwrite, flag="--workdir") as tmp:
            workdirs.WORKDIRS.write_marker(tmp, "train", stage=config.stage)
            (tmp / CONFIG_FILE).write_text(_config_text(config))
            lock = WorkdirLock.acquire(tmp)
        lock.moved_to(path)
        return lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


@contextlib.contextmanager
def _released_on_error(lock: WorkdirLock):
    try:
        yield
    except BaseException:
        lock.release()
        raise


def _config_text(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(indent=1) + "\n"


def _has_checkpoints(path: Path) -> bool:
    """Whether the work directory holds a checkpoint step (complete or not; orbax's temporaries do not count)."""
    directory = path / workdirs.CHECKPOINTS_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _resume_config(path: Path, config: ml_collections.ConfigDict) -> None:
    """Check this run's config against the stored one and store it (changes in resumable fields are said)."""
    stored = path / CONFIG_FILE
    if stored.is_file() and _has_checkpoints(path):
        changed = workdirs.check_config(stored.read_text(), config, where=f"--workdir {path}")
        if not changed:
            return
        changes = workdirs.config_changes(stored.read_text(), config)
        _say("resuming with changed settings: " + "; ".join(f"{f}: {changes[f]}" for f in changed))
    elif stored.is_file():
        if not workdirs.config_changes(stored.read_text(), config):
            return
        _say(f"{path} holds no checkpoint yet: this run's config replaces its {CONFIG_FILE}")
    tmp = path / CONFIG_TMP  # listed in the work directory's layout: a torn write never makes it foreign
    tmp.write_text(_config_text(config))
    os.replace(tmp, stored)


# ------------------------------------------------------------------------------------------------ data

def _tokenizer_fn(run: Run):
    length = run.encoders.null_tokens.shape[0]
    return lambda caption: tokenize(run.tokenizer, [str(caption)], max_length=length)[0]


def _device_batch(batch: Mapping[str, Any], run: Run) -> dict[str, jax.Array]:
    """A local numpy batch -> global arrays on the mesh (numeric keys only: captions were tokenized)."""
    numeric = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf" and k != "is_image"}
    return data_distributed.make_global_batch(numeric, run.mesh)


def _finite(metrics: Mapping[str, Any]) -> bool:
    return all(math.isfinite(float(v)) for v in metrics.values())


# ------------------------------------------------------------------------------------------------ the loop

def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, overwrite: bool = False,
          console: bool = True, devices: Sequence[jax.Device] | None = None,
          on_workdir: Callable[[Path], None] | None = None) -> TrainResult:
    """Train `config.stage` in `workdir` until `config.train.num_steps` (see the module docstring). The mesh
    (`config.mesh.shape`) spans all devices, or `devices` (e.g. one device of several, in tests). `on_workdir` is
    called with the prepared work directory before the run's programs compile (lavie-train turns on the
    compilation cache it keeps there)."""
    try:
        return _train(config, workdir, overwrite, console, devices, on_workdir)
    except KeyboardInterrupt as e:  # Ctrl-C twice, or SIGTERM outside the loop (lavie-train's guard): say what is kept
        steps = workdirs.committed_steps(safe_io.absolute(workdir))
        e.add_note(f"the last checkpoint is step {steps[-1]}: rerun the same command to resume from it" if steps else
                   "nothing was saved: rerun the same command to start from the beginning")
        raise


def _train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, overwrite: bool, console: bool,
           devices: Sequence[jax.Device] | None, on_workdir: Callable[[Path], None] | None) -> TrainResult:
    t = config.train
    mesh = make_mesh(config, devices)
    checked = _agreed(lambda: check_run(config, mesh), "found a bad setting")  # before anything is written
    path, lock = prepare_workdir(workdir, config, overwrite)
    try:
        if on_workdir is not None:
            on_workdir(path)
        _say(f"{config.stage} stage on {jax.device_count()} device(s) ({jax.devices()[0].device_kind}), mesh "
             f"{dict(mesh.shape)}, {jax.process_count()} process(es); work directory {path}")
        ckpt = workdirs.TrainCheckpointer(path, save_every=t.checkpoint_every, keep=t.keep,
                                          keep_every=t.keep_every, config=config)
        try:
            # a resumed run restores every leaf of the state: it is built abstractly (no random init or
            # `train.init` read, which for a full-size UNet is a compile and seconds of device time thrown away)
            latest = ckpt.latest_step()
            # (a LoRA run's frozen base is not in its checkpoints: it is read from train.init, so built for real)
            run = build_run(config, mesh, abstract=latest is not None and not personalising(config), checked=checked)
            _say(f"params: {run.groups.summary()}")
            restored = _restore(run, ckpt, config) if latest is not None else None
            if latest is not None and restored is None:  # every step was damaged (each one said so)
                _say("no checkpoint could be restored: starting from the beginning")
                run = build_run(config, mesh, checked=checked)
            return _loop(run, config, path, ckpt, restored, console)
        finally:
            ckpt.close()
    finally:
        if lock is not None:
            lock.release()


def _restore(run: Run, ckpt: workdirs.TrainCheckpointer, config: ml_collections.ConfigDict
             ) -> workdirs.Restored | None:
    """The newest checkpoint that reads back intact (a damaged one is moved aside, with a warning, for the one
    before it), onto the run's shardings; None if none does."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            checkpointed(config, run.state), checkpointed(config, run.state_shardings))
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        workdirs.check_config(restored.config, config)
        restored = dataclasses.replace(restored, state=with_frozen(config, restored.state, run.state))
    return restored


def _loop(run: Run, config: ml_collections.ConfigDict, path: Path, ckpt: workdirs.TrainCheckpointer,
          restored: workdirs.Restored | None, console: bool) -> TrainResult:
    t = config.train
    state, resumed, data_state = ((restored.state, restored.step, restored.data_state) if restored is not None
                                  else (run.state, None, None))
    if restored is not None and restored.saved_data_states is not None:
        data_state = _moved_data_state(restored)
    start = int(jax.device_get(state.step))
    if resumed is not None:
        _say(f"resumed from step {resumed} ({path / workdirs.CHECKPOINTS_DIR / str(resumed)})")
    if start >= t.num_steps:
        _say(f"already at step {start} of train.num_steps={t.num_steps}: nothing to do")
        return TrainResult(start, None, resumed, {})
    d = config.data
    if d.data_dir and d.prepare and not os.path.exists(d.data_dir):  # check_run refused what must exist
        _say(f"data.data_dir {d.data_dir} does not exist: the {d.dataset} dataset is built there now" +
             (" (procedural: generated, nothing is read or downloaded)" if d.dataset == "moving_shapes" else
              " from the files named by the data section"))
    iterator = make_iterator(config.data, tokenize=_tokenizer_fn(run))
    if data_state is not None:
        iterator.set_state(data_state)
    peak, peak_source = peak_tflops(config)
    _say(f"{run.flops_per_step / 1e12:.4g} TFLOP per step (analytic); MFU against {peak:.4g} TFLOP/s per device "
         f"({peak_source})")
    writer = MetricsWriter(str(path), total_steps=t.num_steps, start_step=start,
                           examples_per_step=config.data.global_batch_size, flops_per_step=run.flops_per_step,
                           num_devices=jax.device_count(), peak_tflops=peak, console=console)
    evaluate = _evaluation(run, config, writer)
    last: dict[str, float] = {}
    window: dict[str, list[float]] = {}  # each metric's values since the last logged line
    pending: tuple[int, Any] | None = None  # (step after the update, metrics on device) not yet checked
    good = start  # the last step known to have a finite loss
    scan = (restored.scan if restored is not None and restored.scan is not None
            else scan_state(checkpointed(config, state)))
    reference = scan.max_abs.get("params", 0.0)  # of the last good state: a save checks its params against it
    stopped = None
    with writer, PreemptionHandler(sigint=True) as preemption, jax.set_mesh(run.mesh):
        step = start
        while step < t.num_steps:
            batch = _device_batch(next(iterator), run)
            state, metrics = run.step_fn(state, run.encoders, run.tables, batch)
            step += 1
            ckpt.poll()  # a save that failed in the background stops the run here (a flag read while it writes)
            if pending is not None:  # the previous step's metrics, read while this step runs
                last = _check_and_log(pending, writer, t, good, ckpt, window)
                good = pending[0]
            pending = (step, metrics)
            if evaluate is not None and (step % t.eval.every == 0 or step == t.num_steps):
                began = time.monotonic()
                writer.write(step, evaluate(state, step), speed=False)  # reads the state the next step donates
                writer.exclude(time.monotonic() - began)
            if ckpt.should_save(step) or step == t.num_steps or preemption.should_stop(step):
                last = _check_and_log(pending, writer, t, good, ckpt, window, force=True)
                good, pending = step, None
                reference = _save(ckpt, step, state, iterator, reference, config)
                if preemption.should_stop(step) and step < t.num_steps:
                    stopped = preemption.reason
                    ckpt.wait()
                    _say(preemption.stop_message(step))
                    break
        if pending is not None:
            last = _check_and_log(pending, writer, t, good, ckpt, window, force=True)
    ckpt.wait()
    if stopped is None:
        _say(f"finished: step {step}, checkpoint in {path / workdirs.CHECKPOINTS_DIR / str(step)}; sample with "
             f"`lavie-sample --checkpoint {path}`")
    return TrainResult(step, stopped, resumed, last)


def _evaluation(run: Run, config: ml_collections.ConfigDict, writer: MetricsWriter
                ) -> Callable[[Any, int], dict[str, float]] | None:
    """The run's evaluation (`train.eval`): `evaluate(state, step) -> metrics`, the held-out loss and, every
    `sample_every` steps, the sampled evaluation (its frame grid goes to TensorBoard); None when it is off."""
    e = config.train.get("eval")
    if e is None or not e.every:
        return None
    held = _held_out_loss(run, config) if e.num_batches else None
    use_ema = e.params == "ema"
    if not e.get("samples"):
        return lambda state, step: held(state)
    from lavie_jax.evaluation.in_training import SampledEvaluation

    models = run.encoder_models
    sampled = SampledEvaluation.build(config, run.mesh, vae=models.vae, text_encoder=models.text_encoder,
                                      tokenizer=models.tokenizer)
    every = e.sample_every or e.every
    _say(f"sampled evaluation every {every} steps: {e.samples} held-out requests"
         + (", FVD" if e.fvd else "") + (", CLIPSIM" if e.clip else "") + " (frame grid in TensorBoard)")

    def evaluate(state, step: int) -> dict[str, float]:
        values = held(state) if held is not None else {}
        if step % every == 0 or step == config.train.num_steps:
            params = state.ema if use_ema and state.ema is not None else state.params
            metrics, grid = sampled(nnx.merge(run.graphdef, params, state.frozen))
            values |= metrics
            writer.image(step, "eval/samples", grid)
        return values

    return evaluate


def _held_out_loss(run: Run, config: ml_collections.ConfigDict) -> HeldOutLoss:
    e = config.train.eval
    held = HeldOutLoss.build(config, objective=run.objective, graphdef=run.graphdef,
                             inputs_graphdefs=run.inputs_graphdefs, encoders=run.encoders, tables=run.tables,
                             mesh=run.mesh, state_shardings=run.state_shardings,
                             encoder_shardings=run.encoder_shardings, tokenize=_tokenizer_fn(run),
                             program_key=run.program_key)
    _say(f"evaluation every {e.every} steps: the held-out loss of {e.num_batches} x "
         f"{config.data.global_batch_size} {e.split} examples at timesteps {tuple(held.timesteps)} "
         f"({'EMA' if held.use_ema and run.state.ema is not None else 'raw'} params)")
    return held


def _moved_data_state(restored: workdirs.Restored) -> Any:
    """The data position of a run resumed on another number of processes: the same global batch where the saved
    states tell it (lavie_jax.data.distributed.moved_state), else None (the iterators start over, with a warning)."""
    saved, count = len(restored.saved_data_states), jax.process_count()
    moved = data_distributed.moved_state(restored.saved_data_states, count)
    if moved is None:
        warnings.warn(f"step {restored.step} was saved by {saved} processes, this run has {count}: the data "
                      "iterators cannot resume their positions (they start over)", stacklevel=3)
    else:
        _say(f"step {restored.step} was saved by {saved} process(es), this run has {count}: the data go on at the "
             "same global batch")
    return moved


def _save(ckpt: workdirs.TrainCheckpointer, step: int, state: Any, iterator: Any, reference: float,
          config: ml_collections.ConfigDict) -> float:
    """Save `step` if the state is fit to be (lavie_jax.train.health), else stop naming the last good checkpoint;
    returns the saved params' largest magnitude (the next save's reference)."""
    state = checkpointed(config, state)  # a LoRA run's frozen base is stored once, in train.init
    scan = scan_state(state)  # every process: it gathers their partial sums
    problem = health.unfit(scan, reference)
    if problem:
        raise NonFiniteLossError(f"step {step}: {problem}; the run stopped without saving it. "
                                 f"{_advice(ckpt, config.train)}")
    ckpt.save(step, state, iterator.get_state, force=True, scan=scan)
    return scan.max_abs.get("params", 0.0)


def _advice(ckpt: workdirs.TrainCheckpointer, t: ml_collections.ConfigDict) -> str:
    """What to do after a diverged step: which checkpoint a rerun resumes from, and a lower learning rate."""
    ckpt.wait()
    latest = ckpt.latest_step()
    lr = t.optimizer.lr / 10 if t.optimizer.lr <= 1e-2 else 1e-4  # a tenth, or a usual Adam lr for an absurd one
    lower = f"lower train.optimizer.lr (e.g. --config.train.optimizer.lr={lr:g}) or check the data"
    if latest is None:
        return f"No checkpoint was saved: {lower}, then rerun to start from the beginning."
    return (f"The last good checkpoint is step {latest} (its params, optimizer state and EMA were checked when "
            f"saved): {lower}, then rerun to resume from it (the optimizer settings, train.optimizer.*, may change "
            "on resume).")


def _check_and_log(pending: tuple[int, Any], writer: MetricsWriter, t: ml_collections.ConfigDict, good: int,
                   ckpt: workdirs.TrainCheckpointer, window: dict[str, list[float]], force: bool = False
                   ) -> dict[str, float]:
    """Read a step's metrics; stop on a non-finite loss; every `train.log_every` steps (and when forced) log the
    means of the losses and grad norms over the steps since the last line (one step's loss is noise), and the lr."""
    step, metrics = pending
    values = jax.device_get(metrics)
    host = {k: float(values[k]) for k in sorted(values, key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER
                                                                        else len(METRIC_ORDER), k))}
    if not _finite(host):
        bad = ", ".join(f"{k}={v}" for k, v in host.items() if not math.isfinite(v))
        raise NonFiniteLossError(f"step {step}: {bad}; the run stopped without saving it (the loss was finite "
                                 f"through step {good}). {_advice(ckpt, t)}")
    for k, v in host.items():
        window.setdefault(k, []).append(v)
    if step % t.log_every == 0 or force:
        logged = {k: (v[-1] if k == "lr" else float(np.mean(v))) for k, v in window.items()}
        window.clear()
        writer.write(step, logged)
        return logged
    return host
