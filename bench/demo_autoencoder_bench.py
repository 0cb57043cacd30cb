"""Does the demo's autoencoder reproduce the shapes? Trains it as `make demo` does, then encodes and decodes held-out
videos and checks them with the demo's own shape check (lavie_jax.demo.evaluate), at 32x32 and 128x128.

    python -m bench.demo_autoencoder_bench [--set KEY=JSON ...] [--videos 48] [--data-dir outputs/demo/data]

`--set` changes the `demo` config's `autoencoder` (dotted keys, JSON values; repeatable), e.g.
`--set steps=600 --set 'vae.block_out_channels=[16,32,64]'`. The held-out videos are the validation split of the
moving_shapes sources (seed 0), absent from the training frames; reconstructions use the posterior mean. Columns:
training seconds and seconds per step (including compilation), the shape / colour / direction the check still
recognises, and PSNR. Wall time ~1-3 minutes on 2 CPU cores (docs/demo_quality.md, Shapes, has the variants
measured with it).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import format_table
from lavie_jax.cli.config_flags import load_config
from lavie_jax.data.moving_shapes import make_video
from lavie_jax.demo import data, encoders, evaluate


def override(cfg, assignment: str) -> None:
    """Apply one `KEY=JSON` to the ConfigDict `cfg` (dotted keys reach into `vae`)."""
    key, sep, value = assignment.partition("=")
    if not sep:
        raise SystemExit(f"--set {assignment!r}: expected KEY=JSON, e.g. steps=600")
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    if last not in node:
        raise SystemExit(f"--set {key}: no such autoencoder setting; known: {', '.join(sorted(node.keys()))}")
    node[last] = json.loads(value)


def reconstruct(vae, videos: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 videos `[F, H, W, 3]` through encode (posterior mean) and decode."""
    call = jax.jit(lambda v: vae.decode(vae.encode(v, frame_chunk=None).mean, frame_chunk=None))
    out = []
    for v in videos:
        y = call(jnp.asarray(v, jnp.float32) / 127.5 - 1)
        out.append(np.asarray(jnp.clip(y, -1, 1) * 127.5 + 127.5).round().astype(np.uint8))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("--videos", type=int, default=48, help="held-out videos per resolution")
    parser.add_argument("--data-dir", default="outputs/demo/data", help="where the demo's moving_shapes data is")
    args = parser.parse_args(argv)
    demo = load_config("demo")
    cfg = demo.autoencoder
    for assignment in args.set:
        override(cfg, assignment)
    sources = demo.sources.to_dict()
    low = data.read_frames(data.prepare(sources["low"], args.data_dir), 512, seed=1)  # as lavie_jax.demo.main
    high = data.read_frames(data.prepare(sources["high"], args.data_dir), 64, seed=2)
    start = time.perf_counter()
    vae, _, _ = encoders.train_autoencoder(cfg, low, high, log=lambda line: None)
    seconds = time.perf_counter() - start
    rows = []
    for spec in (sources["low"], sources["high"]):
        size = (spec["height"], spec["width"])
        made = [make_video(spec["seed"], "validation", i, spec["num_frames"], *size) for i in range(args.videos)]
        videos, prompts = [v for v, _ in made], [p.caption for _, p in made]
        rebuilt = reconstruct(vae, videos)
        result = evaluate.score(prompts, rebuilt)
        kept = {k: sum(r[f"{k}_ok"] for r in result["per_prompt"]) for k in ("shape", "color", "direction")}
        mse = np.mean([np.mean(np.square(r.astype(np.float64) - v)) for r, v in zip(rebuilt, videos)])
        rows.append([f"{size[0]}x{size[1]}", f"{seconds:.0f}", f"{seconds / cfg.steps:.3f}",
                     *(f"{kept[k]}/{args.videos}" for k in ("shape", "color", "direction")),
                     f"{10 * np.log10(255 ** 2 / mse):.2f}"])
    print(f"demo autoencoder: {cfg.steps} steps x {cfg.batch_size} frames; changes: {args.set or 'none'}")
    print(format_table(["held-out", "train s", "s/step", "shape", "colour", "direction", "PSNR dB"], rows,
                       right=range(1, 7)))


if __name__ == "__main__":
    main()
