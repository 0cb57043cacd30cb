"""Programs the checkpointing and preemption tests run in subprocesses (not collected by pytest).

    python -m tests.train.loop_child loop WORKDIR --steps 20 --save-every 5 --out final.npz [--distributed PORT N I]
        A tiny training loop without a model: a counter state of a few sharded arrays and an RNG key, updated by a
        jitted step that donates it, saved by TrainCheckpointer, stopped by PreemptionHandler. Prints
        `start S`, `step I` per step, and at the end `done N` or the preemption line; resumes when rerun.
    python -m tests.train.loop_child big-save WORKDIR --mb 256
        Saves a small step 1, starts an async save of a large step 2, prints `saving 2` and sleeps (to be killed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _state_fns(mesh):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    axis = mesh.axis_names[0]
    sh = {"step": NamedSharding(mesh, P()), "x": NamedSharding(mesh, P(axis)), "count": NamedSharding(mesh, P(axis)),
          "key": NamedSharding(mesh, P())}

    def init():
        return {"step": jnp.int32(0), "x": jnp.zeros((64,), jnp.float32), "count": jnp.zeros((8, 4), jnp.int32),
                "key": jax.random.key(7)}

    def update(s):
        key, sub = jax.random.split(s["key"])
        x = s["x"] * 0.9 + jax.random.uniform(sub, s["x"].shape)  # elementwise: bitwise equal on any mesh
        return {"step": s["step"] + 1, "x": x, "count": s["count"] + s["step"], "key": key}

    init = jax.jit(init, out_shardings=sh)
    update = jax.jit(update, in_shardings=(sh,), out_shardings=sh, donate_argnums=0)
    return init, update


def loop(args) -> int:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if args.distributed:
        port, n, i = args.distributed
        jax.distributed.initialize(f"localhost:{port}", int(n), int(i))
    from lavie_jax.io.workdir import TrainCheckpointer, check_config
    from lavie_jax.train.preemption import PreemptionHandler

    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    init, update = _state_fns(mesh)
    config = {"train": {"num_steps": args.steps, "save_every": args.save_every}, "seed": 7}
    ckpt = TrainCheckpointer(args.workdir, save_every=args.save_every, keep=2, config=config)
    start = ckpt.latest_step()
    state = init()
    data = {"next_index": 0}
    if start is not None:
        check_config(ckpt.stored_config(start), config)
        restored = ckpt.restore(start, state)
        state, data = restored.state, restored.data_state
        assert data["next_index"] == 3 * start, data
    start = start or 0
    print(f"start {start}", flush=True)
    with PreemptionHandler(mode=args.mode, sync_every=args.sync_every) as preemption:
        for step in range(start + 1, args.steps + 1):
            state = update(state)
            data = {"next_index": data["next_index"] + 3}
            print(f"step {step}", flush=True)
            ckpt.save(step, state, data)
            if step < args.steps and preemption.should_stop(step):
                ckpt.save(step, state, data, force=True)
                ckpt.close()
                print(preemption.stop_message(step), flush=True)
                return 0
            time.sleep(args.sleep)
    ckpt.save(args.steps, state, data, force=True)
    ckpt.close()
    host = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in state.items() if k != "key"}
    host["key"] = np.asarray(multihost_utils.process_allgather(jax.random.key_data(state["key"]), tiled=True))
    if args.out and jax.process_index() == 0:
        np.savez(args.out, next_index=data["next_index"], **host)
    print(f"done {args.steps}", flush=True)
    return 0


def big_save(args) -> int:
    import jax.numpy as jnp

    from lavie_jax.io.workdir import TrainCheckpointer

    ckpt = TrainCheckpointer(args.workdir, save_every=1)
    ckpt.save(1, {"x": jnp.ones((4,))}, {"next_index": 1})
    ckpt.wait()
    n = args.mb * 2 ** 20 // 4 // 16
    big = {f"w{i}": jnp.full((n,), i, jnp.float32) for i in range(16)}
    ckpt.save(2, big, {"next_index": 2})
    print("saving 2", flush=True)
    time.sleep(60)  # the test kills us long before
    return 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("program", choices=("loop", "big-save"))
    parser.add_argument("workdir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--out", default="")
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--sync-every", type=int, default=1)
    parser.add_argument("--distributed", nargs=3, default=None)
    parser.add_argument("--mb", type=int, default=256)
    args = parser.parse_args()
    return loop(args) if args.program == "loop" else big_save(args)


if __name__ == "__main__":
    sys.exit(main())
