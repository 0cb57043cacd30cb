"""Pieces shared by the stage configs (`configs/{base,interpolation,vsr}.py`).

A stage config is an ml_collections ConfigDict with sections:
  stage        'base' | 'interpolation' | 'vsr'
  unet         diffusers-style UNet config dict (+ `stage`), parsed by `lavie_jax.models.arch_from_config`
  model        dtype ('float32' | 'bfloat16' computation; params are always float32), attention_impl: the attention
               kernel policy, chosen per call site at trace time (lavie_jax.models.attention_kernels): 'auto'
               (default: cuDNN flash attention on NVIDIA GPUs for bf16/fp16 spatial and text attention, Pallas
               splash attention on TPUs for spatial attention whose lengths fit 128-lanes, XLA elsewhere and for
               temporal attention), 'xla' (or None), 'cudnn' (every site; GPU, bf16/fp16), 'pallas' (TPU: splash
               for spatial/text sites, XLA for temporal)
  mesh         shape over axes ('data', 'fsdp', 'context', 'tensor'), one -1 = the remaining devices
  sharding     rules: logical param axis -> mesh axis (see lavie_jax.parallel)
  data         input pipeline (see lavie_jax.data.pipeline)
  sample       sampling (see lavie_jax.sampling.options): each stage's official sampling procedure
  train        training (`lavie-train`; see `train_config` below, field by field, and lavie_jax.train)
Variants: the default (or 'full') is the official full-size architecture; 'tiny' is CPU sized (a few seconds per
forward pass) and runs on the embedded moving_shapes data; 'demo' is what `make demo` trains and samples on a laptop
CPU (`demo_stage_config` below: small UNets on precomputed latents of 32x32 moving_shapes clips, the demo's own
autoencoder and text encoder from `outputs/demo/encoders`).
"""

from __future__ import annotations

import ml_collections

from lavie_jax.parallel import DEFAULT_RULES
from lavie_jax.stages import get_stage, official_unet_config
from lavie_jax.train.optim import TEMPORAL_ONLY_RULES, TRAIN_ALL_RULES, default_train_optim_config

VARIANTS = ("full", "tiny", "demo")


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
    """The `sample` section of `stage`: official procedure and defaults, CPU sized for 'tiny' and 'demo'."""
    values = {**SAMPLE_COMMON, **SAMPLE_STAGE[stage], **{"tiny": SAMPLE_TINY, "demo": SAMPLE_DEMO}.get(
        variant, {}).get(stage, {})}
    return ml_collections.ConfigDict(values)


def parse_variant(arg: str | None) -> str:
    variant = arg or "full"
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS} (e.g. configs/base.py:tiny)")
    return variant


def stage_config(stage: str, variant: str, tiny_unet: dict, demo_unet: dict | None = None
                 ) -> ml_collections.ConfigDict:
    """The config of `stage`: official UNet for 'full', the official one with `tiny_unet` overrides for 'tiny' and
    `demo_unet` overrides for 'demo'."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    unet = official_unet_config(stage)
    if variant == "tiny":
        unet.update(tiny_unet)
    elif variant == "demo":
        unet.update(demo_unet or {})
    c.unet = unet
    c.model = ml_collections.ConfigDict({"dtype": "float32", "attention_impl": "auto"})  # see the docstring
    c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1, 1)})
    c.sharding = ml_collections.ConfigDict({"rules": tuple(DEFAULT_RULES)})
    c.data = data_config(stage)
    c.sample = sample_config(stage, variant)
    c.train = train_config(stage, variant)
    if variant == "tiny":
        c.data.global_batch_size = 2
        c.data.height, c.data.width = (0, 0) if stage == "vsr" else (64, 96)
        c.data.patch_size = 64
        c.data.moving_shapes.num_videos, c.data.moving_shapes.num_validation = 16, 4
    if variant == "demo":
        demo_data(c.data)
    return c

def data_config(stage: str) -> ml_collections.ConfigDict:
    """The `data` section of a stage config: LaVie's clip shapes on the moving_shapes dataset."""
    vsr = stage == "vsr"
    return ml_collections.ConfigDict(
        {
            "stage": stage,
            "dataset": "moving_shapes",
            "data_dir": "",
            "split": "train",
            "prepare": True,
            "moving_shapes": {
                "num_videos": 256,
                "num_validation": 32,
                "num_frames": 64,
                "height": 64,
                "width": 96,
                "fps": 24.0,
                "seed": 0,
                "storage": "frames",
            },
            "video_text": {
                "name": "webvid",
                "csv": "",
                "validation_csv": "",
                "video_dir": "",
                "video_ext": ".mp4",
                "storage": "mp4",
                "height": 320,
                "width": 512,
                "fps": 0.0,
                "max_frames": 128,
                "min_frames": 16,
                "num_workers": 4,
            },
            "image_text": {
                "name": "laion",
                "table": "",
                "validation_table": "",
                "image_dir": "",
                "storage": "encoded" if vsr else "decoded",
                "height": 320,
                "width": 512,
                "min_size": 1024 if vsr else 0,
                "num_workers": 4,
            },
            "precomputed": {"name": ""},
            "images": {
                "source": "video_frames" if stage in ("base", "vsr") else "none",
                "per_clip": 4 if stage == "base" else 0,
                "ratio": 0.25 if vsr else 0.0,
            },
            "num_frames": {"base": 16, "interpolation": 61, "vsr": 8}[stage],
            "frame_stride": 3 if stage == "base" else 1,
            "height": 0 if vsr else 320,
            "width": 0 if vsr else 512,
            "resize_method": "bilinear",
            "key_frame_stride": 4,  # interpolation: one key frame every 4 (16 -> 61)
            "patch_size": 320,
            "scale": 4,
            "blur_sigma_max": 0.0,
            "pseudo_video_max_step": 4.0,
            "global_batch_size": 8,
            "seed": 0,
            "shuffle": True,
            "num_epochs": 0,
            "shard_drop_remainder": False,
            "drop_remainder": True,
            "output_dtype": "float32",
            "read_threads": 2,
            "prefetch_buffer": 16,
            "worker_count": 0,
        }
    )


def train_config(stage: str, variant: str) -> ml_collections.ConfigDict:
    """The `train` section of `stage` (`lavie-train`). LaVie released no training code and its paper discloses no
    optimizer, learning rate, batch size or step count; where a value is not the paper's or the official code's, the
    comment says so."""
    t = default_train_optim_config()  # optimizer, param_groups, ema, micro_batches (lavie_jax.train.optim)
    if stage == "vsr":  # the paper trains only the inserted temporal layers of the x4 upscaler
        t.param_groups.rules = TEMPORAL_ONLY_RULES
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
    if variant == "demo":
        t.update(DEMO_TRAIN[stage].get("train", {}))
        t.optimizer.update(DEMO_TRAIN[stage]["optimizer"])
        t.optimizer.update(schedule="cosine", decay_steps=t.num_steps - t.optimizer.warmup_steps, final_lr_ratio=0.1)
        t.objective.prediction_type = DEMO_PREDICTION
        t.objective.update(DEMO_TRAIN[stage].get("objective", {}))
        t.ema.decay = 0.99  # a horizon of ~100 steps: the runs are a few hundred steps long
        t.param_groups.rules = TRAIN_ALL_RULES  # from scratch: every layer trains (VSR too)
        t.compute_dtype = "float32"  # CPU: bfloat16 is emulated and slower
        t.encoders = DEMO_ENCODERS
        t.checkpoint_every, t.keep = t.num_steps, 1  # one checkpoint, at the end
    return t


# ------------------------------------------------------------------------------------------------ demo
# `make demo` (lavie_jax.demo) on a laptop-class CPU: every size below is chosen for the time budget, not for quality
# (data, autoencoder, three trainings side by side and sampling within 15 minutes on 2 cores; README, The demo). The data
# are 13-frame moving_shapes clips at 32x32 (base, interpolation) and 128x128 (VSR); one small f4 KL autoencoder
# (DEMO_AUTOENCODER) serves all three stages; the text encoder is a randomly initialised 2-layer CLIP of width 64
# with the real tokenizer, which adds the caption's summed token embeddings to every token (lavie_jax.models.clip).

DEMO_DIR = "outputs/demo"
DEMO_DATA_DIR = f"{DEMO_DIR}/data"
DEMO_ENCODERS = f"{DEMO_DIR}/encoders"  # pipeline directory the demo writes: vae/, text_encoder/, tokenizer/
DEMO_TEXT_WIDTH = 64  # text encoder width = every demo UNet's cross_attention_dim
DEMO_VIDEOS = {"num_frames": 13, "fps": 12.0, "seed": 0, "num_validation": 0}
DEMO_SOURCES = {  # the moving_shapes datasets the stages read (same videos, two resolutions)
    "low": dict(DEMO_VIDEOS, num_videos=1024, height=32, width=32),
    "high": dict(DEMO_VIDEOS, num_videos=256, height=128, width=128),
}
# per stage: pixel source, clip, batch (the demo precomputes latents + text embeddings of one clip per video and
# trains on those: data.dataset='precomputed')
DEMO_DATA = {
    "base": {"source": "low", "num_frames": 4, "frame_stride": 4, "global_batch_size": 32,
             # video only: with one still frame per clip beside the 4 key frames (LaVie's joint image-video
             # training) the base read the direction word but moved the prompted way in 38% of the videos, without
             # it in 100% (README, The demo); the stills' compute goes into 100 more steps
             "images": {"source": "none", "per_clip": 0}},
    "interpolation": {"source": "low", "num_frames": 5, "frame_stride": 1, "global_batch_size": 16},  # K=2 windows
    # 32x32 patches (8x8 latents), for the 15 minutes; sampling runs on whole 128x128 frames (64x64 patches at batch
    # 8 took the demo past 15 minutes)
    "vsr": {"source": "high", "num_frames": 4, "frame_stride": 1, "global_batch_size": 16, "patch_size": 32,
            "images": {"source": "none", "ratio": 0.0}},
}
DEMO_TRAIN = {  # lr: warm-up, then cosine decay to a tenth (short runs end converged, not noisy)
    "base": {"train": {"num_steps": 600, "log_every": 25}, "optimizer": {"lr": 2e-3, "warmup_steps": 25}},
    # interpolation and VSR train beside the base run (three processes sharing the cores). More VSR steps keep colour
    # better (given the dataset's own videos: 70% of colours after 200 steps, all after 600) but cost time
    "interpolation": {"train": {"num_steps": 200, "log_every": 25}, "optimizer": {"lr": 2e-3, "warmup_steps": 25}},
    "vsr": {"train": {"num_steps": 250, "log_every": 25}, "optimizer": {"lr": 2e-3, "warmup_steps": 25},
            "objective": {"noise_level_max": 100}},  # sampling noises the low-res input at level 50
}
# v-prediction for every demo stage (the official base and interpolation models predict epsilon): after a few hundred
# steps an epsilon model's errors at high noise are amplified by 1 / sqrt(alpha_bar) (~150 at t = 999) and the
# sampler drifts off the data; v-prediction's x_0 estimate stays bounded, so short runs sample cleanly.
DEMO_PREDICTION = "v_prediction"
SAMPLE_DEMO = {  # DDIM with few steps; interpolation follows its key frames and samples unguided
    # guidance 3: over seeds 400, 1 and 2 the base kept 100/88/94% of the colours (5.0: 88/88/88%) and moved the
    # prompted way in 100/88/94% of the videos (5.0: 100/81/88%); stronger guidance pushes orange to red, blue to cyan
    "base": {"sampler": "ddim", "prediction_type": DEMO_PREDICTION, "steps": 20, "guidance_scale": 3.0,
             # Stable Diffusion's betas (training uses the sample section's): the linear 1e-4..0.02 spends ~40% of
             # the steps below SNR 0.02, where an 8x8 latent holds no layout; measured 2x the direction accuracy
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "num_frames": 4, "height": 32, "width": 32, "fps": 4, "formats": "mp4,gif"},
    "interpolation": {"sampler": "ddim", "prediction_type": DEMO_PREDICTION, "steps": 10, "guidance_scale": 1.0,
                      "height": 32, "width": 32, "fps": 12, "formats": "mp4,gif",
                      # the demo's text encoder learnt spaced captions: no official underscores and ', 4k.' suffix
                      "prompt_suffix": "", "underscore_prompts": False},
    # VSR guided towards the caption, against the text it trained on when the caption was dropped ("None"; the
    # official "blur, worst quality" means nothing to the demo's encoder). Colour after the cascade over VSR seeds
    # 10, 1, 2: 81/81/81% unguided, 94/88/88% at 5.0, 94/94/94% at 7.5 (direction 94/94/100%): the low-res input
    # leaves a shape between two palette colours, and the caption picks the right one
    "vsr": {"steps": 10, "guidance_scale": 7.5, "negative_prompt": get_stage("vsr").dropped_text, "chunk_frames": 0,
            "formats": "mp4,gif", "underscore_prompts": False},
}
# The autoencoder the demo trains (the same AutoencoderKL module, a small diffusers-style config) and its training.
DEMO_AUTOENCODER = {
    "vae": {"_class_name": "AutoencoderKL", "block_out_channels": [16, 32, 32], "layers_per_block": 1,
            "norm_num_groups": 8, "latent_channels": 4, "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "mid_block_add_attention": False,  # convolutional only: the VSR stage decodes 128x128 frames
            "scaling_factor": 1.0},  # replaced by 1 / std of the trained latents (as SD's 0.18215 was chosen)
    "steps": 300, "batch_size": 32, "crop": 32, "lr": 2e-3, "warmup_steps": 20, "final_lr_ratio": 0.1,
    "kl_weight": 1e-4, "log_every": 25,
    "foreground_weight": 10.0,  # loss weight 1 + this x distance from the border colour: shapes are learnt first
    "high_res_fraction": 0.25,  # of each batch: 32x32 crops of the 128x128 frames (what the VSR stage decodes)
}


def demo_data(d: ml_collections.ConfigDict) -> None:
    """The `data` section of a 'demo' stage config, in place: precomputed latents named `demo_STAGE` under
    DEMO_DATA_DIR, made by the demo from the moving_shapes source described in `d.moving_shapes`."""
    spec = DEMO_DATA[d.stage]
    d.data_dir = DEMO_DATA_DIR
    d.moving_shapes.update(DEMO_SOURCES[spec["source"]])
    d.update({k: v for k, v in spec.items() if k not in ("source", "images")})
    d.images.update(spec.get("images", {}))
    if d.stage != "vsr":
        d.height = d.width = DEMO_SOURCES[spec["source"]]["height"]
    d.dataset, d.precomputed.name = "precomputed", f"demo_{d.stage}"
    d.read_threads, d.prefetch_buffer = 1, 64  # 2 cores: one reader thread keeps up with precomputed latents


def demo_autoencoder_config() -> ml_collections.ConfigDict:
    """The demo's autoencoder architecture (`vae`) and training settings."""
    return ml_collections.ConfigDict(DEMO_AUTOENCODER)
