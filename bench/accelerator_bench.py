"""One-command accelerator benchmark (`make bench-gpu`): one table of what matters on one GPU or TPU chip.

    python -m bench.accelerator_bench                        # the official shapes, ~5 minutes with compiles
    python -m bench.accelerator_bench --remat-sweep          # + every remat policy of the train step
    python -m bench.accelerator_bench --tiny --json out.json # CPU-sized configs (also the default on a CPU)

Rows, all on one device with random weights (`--tiny`: the `:tiny` configs and their sample sizes instead):
  matmul        an n x n x n matmul in the compute dtype (8192, bf16 on accelerators): the measured peak
  forward       the base / interpolation / VSR UNet forward at the official sampling shapes (one guided batch of
                2: 16 x 40 x 64 latents; 61 x 40 x 64 from 16 key frames; a chunk of 8 frames of 320 x 512), once
                per attention policy (`model.attention_impl`: each one the model accepts, 'n/a' with the reason
                where one cannot run)
  train         the base train step at the training shape (1 clip of 16 x 320 x 512 + 4 images, precomputed
                latents, AdamW + EMA) with the best remat policy: the fastest whose compiled memory fits the
                device (without `--remat-sweep`: the first that fits of none, save_dots_and_attention,
                save_dots, save_attention, full); `--remat-sweep` adds a row per policy
  sample        `StageSampler.sample` of one prompt, 50 steps, end to end: text encoder, UNet loop, VAE decode,
                frames back on the host
Columns: time per call (median after warm-up; sampling: the better of two requests), analytic TFLOP
(`lavie_jax.models.flops`; the train step counts 3 x the forward, rematerialisation not counted), TFLOP/s, MFU
against the measured matmul rate and against the chip's dense bf16 table peak when known, and the compiled
program's device memory (`memory_analysis()`: arguments + outputs - donated aliases + temporaries, as XLA's buffer
assignment reports them). With a memory limit (GPU/TPU) the train rows estimate the largest batch per device: the
temporaries scaled linearly with the batch (an upper bound on what the batch adds, so the estimate errs low). The
CPU backend reports memory too, but its temporaries barely move with the remat policy (measured: 6.40 GB with
none and 6.45 GB with full for the tiny base step at 2 x 20 x 32 x 48 latents, whose step times do differ), so the
remat sweep's memory column means something on accelerators only.

Programs compile in worker threads while the next ones are traced (a full train step takes minutes to compile);
set JAX_COMPILATION_CACHE_DIR to reuse compiles across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavie_jax.runtime import startup

from bench import common
from bench.train_bench import bench_config, synthetic_batch
from lavie_jax import parallel
from lavie_jax.cli.config_flags import load_config
from lavie_jax.models import VAE_CONFIGS, abstract_unet, arch_from_config
from lavie_jax.models.flops import (measure_matmul_tflops, peak_bf16_tflops, text_encoder_flops,
                                    unet_forward_flops, vae_decode_flops)
from lavie_jax.io.store import randomize
from lavie_jax.models.options import REMAT_POLICIES, ExecutionOptions
from lavie_jax.models.vae import vae_config_from_dict
from lavie_jax.sampling.pipeline import random_pipeline
from lavie_jax.sampling.sampler import StageSampler
from lavie_jax.stages import STAGES
from lavie_jax.train.setup import build_run, latent_shape, num_image_frames

REMAT_ORDER = ("none", "save_dots_and_attention", "save_dots", "save_attention", "full")  # fastest first (usually)
PROMPT = "a panda taking a selfie, 2k, high quality"
TEXT_LEN = 77
GUIDED = 2  # every stage samples with classifier-free guidance: 2 UNet rows per prompt
MEMORY_HEADROOM = 0.95  # a program "fits" below this share of the device's limit (the runtime keeps some)
COLUMNS = ("row", "shape", "time (ms)", "TFLOP", "TFLOP/s", "MFU meas.", "MFU peak", "memory GB", "note")


@dataclasses.dataclass
class Row:
    row: str
    shape: str
    seconds: float | None = None
    flop: float | None = None  # analytic, per call
    memory: dict[str, int] | None = None
    note: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Job:
    """A row whose program compiles in the background: `run(compiled)` returns seconds per call."""
    row: Row
    future: Any
    run: Callable[[Any], float]


def stage_config(stage: str, tiny: bool, dtype: str):
    config = load_config(f"{stage}:tiny" if tiny else stage)
    config.model.dtype = dtype
    config.mesh.shape = (1, 1, 1, 1)
    return config


def default_policy(config) -> str:
    return config.model.attention_impl or "xla"


def attention_policies(requested: list[str] | None) -> list[tuple[str, str | None]]:
    """(policy, why it cannot run on this platform or None) for each policy to try: `requested`, or every
    `model.attention_impl` value the models accept ('xla' first)."""
    try:
        from lavie_jax.models.attention_kernels import POLICIES, check_attention_impl
    except ImportError:  # older models: jax.nn.dot_product_attention implementations by name
        POLICIES = ("xla", "cudnn")

        def check_attention_impl(policy):
            if policy == "cudnn" and jax.default_backend() != "gpu":
                raise ValueError("cudnn needs a GPU")
    names = requested or ["xla"] + [p for p in POLICIES if p != "xla"]
    out = []
    for name in names:
        try:
            check_attention_impl(name)
            out.append((name, None))
        except Exception as e:  # noqa: BLE001 - the reason goes in the table
            out.append((name, common.error_note(e)))
    return out


def sampling_shapes(tiny: bool, dtype: str) -> dict[str, tuple[int, int, int]]:
    """(frames, latent height, latent width) of one UNet call per stage at the official sampling sizes: the base
    video, the image-to-video stage's (SEINE's 240 x 560), the interpolation of the base frames (4K - 3), and one
    VSR chunk of the base video (latents = low-res pixels)."""
    def factor(sample) -> int:
        return vae_config_from_dict(VAE_CONFIGS[sample.vae]).downsample_factor

    base = stage_config("base", tiny, dtype).sample
    i2v = stage_config("i2v", tiny, dtype).sample
    interp = stage_config("interpolation", tiny, dtype).sample
    vsr = stage_config("vsr", tiny, dtype).sample
    fb, fi, f2 = factor(base), factor(interp), factor(i2v)
    return {"base": (base.num_frames, base.height // fb, base.width // fb),
            "i2v": (i2v.num_frames, -(-i2v.height // f2), -(-i2v.width // f2)),
            "interpolation": (4 * base.num_frames - 3, interp.height // fi, interp.width // fi),
            "vsr": (min(vsr.chunk_frames, base.num_frames), base.height, base.width)}


def shape_str(*dims: int) -> str:
    return "x".join(map(str, dims))


# ----------------------------------------------------------------------------------------------------- rows


def matmul_row(dtype: str, tiny: bool) -> tuple[Row, float]:
    n = 1024 if tiny else 8192
    tflops = measure_matmul_tflops(n, jnp.dtype(dtype), repeats=5)
    flop = 2 * n ** 3
    return Row(f"matmul {dtype}", f"{n}^3", flop / (tflops * 1e12), flop), tflops


def forward_jobs(stage: str, config, shape: tuple[int, int, int], policies, compiler: common.Compiler,
                 state: nnx.State | None, repeats: int) -> list[Row | Job]:
    """One forward row per attention policy; `state`: the stage UNet's params (random ones when None)."""
    arch = arch_from_config(config.unet.to_dict(), stage)
    dtype = jnp.dtype(config.model.dtype)
    if state is None:
        state = nnx.state(randomize(abstract_unet(arch, options=ExecutionOptions(dtype=dtype)), seed=1), nnx.Param)
    f, h, w = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((GUIDED, f, h, w, arch.in_channels), np.float32))
    t = jnp.full((GUIDED,), 500, jnp.int32)
    text = jnp.asarray(rng.standard_normal((GUIDED, TEXT_LEN, arch.cross_attention_dim), np.float32))
    labels = jnp.full((GUIDED,), config.sample.get("noise_level", 0), jnp.int32) if arch.num_class_embeds else None
    flop = unet_forward_flops(arch, GUIDED, f, h, w, TEXT_LEN)["total"]
    out: list[Row | Job] = []
    for policy in policies:
        row = Row(f"forward {stage} [{policy}]", f"{shape_str(GUIDED, f, h, w, arch.in_channels)} +text {TEXT_LEN}",
                  flop=flop)
        try:
            graphdef = nnx.graphdef(abstract_unet(arch, options=ExecutionOptions(dtype=dtype, attention_impl=policy)))
            lowered = jax.jit(lambda s, *a, g=graphdef: nnx.merge(g, s)(*a)).lower(state, x, t, text, labels)
        except Exception as e:  # noqa: BLE001
            out.append(dataclasses.replace(row, note=f"n/a: {common.error_note(e)}"))
            continue
        out.append(Job(row, compiler.submit(lowered.compile),
                       lambda c, s=state: common.median_time(lambda: c(s, x, t, text, labels), repeats)))
    return out


def sampling_job(config, steps: int, repeats: int, mesh) -> tuple[Row, Callable[[], float], StageSampler]:
    """The sampler of the base stage, its row (analytic FLOPs: text encoder on the prompt and the negative prompt,
    `steps` guided UNet calls, the VAE decode) and the timed call."""
    config.sample.steps = steps
    pipeline = random_pipeline(config)
    sampler = StageSampler(config, pipeline, mesh)
    o = sampler.options
    f = sampler.vae_factor
    frames, h, w = o.num_frames, o.height // f, o.width // f
    seq = pipeline.text_encoder.config.max_position_embeddings
    flop = (text_encoder_flops(pipeline.text_encoder.config, GUIDED, seq)["total"]
            + steps * unet_forward_flops(pipeline.unet.arch, GUIDED, frames, h, w, seq)["total"]
            + vae_decode_flops(pipeline.vae.config, frames, h, w, frame_chunk=o.decode_chunk)["total"])
    row = Row(f"sample base {steps} steps [{default_policy(config)}]",
              f"1 prompt -> {shape_str(frames, o.height, o.width)} px", flop=flop)

    def run() -> float:
        return common.best_time(lambda: sampler.sample([PROMPT]).frames, repeats, warmup=0)

    return row, run, sampler


# ----------------------------------------------------------------------------------------------------- train


@dataclasses.dataclass
class TrainBench:
    """The base train step: one concrete state, one compiled step per remat policy (they share the state's
    layout, so the donated state threads through every policy's step)."""
    tiny: bool
    dtype: str
    attention: str | None
    run: Any  # the concrete Run (its state is consumed by the first timed step)
    batch: dict
    shape: str
    compiles: dict[str, Any]  # policy -> future of (compiled, seconds)


def train_config(policy: str, tiny: bool, dtype: str, attention: str | None = None):
    """The base stage's training config at the training shape (`tiny`: the tiny one), remat `policy`, attention
    policy `attention` (default: the config's)."""
    config = bench_config("base", "tiny" if tiny else "full", batch=2 if tiny else 1, latents=True,
                          attention=attention or stage_config("base", tiny, dtype).model.attention_impl, remat=policy,
                          dtype=dtype)
    config.mesh.shape = (1, 1, 1, 1)
    return config


def start_train(policies: list[str], tiny: bool, dtype: str, attention: str | None, mesh,
                compiler: common.Compiler) -> TrainBench:
    run = build_run(train_config(policies[0], tiny, dtype, attention), mesh, synthetic_data=True)
    batch = synthetic_batch(run.config, run)
    frames, h, w = latent_shape(run.config, run.vae_factor)
    b, k = run.config.data.global_batch_size, num_image_frames(run.config)
    shape = f"{b} x ({frames} + {k} img) x {h}x{w}x4"
    bench = TrainBench(tiny, dtype, attention, run, batch, shape, {})
    for policy in policies:
        submit_train_compile(bench, policy, mesh, compiler)
    return bench


def submit_train_compile(bench: TrainBench, policy: str, mesh, compiler: common.Compiler) -> None:
    run = bench.run if policy == bench.run.config.train.remat else \
        build_run(train_config(policy, bench.tiny, bench.dtype, bench.attention), mesh, abstract=True,
                  synthetic_data=True)
    with jax.set_mesh(mesh):
        lowered = run.step_fn.lower(run.state, bench.run.encoders, bench.run.tables, bench.batch)
    bench.compiles[policy] = compiler.submit(lowered.compile)


def finish_train(bench: TrainBench, order: list[str], sweep: bool, steps: int, limit: int | None, mesh,
                 compiler: common.Compiler) -> list[Row]:
    """Time the policies (all with `sweep`, else up to the first that fits); returns the best row, then every
    policy's row (with `sweep`) or those that failed or did not fit before it."""
    run = bench.run
    flop = run.flops_per_step
    impl = run.config.model.attention_impl or "xla"
    state = run.state
    rows: dict[str, Row] = {}
    for policy in order:
        if policy not in bench.compiles:
            submit_train_compile(bench, policy, mesh, compiler)
        row = Row(f"train base [remat={policy}, {impl}]", bench.shape, flop=flop)
        rows[policy] = row
        try:
            compiled, compile_s = bench.compiles[policy].result()
        except Exception as e:  # noqa: BLE001
            row.note = f"n/a: {common.error_note(e)}"
            continue
        row.memory = common.memory_bytes(compiled)
        row.extra["compile_s"] = compile_s
        fits = limit is None or row.memory is None or row.memory["peak"] <= MEMORY_HEADROOM * limit
        if limit and row.memory:
            per_example = row.memory["temp"] / run.config.data.global_batch_size
            fixed = row.memory["peak"] - row.memory["temp"]
            row.extra["max_batch_estimate"] = max(0, int((MEMORY_HEADROOM * limit - fixed) // max(per_example, 1)))
            row.note = f"max batch ~{row.extra['max_batch_estimate']}"
        if not fits:
            row.note = f"does not fit ({row.memory['peak'] / 1e9:.1f} GB > {limit / 1e9:.1f} GB)"
            continue
        try:
            with jax.set_mesh(mesh):
                state, times, metrics = common.step_times(compiled, state, (run.encoders, run.tables, bench.batch),
                                                          steps)
        except Exception as e:  # noqa: BLE001
            row.note = f"n/a: {common.error_note(e)}"
            continue
        row.seconds = float(np.median(times))
        row.extra["loss"] = float(metrics["loss"])
        if not math.isfinite(row.extra["loss"]):
            row.note = f"loss {row.extra['loss']}"
        if not sweep:
            break
    timed = [r for r in rows.values() if r.seconds is not None]
    if not timed:
        return [Row("train base", bench.shape, flop=flop, note="n/a: no remat policy ran")] + \
            (list(rows.values()) if sweep else [])
    best = min(timed, key=lambda r: r.seconds)
    head = dataclasses.replace(best, note=f"best remat; {best.note}".rstrip("; "), extra=dict(best.extra))
    rest = [r for r in rows.values() if sweep or r.seconds is None]
    return [head] + [dataclasses.replace(r, row="  " + r.row) for r in rest]


# ----------------------------------------------------------------------------------------------------- table


def finish(row: Row, measured: float, peak: float | None) -> dict[str, Any]:
    """The row as a JSON record with the derived columns."""
    tflops = row.flop / row.seconds / 1e12 if row.seconds and row.flop else None
    return {"row": row.row, "shape": row.shape, "time_ms": None if row.seconds is None else row.seconds * 1e3,
            "tflop": None if row.flop is None else row.flop / 1e12, "tflops": tflops,
            "mfu_measured": tflops / measured if tflops else None,
            "mfu_peak": tflops / peak if tflops and peak else None,
            "memory_bytes": row.memory, "note": row.note, **row.extra}


def cells(r: dict[str, Any]) -> list[str]:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    mem = r["memory_bytes"]["peak"] / 1e9 if r["memory_bytes"] else None
    return [r["row"], r["shape"], num(r["time_ms"], ".4g"), num(r["tflop"], ".4g"), num(r["tflops"], ".4g"),
            num(r["mfu_measured"], ".1%"), num(r["mfu_peak"], ".1%"), num(mem, ".3g"), r["note"]]


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    backend = jax.default_backend()
    tiny = args.tiny or backend == "cpu"
    device = jax.devices()[0]
    mesh = parallel.make_mesh((1, 1, 1, 1), [device])
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    steps = args.steps
    repeats = args.repeats or (3 if tiny else 5)
    limit = common.device_memory_limit(device)
    compiler = common.Compiler(args.compile_workers or None)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    try:
        log("matmul peak ...")
        matmul, measured = matmul_row(dtype, tiny)  # first: nothing else runs yet
        rows: list[Row | Job] = [matmul]

        order = [p for p in REMAT_ORDER if p in REMAT_POLICIES] + sorted(set(REMAT_POLICIES) - set(REMAT_ORDER))
        if args.remat:
            order = [p for p in args.remat if p in REMAT_POLICIES]
        log("train step: build and lower ...")  # first: the longest compile
        train = start_train(order if args.remat_sweep else order[:1], tiny, dtype, args.train_attention, mesh,
                            compiler)

        log("sampling pipeline ...")
        base_config = stage_config("base", tiny, dtype)
        sample_row, sample_run, sampler = sampling_job(base_config, steps, max(1, min(repeats, 2)), mesh)

        policies = attention_policies(args.attention)
        shapes = sampling_shapes(tiny, dtype)
        runnable = [p for p, refusal in policies if refusal is None]
        for stage in args.stages or STAGES:
            log(f"forward {stage}: lower ...")
            state = nnx.state(sampler.pipeline.unet, nnx.Param) if stage == sampler.stage else None
            rows += forward_jobs(stage, stage_config(stage, tiny, dtype), shapes[stage], runnable, compiler, state,
                                 repeats)
        # a policy this platform refuses: one row for all stages
        rows += [Row(f"forward [{p}]", "every stage", note=f"n/a: {refusal}") for p, refusal in policies if refusal]

        log("sampling: warm-up (compiles its programs) ...")
        sampler.sample([PROMPT])
        log("timing ...")
        done: list[Row] = []
        for item in rows:
            if isinstance(item, Row):
                done.append(item)
                continue
            try:
                compiled, compile_s = item.future.result()
                item.row.memory = common.memory_bytes(compiled)
                item.row.extra["compile_s"] = compile_s
                item.row.seconds = item.run(compiled)
            except Exception as e:  # noqa: BLE001
                item.row.note = f"n/a: {common.error_note(e)}"
            done.append(item.row)
        log("train step: timing ...")
        done += finish_train(train, order, args.remat_sweep, args.train_steps or (2 if tiny else 5), limit, mesh,
                             compiler)
        sample_row.seconds = sample_run()
        done.append(sample_row)
    finally:
        compiler.close()
    peak = peak_bf16_tflops(device.device_kind) if jnp.dtype(dtype) == jnp.bfloat16 else None
    return {"device": device.device_kind, "backend": backend, "jax": jax.__version__, "tiny": tiny, "dtype": dtype,
            "matmul_tflops": measured, "peak_bf16_tflops": peak, "memory_limit_bytes": limit,
            "attention_default": default_policy(stage_config("base", tiny, dtype)),
            "rows": [finish(r, measured, peak) for r in done]}


def print_table(result: dict[str, Any]) -> None:
    peak, limit = result["peak_bf16_tflops"], result["memory_limit_bytes"]
    peak_s = f"{peak:g} TFLOP/s" if peak else "unknown"
    limit_s = f"{limit / 1e9:.1f} GB" if limit else "none reported"
    print(f"\n{result['device']} ({result['backend']}, jax {result['jax']}), {result['dtype']}"
          f"{', tiny configs' if result['tiny'] else ''}; measured matmul {result['matmul_tflops']:.4g} TFLOP/s; "
          f"table bf16 peak {peak_s}; memory limit {limit_s}")
    print(common.format_table(COLUMNS, [cells(r) for r in result["rows"]], right=range(2, 8)), flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the :tiny configs and sizes (automatic on a CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--remat-sweep", action="store_true", help="time and size the train step under every policy")
    p.add_argument("--remat", nargs="+", help="the remat policies to consider, in order (default: all)")
    p.add_argument("--attention", nargs="+", help="attention policies for the forward rows (default: all)")
    p.add_argument("--stages", nargs="+", choices=STAGES, help="stages with forward rows (default: all)")
    p.add_argument("--train-attention", help="attention policy of the train step (default: the config's)")
    p.add_argument("--dtype", help="compute dtype (default bfloat16, float32 on a CPU)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--repeats", type=int, default=0, help="timed calls per forward row (default 5, tiny 3)")
    p.add_argument("--train-steps", type=int, default=0, help="timed train steps (default 5, tiny 2)")
    p.add_argument("--compile-workers", type=int, default=0, help="parallel compiles (default: half the cores)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    result = run_bench(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
