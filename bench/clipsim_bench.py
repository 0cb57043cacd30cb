"""CLIP ViT-B/32 image features per second on this machine: lavie-jax vs transformers on the same random weights.

    python -m bench.clipsim_bench [--batch 32] [--repeats 5] [--threads 2]

Rows (float32, after compilation / warm-up; each repeat times every row back to back, min and median shown):
- network only: normalised pixels `[B, 224, 224, 3]` -> image embeddings `[B, 512]` (ours: `CLIPModel.
  image_features`, jitted; transformers: `CLIPVisionModelWithProjection(pixel_values).image_embeds`, torch with
  `--threads` threads, no grad);
- end to end from uint8 320x512 frames (LaVie's size): ours preprocesses inside the jitted program
  (`CLIPModel.embed_frames`); transformers runs `CLIPImageProcessor` (PIL) then the model.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from bench.common import format_table
from lavie_jax.runtime import startup


def main() -> None:
    startup.configure()  # before any backend starts: XLA:CPU options, GC thresholds
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()

    import torch
    import transformers
    from flax import nnx

    from lavie_jax.convert.clip import clip_config_from_dict
    from lavie_jax.convert.state_dict import load_state_dict
    from lavie_jax.models.clip_vision import CLIPModel, preprocess_frames

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_config = transformers.CLIPConfig(  # openai/clip-vit-base-patch32
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                       "num_hidden_layers": 12, "image_size": 224, "patch_size": 32}, projection_dim=512)
    full = transformers.CLIPModel(hf_config).eval()
    state = {k: v.numpy() for k, v in full.state_dict().items()}
    ours = CLIPModel(clip_config_from_dict(hf_config.to_dict()), rngs=nnx.Rngs(0), crop_rounding="floor")
    load_state_dict(ours, state, what="random ViT-B/32")
    theirs = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **hf_config.vision_config.to_dict())).eval()
    theirs.load_state_dict({k: v for k, v in full.state_dict().items()
                            if k.startswith(("vision_model.", "visual_projection."))})

    rng = np.random.RandomState(0)
    frames = rng.randint(0, 256, (args.batch, 320, 512, 3)).astype(np.uint8)
    pixels = np.asarray(preprocess_frames(frames, 224, crop_rounding="floor"))
    graphdef, params = nnx.split(ours)
    features = jax.jit(lambda s, x: nnx.merge(graphdef, s).image_features(x))
    embed = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed_frames(x))
    px_jax, frames_jax = jax.device_put(pixels), jax.device_put(frames)
    px_torch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    processor = transformers.CLIPImageProcessor()

    with torch.no_grad():
        want = theirs(pixel_values=px_torch).image_embeds.numpy()
    got = np.asarray(features(params, px_jax))
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

    def torch_features():
        with torch.no_grad():
            return theirs(pixel_values=px_torch).image_embeds

    def torch_end_to_end():
        px = processor(images=list(frames), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return theirs(pixel_values=px).image_embeds

    # Interleaved: on a shared machine the load drifts, so each repeat times ours and theirs back to back, after a
    # pause that lets the other library's spinning worker threads park. Min and median over the repeats.
    calls = {"ours network": lambda: features(params, px_jax).block_until_ready(),
             "transformers network": torch_features,
             "ours end to end (uint8 320x512)": lambda: embed(params, frames_jax).block_until_ready(),
             "transformers end to end (CLIPImageProcessor + model)": torch_end_to_end}
    for fn in calls.values():
        fn()  # compile / warm up
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            time.sleep(0.3)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"  {name}: {sorted(round(t, 3) for t in ts)} s", file=sys.stderr, flush=True)

    rows = []
    pairs = [("ours network", "transformers network"),
             ("ours end to end (uint8 320x512)", "transformers end to end (CLIPImageProcessor + model)")]
    for ours_key, theirs_key in pairs:
        for key in (ours_key, theirs_key):
            best, med = min(times[key]), float(np.median(times[key]))
            speedup = (f"{min(times[theirs_key]) / best:.2f}x / {np.median(times[theirs_key]) / med:.2f}x"
                       if key == ours_key else "")
            rows.append([key, f"{best:.3f} / {med:.3f}", f"{args.batch / best:.1f}", speedup])
    print(f"CLIP ViT-B/32 image features, batch {args.batch}, float32; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}, torch {torch.__version__} with {args.threads} threads; "
          f"max relative difference of the embeddings {err:.1e}")
    print(format_table(["what", "s / batch (min / median)", "frames / s (best)", "speed-up (min / median)"], rows,
                       right=(1, 2, 3)))


if __name__ == "__main__":
    main()
