"""LaVie temporal interpolation stage: 16 -> 61 frames (SD v1.4 UNet, 8 input channels, sparse-causal attn1).

Input channels: 4 noisy latents + 4 conditioning latents (the 16 key frames repeated, see the spec section 4.2).

Run:
  lavie-sample --config interpolation:tiny --checkpoint random --prompt "a red circle moving left" --output res
  make demo    # trains and samples base:demo, interpolation:demo, vsr:demo (python -m lavie_jax.demo)
  lavie-train --config interpolation:demo --workdir outputs/demo/runs/interpolation
  python -m bench.unet_bench --stages interpolation
Variants: `interpolation` (official full size), `interpolation:tiny` (CPU sized), `interpolation:demo` (what
`make demo` trains: the tiny interpolation UNet, the official block layout without the base demo's temporal
convolution modules, which the interpolation stage does not need (its key frames fix the motion) and which doubled
its training time; 2 -> 5 frames in training, 4 -> 13 when sampling).
"""

import ml_collections

from lavie_jax.configs import common, demo
from lavie_jax.configs.base import TINY_UNET

OFFICIAL = {
    "data": {"num_frames": 61},  # 4K - 3 frames around K key frames, one every data.key_frame_stride
    "sample": {"sampler": "ddim_respaced", "guidance_scale": 4.0, "negative_prompt": "None", "cond_first": True,
               "seed": 3418, "num_frames": 0,  # 0: 4K - 3 frames from K (61 from 16)
               "key_window": 16,  # longer videos (FreeNoise): runs of 16 key frames, overlapping by one
               "start_step": 0,  # 0: from noise (lavie_jax.stages.interpolation says what > 0 does)
               "height": 320, "width": 512, "fps": 24, "prompt_suffix": ", 4k.", "underscore_prompts": True},
}

TINY = {
    "unet": dict(TINY_UNET, in_channels=8),
    "data": {"height": 64, "width": 96},
    "sample": {"height": 32, "width": 48, "vae": "tiny_f8"},
}

LOW = demo.SOURCES["low"]
DEMO = {
    "unet": dict(TINY_UNET, in_channels=8),
    "data": {"moving_shapes": LOW, "height": LOW["height"], "width": LOW["width"], "num_frames": 5,  # K=2 windows
             "frame_stride": 1, "global_batch_size": 16},
    # trains beside the base run (three processes sharing the cores); every 50 steps its EMA params sample 16 held-out
    # 13-frame requests (4 real key frames each) and their FVD goes to metrics.jsonl (the demo's FVD curve). 150
    # steps, not 200, for the cascade's 15 minutes: key frames 27.5 dB against the base's, background 1.57, FVD 710
    # (200 steps: 28.7-28.8 dB, 1.30-1.33, 644-671), colour and direction kept in 16/16 either way
    "train": {"num_steps": 150,
              "eval": {"every": 50, "num_batches": 0, "samples": 16, "num_frames": 13,
                       "pixel_dataset": "moving_shapes", "fvd": True, "input_fps": 12.0}},
    # follows its key frames and samples unguided. From noise, 200 steps leave dark blotches between the key frames
    # (16 prompts: key frames at 22.5 dB against the base's, background high-pass 2.75, the base's own 1.98; colour
    # kept in 11/16 by an independent check); starting at step 7 of 10 from the key frames held over their
    # positions (noised to that level, `start_step`): 25.2 dB, 2.44, 12/16, direction 15/16 (step 5: 23.4 dB, 2.70;
    # step 3: 22.8, 2.75; windows of 2 key frames as trained: 22.7, same background). In-between frames then
    # start from the nearest key frame: the motion is smoothed by the last 3 steps, not invented from noise.
    "sample": {"steps": 10, "start_step": 7, "guidance_scale": 1.0, "height": 32, "width": 32, "fps": 12,
               "key_window": 4,
               # the demo's text encoder learnt spaced captions: no official underscores and ', 4k.' suffix
               "prompt_suffix": "", "underscore_prompts": False},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_variant(arg)
    config = common.stage_config("interpolation", OFFICIAL)
    if variant == "tiny":
        common.make_tiny(config, TINY)
    elif variant == "demo":
        demo.make_demo(config, DEMO)
    return config
