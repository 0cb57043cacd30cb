"""The held-out loss of `train.eval`: the stage's loss on fixed validation examples at fixed timesteps, fixed noise.

    held = HeldOutLoss.build(config, run, tokenize)      # reads `train.eval.num_batches` batches once
    values = held(state)                                   # {'eval/loss': ..., 'eval/loss_t100': ..., ...}

Fields of `train.eval` (configs/common.py): `every` (steps between evaluations, and the last step; 0 = off),
`num_batches`, `split`, `precomputed_name`, `timesteps`, `seed`, `params` ('ema' | 'raw'); the sampled evaluation's
(`samples`, `sample_every`, `pixel_dataset`, `fvd`, `fvd_protocol`, `i3d`, `clip`, `input_fps`) are read by
lavie_jax.evaluation.in_training.

Every draw of the evaluation (noise, posterior samples, the VSR low-res level) comes from `train.eval.seed` and the
example's position in the held-out set, never from the run's key or step, and the timesteps are the listed ones
instead of random ones; text dropout is off. So the numbers depend only on the params: a curve of them is smooth
where the training loss is noise, the same on any mesh and process count (up to float reduction order), and
comparable between runs of one data set. The held-out examples are `train.eval.num_batches` global batches of
`data.split = train.eval.split` (unshuffled; a precomputed data set reads `train.eval.precomputed_name`), read once
and kept on the devices. Evaluation reads the train state and nothing else: it changes neither the trajectory nor
the checkpoints nor the data position (tests/train/test_held_out.py checks it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lavie_jax import parallel
from lavie_jax.data import distributed as data_distributed
from lavie_jax.data.pipeline import make_iterator
from lavie_jax.runtime import program_cache
from lavie_jax.train.step import Objective, StageInputs, TrainState, stage_loss

PARAM_CHOICES = ("ema", "raw")


class EvalConfigError(ValueError):
    """A `train.eval` field is unusable; the message names it and the fix."""


def check_eval_config(config: ml_collections.ConfigDict) -> None:
    """Refuse unusable `train.eval` values before anything runs (EvalConfigError naming the field)."""
    e = config.train.get("eval")
    if e is None or not e.every:
        return
    if int(e.every) < 0:
        raise EvalConfigError(f"train.eval.every={e.every}: must be >= 0 (0 turns evaluation off)")
    if int(e.num_batches) < 0:
        raise EvalConfigError(f"train.eval.num_batches={e.num_batches}: must be >= 0 (0: no held-out loss)")
    if int(e.num_batches) == 0 and not e.get("samples"):
        raise EvalConfigError("train.eval.num_batches=0 and train.eval.samples=0: the evaluation would measure "
                              "nothing; set one of them, or train.eval.every=0")
    steps = tuple(int(t) for t in e.timesteps)
    top = int(config.sample.num_train_timesteps)
    if not steps or any(not 0 <= t < top for t in steps):
        raise EvalConfigError(f"train.eval.timesteps={tuple(e.timesteps)}: give one or more timesteps in "
                              f"[0, {top}) (sample.num_train_timesteps)")
    for field in ("samples", "sample_every"):
        if int(e.get(field, 0)) < 0:
            raise EvalConfigError(f"train.eval.{field}={e[field]}: must be >= 0")
    if int(e.get("sample_every", 0)) % int(e.every):
        raise EvalConfigError(f"train.eval.sample_every={e.sample_every}: sampled evaluations run at evaluations, so "
                              f"it must be a multiple of train.eval.every={e.every} (0: at every evaluation)")
    if e.params not in PARAM_CHOICES:
        raise EvalConfigError(f"train.eval.params={e.params!r}: choose one of {PARAM_CHOICES}")
    if config.data.dataset == "precomputed" and int(e.num_batches) and not e.precomputed_name:
        raise EvalConfigError("train.eval.precomputed_name is empty but data.dataset='precomputed': name the "
                              "precomputed data set of held-out examples (lavie_jax.data.precompute), or set "
                              "--config.train.eval.every=0")


def held_out_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data section of the held-out examples: the run's, on `train.eval.split`, unshuffled, from the start."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    e = config.train.eval
    data.split, data.shuffle, data.num_epochs, data.drop_remainder = e.split, False, 0, True
    if data.dataset == "precomputed":
        data.precomputed.name, data.split = e.precomputed_name, "train"
    return data


@dataclasses.dataclass
class HeldOutLoss:
    """The held-out batches on the devices and the jitted loss over them (module docstring)."""

    timesteps: tuple[int, ...]
    batches: list[dict[str, jax.Array]]
    loss_fn: Callable  # jitted (params, frozen, encoders, tables, batch, batch_number) -> (loss [T], video [T])
    use_ema: bool
    encoders: Any
    tables: Mapping[str, jax.Array]

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, *, objective: Objective, graphdef: nnx.GraphDef,
              inputs_graphdefs: tuple[nnx.GraphDef | None, nnx.GraphDef | None], encoders: Any,
              tables: Mapping[str, jax.Array], mesh: jax.sharding.Mesh, state_shardings: TrainState,
              encoder_shardings: Any, tokenize: Callable[[str], np.ndarray] | None, program_key: str
              ) -> HeldOutLoss:
        """Read the held-out batches onto `mesh` and make the loss program. `program_key`: everything the step's
        program captures (setup._step_key: the run config and model graphs), this program's cache key."""
        e = config.train.eval
        check_eval_config(config)
        objective = dataclasses.replace(objective, text_dropout=0.0, micro_batches=1)
        loss = stage_loss(objective, graphdef, StageInputs(objective, *inputs_graphdefs))
        timesteps = tuple(int(t) for t in e.timesteps)
        size = int(config.data.global_batch_size)
        base_key = jax.random.key(int(e.seed))

        def evaluate(params, frozen, encoders, tables, batch, number):
            batch = dict(batch, index=number * size + jnp.arange(size, dtype=jnp.int32))
            key = jax.random.fold_in(base_key, 0)  # every example's key: its position in the held-out set

            total, aux = loss(params, frozen, encoders, tables, batch, key, timestep=jnp.asarray(timesteps))
            return total, aux["video_loss"]  # [T] each

        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        fn = program_cache.Program(evaluate, key=json.dumps([program_key, "held-out"]),
                                   in_shardings=(state_shardings.params, state_shardings.frozen, encoder_shardings,
                                                 replicated, parallel.batch_sharding(mesh), replicated),
                                   out_shardings=replicated)
        iterator = make_iterator(held_out_data(config), tokenize=tokenize)
        batches = []
        for _ in range(int(e.num_batches)):
            local = next(iterator)
            numeric = {k: v for k, v in local.items() if np.asarray(v).dtype.kind in "biuf" and k != "is_image"}
            batches.append(data_distributed.make_global_batch(numeric, mesh))
        use_ema = e.params == "ema"
        return cls(timesteps, batches, fn, use_ema, encoders, tables)

    def __call__(self, state: TrainState) -> dict[str, float]:
        """`{'eval/loss', 'eval/video_loss', 'eval/loss_t<T>' for each timestep}`: means over the held-out set."""
        params = state.ema if self.use_ema and state.ema is not None else state.params
        totals = [self.loss_fn(params, state.frozen, self.encoders, self.tables, batch, jnp.int32(i))
                  for i, batch in enumerate(self.batches)]
        loss, video = (np.mean(np.stack([np.asarray(jax.device_get(t[j])) for t in totals]), axis=0)
                       for j in (0, 1))
        out = {"eval/loss": float(loss.mean()), "eval/video_loss": float(video.mean())}
        out |= {f"eval/loss_t{t}": float(v) for t, v in zip(self.timesteps, loss)}
        return out
