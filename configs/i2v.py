"""Image-to-video stage (SEINE, Vchitect/SEINE): LaVie's base UNet with a 9-channel conv_in (4 noisy latents, the
mask, 4 latents of the masked video); animates an image, makes a transition between two, continues a video.

Run:
  lavie-convert pipeline --stage i2v --checkpoint seine.pt --sd-dir stable-diffusion-v1-4 --output ckpt/i2v
  lavie-sample --config i2v --checkpoint ckpt/i2v --image photo.png --prompt "a boat sailing" --output res
  lavie-sample --config i2v --checkpoint ckpt/i2v --image a.png --image b.png --prompt "smooth transition" \\
      --output res                                         # a transition from a.png to b.png
  lavie-train --config i2v:tiny --workdir runs/i2v-tiny --config.train.init=ckpt/base   # from a base checkpoint
Variants: `i2v` (SEINE's released sampling: 16 frames at 240x560, respaced DDPM 250 steps, guidance 8, the prompt
followed by ', slow motion.'), `i2v:tiny` (CPU sized), `i2v:demo` (`make demo`'s image-to-video phase: the demo
base's UNet, clips and sampling with the i2v input channels, fine-tuned from the trained demo base).
"""

import ml_collections

from lavie_jax.configs import base, common, demo

OFFICIAL = {
    # training: LaVie's clips (SEINE released no training code; the masks are drawn by train.objective.i2v_masks)
    "data": {"num_frames": 16, "frame_stride": 3},
    # SEINE's configs/sample_i2v.yaml: ddpm over create_diffusion("250") with the original t, cfg 8 with the
    # conditional row first, negative "", 8 fps; its seed is empty (unseeded) -- ours is fixed
    "sample": {"sampler": "ddpm_respaced", "steps": 250, "guidance_scale": 8.0, "negative_prompt": "",
               "cond_first": True, "seed": 0, "num_frames": 16, "height": 240, "width": 560, "fps": 8,
               "prompt_suffix": ", slow motion.", "mask_type": "auto", "context_frames": 2},
}

TINY = {
    "unet": dict(base.TINY_UNET, in_channels=9),
    "data": {"height": 64, "width": 96, "num_frames": 4},
    "sample": {"num_frames": 4, "height": 32, "width": 48, "vae": "tiny_f8", "sampler": "ddim", "steps": 4},
}

# The demo's i2v: the demo base's UNet, clips and sampling with 9 input channels, fine-tuned from the trained demo base
# (train.init) on the base's precomputed clips. Derived from base.DEMO, so a change of the demo base carries over.
DEMO = {
    "unet": dict(base.DEMO["unet"], in_channels=9),
    "data": dict(base.DEMO["data"], global_batch_size=16),
    "sample": {k: v for k, v in base.DEMO["sample"].items() if not k.startswith("freenoise")} | {
        "prompt_suffix": "", "cond_first": False, "mask_type": "auto", "context_frames": 1},
    "train": {
        "init": f"{demo.DIR}/runs/base",
        "num_steps": 60,
        "objective": {"i2v_masks": {"weights": [1.0, 0.0, 0.0], "max_n": 1}},
        "param_groups": {"rules": (("^conv_in", "conv_in"), (".*", "unet")), "lr_multipliers": {"conv_in": 10.0}},
        # constant after the warm-up (the demo stages decay theirs): a short fine-tune, not a run that settles
        "optimizer": {"warmup_steps": 5, "schedule": "constant"},
        "ema": {"warmup": True},
    },
}
DEMO_PRECOMPUTED = "demo_base"  # the base's clips: the same videos, one clip each


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_variant(arg)
    config = common.stage_config("i2v", OFFICIAL)
    if variant == "tiny":
        common.make_tiny(config, TINY)
    elif variant == "demo":
        demo.make_demo(config, DEMO)
        config.data.precomputed.name = DEMO_PRECOMPUTED
    return config
