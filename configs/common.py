"""Pieces shared by the stage configs (`configs/{base,interpolation,vsr}.py`).

A stage config is an ml_collections ConfigDict with sections:
  stage        'base' | 'interpolation' | 'vsr'
  unet         diffusers-style UNet config dict (+ `stage`), parsed by `lavie_jax.models.arch_from_config`
  model        dtype ('float32' | 'bfloat16' computation; params are always float32), attention_impl (None = XLA,
               'cudnn' on GPU)
  mesh         shape over axes ('data', 'fsdp', 'context', 'tensor'), one -1 = the remaining devices
  sharding     rules: logical param axis -> mesh axis (see lavie_jax.parallel)
  data         input pipeline (see lavie_jax.data.pipeline)
  sample       sampling (see lavie_jax.sampling.options): each stage's official sampling procedure
  train        training (`lavie-train`; see `train_config` below, field by field, and lavie_jax.train)
Variants: the default (or 'full') is the official full-size architecture; 'tiny' is CPU sized (a few seconds per
forward pass) and runs on the embedded moving_shapes data.
"""

from __future__ import annotations

import ml_collections

from lavie_jax.data.config import default_data_config
from lavie_jax.models.official import official_unet_config
from lavie_jax.parallel import DEFAULT_RULES
from lavie_jax.train.optim import default_train_optim_config

VARIANTS = ("full", "tiny")


# Sampling defaults shared by the stages, then each stage's official values (spec section 4; comments say where
# a value comes from when it is not in the stage's sample.yaml).
SAMPLE_COMMON = {
    "steps": 50,
    "beta_schedule": "linear",  # every LaVie denoiser overrides its scheduler's betas to linear 1e-4..0.02
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    # 'auto' / -1: what the official pipeline used with `sampler`: ddpm 'leading' + 0, ddim 'leading' + 1, euler
    # 'linspace' (see lavie_jax.sampling.options)
    "timestep_spacing": "auto",
    "steps_offset": -1,
    "eta": 0.0,
    "set_alpha_to_one": False,  # SD and x4 scheduler configs: the last DDIM step ends at alpha_bar[0]
    "prompt_suffix": "",
    "underscore_prompts": False,  # True: the prompt is the official file stem, spaces replaced by underscores
    "batch_size": 0,  # rows (prompts, or prompt x chunk for VSR) per compiled call; 0 = all of a request at once
    # denoising steps per compiled call: the latents stay on the devices either way; between calls the host reports
    # progress and an interrupt (Ctrl-C, SIGTERM) takes effect, so a larger value trades responsiveness for fewer
    # dispatches (the step count is cut into equal calls: the largest divisor of `steps` not above this)
    "steps_per_call": 1,
    "decode_chunk": 4,  # frames per VAE decoder call (memory only; frames decode independently)
    "formats": "mp4",  # comma-separated: mp4, gif
    "quality": 9,  # imageio quality of the mp4 (LaVie writes 9)
    # components of a randomly initialised pipeline (`--checkpoint random`); a checkpoint brings its own
    "vae": "sd14",
    "text_encoder": "sd14",
    "tokenizer": "sd14",
}
SAMPLE_STAGE = {
    "base": {"sampler": "ddpm", "guidance_scale": 7.5, "negative_prompt": "", "cond_first": False, "seed": 400,
             "num_frames": 16, "height": 320, "width": 512, "fps": 8},  # seed 400: the README gallery
    "interpolation": {"sampler": "ddim_respaced", "guidance_scale": 4.0, "negative_prompt": "None",
                      "cond_first": True, "seed": 3418, "num_frames": 0,  # 0: 4K - 3 frames from K (61 from 16)
                      "height": 320, "width": 512, "fps": 24, "prompt_suffix": ", 4k.", "underscore_prompts": True},
    "vsr": {"sampler": "ddim", "prediction_type": "v_prediction", "guidance_scale": 5.0,
            "negative_prompt": "blur, worst quality", "cond_first": False, "seed": 10, "chunk_frames": 8,
            "noise_level": 50, "low_res_beta_schedule": "scaled_linear", "low_res_beta_start": 1e-4,
            "low_res_beta_end": 0.02, "fps": 0,  # 0: the input video's frame rate
            "underscore_prompts": True, "vae": "x4", "text_encoder": "x4", "tokenizer": "x4"},
}
SAMPLE_TINY = {
    "base": {"steps": 4, "num_frames": 4, "height": 32, "width": 48, "vae": "tiny_f8", "text_encoder": "tiny"},
    "interpolation": {"steps": 4, "height": 32, "width": 48, "vae": "tiny_f8", "text_encoder": "tiny"},
    "vsr": {"steps": 4, "vae": "tiny_f4", "text_encoder": "tiny"},
}


def sample_config(stage: str, variant: str) -> ml_collections.ConfigDict:
    """The `sample` section of `stage`: official procedure and defaults, CPU sized for 'tiny'."""
    values = {**SAMPLE_COMMON, **SAMPLE_STAGE[stage], **(SAMPLE_TINY[stage] if variant == "tiny" else {})}
    return ml_collections.ConfigDict(values)


def parse_variant(arg: str | None) -> str:
    variant = arg or "full"
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS} (e.g. configs/base.py:tiny)")
    return variant


def stage_config(stage: str, variant: str, tiny_unet: dict) -> ml_collections.ConfigDict:
    """The config of `stage`: official UNet for 'full', the official one with `tiny_unet` overrides for 'tiny'."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    unet = official_unet_config(stage)
    if variant == "tiny":
        unet.update(tiny_unet)
    c.unet = unet
    c.model = ml_collections.ConfigDict({"dtype": "float32", "attention_impl": None})
    c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1, 1)})
    c.sharding = ml_collections.ConfigDict({"rules": tuple(DEFAULT_RULES)})
    c.data = default_data_config(stage)
    c.sample = sample_config(stage, variant)
    c.train = train_config(stage, variant)
    if variant == "tiny":
        c.data.global_batch_size = 2
        c.data.height, c.data.width = (0, 0) if stage == "vsr" else (64, 96)
        c.data.patch_size = 64
        c.data.moving_shapes.num_videos, c.data.moving_shapes.num_validation = 16, 4
    return c


def train_config(stage: str, variant: str) -> ml_collections.ConfigDict:
    """The `train` section of `stage` (`lavie-train`). LaVie released no training code and its paper discloses no
    optimizer, learning rate, batch size or step count; where a value is not the paper's or the official code's, the
    comment says so."""
    t = default_train_optim_config(stage)  # optimizer, param_groups, ema, micro_batches (lavie_jax.train.optim)
    # where the weights start: '' = random init; a `lavie-convert` output directory: SD-inflated (`lavie-convert
    # sd`), x4-inflated (`lavie-convert x4`) or an official LaVie checkpoint (`lavie-convert lavie|pipeline`)
    t.init = ""
    # the frozen VAE, text encoder and tokenizer: '' = the pipeline directory `init` (when it is one); a pipeline
    # directory; or 'random' = random components named by sample.vae / sample.text_encoder (tests, smoke runs)
    t.encoders = ""
    t.seed = 0  # init of a random UNet, timesteps, noise, text dropout (the data has its own data.seed)
    t.num_steps = 100_000  # optimizer updates of the whole run (a resumed run continues to it)
    t.compute_dtype = "bfloat16"  # UNet / encoder computation; params, grads, optimizer state and EMA stay float32
    # rematerialisation of the UNet's blocks: 'none', 'full' (save nothing), 'save_dots' (matmul outputs),
    # 'save_attention' (attention outputs only), 'save_dots_and_attention'
    t.remat = "none"
    t.vae_frame_chunk = 4  # frames per VAE encoder call inside the step (memory only)
    o = t.objective = ml_collections.ConfigDict()
    o.prediction_type = "v_prediction" if stage == "vsr" else "epsilon"  # VSR: the x4 upscaler's v-prediction
    o.text_dropout = 0.1  # official code: captions dropped for classifier-free guidance with p = 0.1
    o.image_loss_weight = 1.0  # base: alpha in L = L_video + alpha * L_image (paper; value not disclosed)
    o.noise_level_max = 350  # vsr: low-res noise levels drawn from [0, this) (the x4 upscaler's max_noise_level)
    t.log_every = 10  # steps between metrics.jsonl / TensorBoard / console lines
    t.checkpoint_every = 1000  # steps between (async) checkpoints; the last step and a preemption always save
    t.keep = 3  # checkpoints kept (the newest)
    t.keep_every = 0  # also keep every n-th step's checkpoint; 0 = none
    # per-device peak TFLOP/s for the MFU column; 0 = from the device kind (TPU v4/v5e/v5p/v6e, H100/H200, A100)
    t.peak_tflops = 0.0
    if variant == "tiny":  # CPU: exact float32, fast feedback
        t.compute_dtype = "float32"
        t.num_steps = 200
        t.optimizer.lr = 1e-3
        t.optimizer.warmup_steps = 20
        t.ema.decay = 0.99
        t.log_every = 10
        t.checkpoint_every = 50
        t.encoders = "random"
    return t
