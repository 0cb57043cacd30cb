"""VAE decode and CLIP text-encoding speed of the full-size models on this machine (random weights, float32).

    python -m bench.encoders_bench [--frames 2] [--repeats 3] [--torch] [--x4-vae]

Rows: SD v1.4 VAE (KL-f8) decode of 40x64 latents to 320x512 pixels, per frame, one frame per call and `--frames`
frames per call; text encoding of a batch of 8 prompts (tokenize + jitted encoder) with SD v1.4's CLIP ViT-L/14 and
the x4 upscaler's OpenCLIP-H. Times are medians after compilation. GFLOP from XLA's cost analysis; utilisation
against this machine's float32 matmul peak (about 0.45 TFLOP/s through jax). `--torch` adds diffusers /
transformers on the same inputs; `--x4-vae` adds the x4 VAE decoding one 320x512 latent frame to 1280x2048 (its
mid-block attention over 163,840 pixels alone is ~55 TFLOP: minutes per frame on CPU).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import median_time
from lavie_jax.runtime import startup
from lavie_jax.models.clip import TEXT_ENCODER_CONFIGS, build_text_encoder
from lavie_jax.models.vae import VAE_CONFIGS, build_vae
from lavie_jax.io.text import encode_prompts, load_tokenizer, tokenize

PEAK_TFLOPS = 0.45
PROMPTS = ["a teddy bear walking on the street, 2k, high quality", "a panda taking a selfie, 2k, high quality",
           "a polar bear playing drum kit in NYC Times Square, 4k, high resolution",
           "a Corgi walking in the park at sunrise, oil painting style", "a cat wearing sunglasses at a pool party",
           "an astronaut riding a horse in space", "a fat rabbit wearing a purple robe walking through a fantasy "
           "landscape", "blur, worst quality"]


def jitted(module: nnx.Module, method: Callable, *args) -> tuple[Callable[[], object], float]:
    """A compiled zero-argument call of `method(module, *args)` and its GFLOP (XLA cost analysis)."""
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda s, *a: method(nnx.merge(graphdef, s), *a))
    compiled = fn.lower(state, *args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return (lambda: compiled(state, *args)), float(cost.get("flops", 0.0)) / 1e9


def row(name: str, seconds: float, per: int, gflop: float | None) -> list[str]:
    util = f"{gflop / seconds / (PEAK_TFLOPS * 1e3):.0%}" if gflop else "-"
    print(f"  {name}: {seconds:.3f} s", file=sys.stderr, flush=True)  # progress: the table prints at the end
    return [name, f"{seconds:.3f}", f"{seconds / per:.3f}", f"{gflop:.0f}" if gflop else "-", util]


def vae_rows(name: str, latent_hw: tuple[int, int], frame_counts: list[int], repeats: int) -> list[list[str]]:
    vae = build_vae(name)
    f = vae.config.downsample_factor
    out = []
    for frames in frame_counts:
        z = jnp.asarray(np.random.RandomState(0).randn(frames, *latent_hw, 4), jnp.float32)
        call, gflop = jitted(vae, lambda m, x, n=frames: m.decode(x, frame_chunk=n), z)
        seconds = median_time(call, repeats)
        out.append(row(f"jax {name} VAE decode {frames} frame(s) -> {latent_hw[0] * f}x{latent_hw[1] * f}",
                       seconds, frames, gflop))
    return out


def text_rows(repeats: int) -> list[list[str]]:
    out = []
    for name in ("sd14", "x4"):
        encoder, tok = build_text_encoder(name), load_tokenizer(flavor=name)
        ids = jnp.asarray(tokenize(tok, PROMPTS))
        call, gflop = jitted(encoder, lambda m, x: m(x).last_hidden_state, ids)
        out.append(row(f"jax {name} CLIP encoder, batch 8", median_time(call, repeats), 8, gflop))
        seconds = median_time(lambda: encode_prompts(encoder, tok, PROMPTS).cond, repeats)
        out.append(row(f"jax {name} encode_prompts (tokenize + encode), batch 8", seconds, 8, None))
    return out


def torch_rows(frames: int, repeats: int) -> list[list[str]]:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    out = []
    with torch.no_grad():
        vae = AutoencoderKL(**{k: v for k, v in VAE_CONFIGS["sd14"].items() if not k.startswith("_")}).eval()
        for n in sorted({1, frames}):
            z = torch.randn(n, 4, 40, 64)
            out.append(row(f"torch sd14 VAE decode {n} frame(s) -> 320x512",
                           median_time(lambda: vae.decode(z).sample, repeats), n, None))
        for name in ("sd14", "x4"):
            model = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIGS[name])).eval()
            ids = torch.from_numpy(tokenize(load_tokenizer(flavor=name), PROMPTS).astype(np.int64))
            out.append(row(f"torch {name} CLIP encoder, batch 8",
                           median_time(lambda: model(ids).last_hidden_state, repeats), 8, None))
    return out


def main() -> None:
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2, help="frames per VAE decode call besides 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch", action="store_true", help="add torch reference rows")
    parser.add_argument("--x4-vae", action="store_true", help="add the x4 VAE at 320x512 latents (slow)")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, float32, median of {args.repeats}")
    rows = vae_rows("sd14", (40, 64), sorted({1, args.frames}), args.repeats)
    if args.x4_vae:
        rows += vae_rows("x4", (320, 512), [1], 1)
    rows += text_rows(args.repeats)
    if args.torch:
        rows += torch_rows(args.frames, args.repeats)
    header = ["what", "s / call", "s / frame or prompt", "GFLOP / call", f"of {PEAK_TFLOPS} TFLOP/s"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
