"""Everything a training run builds before its first step, checked before anything compiles.

`build_run(config, workdir)` validates the `train` section against the mesh and the data, loads or initialises the
UNet on the mesh (by the config's sharding rules), loads the frozen encoders, splits the trained params from the
frozen ones (`train.param_groups`), and lays out the train state, its shardings and the jitted step. Bad input is a
`TrainConfigError` naming the field and the fix, raised before any model is built where possible.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lavie_jax import parallel, stages
from lavie_jax.io import store
from lavie_jax.models import UNet3D, abstract_unet, arch_from_config
from lavie_jax.models.arch import UNetArch
from lavie_jax.models import tokens
from lavie_jax.models.lora import LoRAError, add_lora, parse_rules
from lavie_jax.models.options import ExecutionOptions, ExecutionOptionsError
from lavie_jax.models.random_init import compiled_initialiser
from lavie_jax.models.options import from_config as options_from_config
from lavie_jax.models.flops import peak_bf16_tflops, train_step_flops
from lavie_jax.io.text import tokenize, word_ids
from lavie_jax.runtime import program_cache
from lavie_jax.train import held_out, optim
from lavie_jax.train.step import Encoders, Objective, StageInputs, TrainState, stage_loss, train_step



class TrainConfigError(ValueError):
    """A training setting cannot work; the message names the config field (or flag) and the fix."""


def _fail(field: str, message: str) -> None:
    raise TrainConfigError(f"config field {field}: {message}")


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, data: bool = True) -> None:
    """The `train` section, and the parts of the others that training depends on, against the mesh; `data=False`
    skips the data source (`check_data`), for callers that feed batches of their own."""
    t, d = config.train, config.data
    try:
        stages.check_stage(config.stage, "config field stage")
    except ValueError as e:
        raise TrainConfigError(str(e)) from None
    if d.stage != config.stage:
        _fail("data.stage", f"{d.stage!r} but the config is the {config.stage} stage")
    try:
        optim.validate_train_optim_config(t)
    except optim.OptimConfigError as e:
        raise TrainConfigError(str(e)) from None
    for field in ("num_steps", "log_every", "checkpoint_every", "keep", "vae_frame_chunk"):
        value = t[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(f"train.{field}", f"expected a positive integer, got {value!r}")
    if not isinstance(t.keep_every, int) or t.keep_every < 0:
        _fail("train.keep_every", f"expected an integer >= 0 (0 = off), got {t.keep_every!r}")
    if not isinstance(t.seed, int) or not 0 <= t.seed < 2 ** 31:
        _fail("train.seed", f"expected an integer in 0..2^31-1, got {t.seed!r}")
    execution_options(config)  # compute dtype, attention kernel (and its platform), remat, sharding rules
    if lora_rules(config):
        try:
            parse_rules(lora_rules(config), field="train.lora.rules")
        except LoRAError as e:
            raise TrainConfigError(f"config field {e}") from None
    if lora_tokens(config):
        _check_tokens(config)
    if personalising(config) and not t.init:
        what = "train.lora.rules" if lora_rules(config) else "train.lora.tokens"
        _fail("train.init", f"is empty, but {what} is set: adapters and learned tokens train on a base model; set "
                            "train.init to its lavie-convert directory or lavie-train work directory")
    if not isinstance(t.peak_tflops, (int, float)) or t.peak_tflops < 0:
        _fail("train.peak_tflops", f"expected a number >= 0 (0 = from the device kind), got {t.peak_tflops!r}")
    o = t.objective
    if o.prediction_type not in ("epsilon", "v_prediction"):
        _fail("train.objective.prediction_type", f"{o.prediction_type!r}: choose 'epsilon' or 'v_prediction'")
    if not 0 <= o.text_dropout < 1:
        _fail("train.objective.text_dropout", f"expected a probability in [0, 1), got {o.text_dropout!r}")
    if o.image_loss_weight < 0:
        _fail("train.objective.image_loss_weight", f"expected >= 0, got {o.image_loss_weight!r}")
    masks = o.get("i2v_masks")
    if masks is not None:
        weights = list(masks.get("weights", []))
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            _fail("train.objective.i2v_masks.weights", f"{weights}: give 3 weights >= 0, not all 0, for the i2v "
                                                       "masks ('first', 'onelast', 'none')")
        if not isinstance(masks.get("max_n"), int) or masks.get("max_n") < 1:
            _fail("train.objective.i2v_masks.max_n", f"expected an integer >= 1, got {masks.get('max_n')!r}")
    if not 1 <= o.noise_level_max <= config.sample.num_train_timesteps:
        _fail("train.objective.noise_level_max", f"expected 1..{config.sample.num_train_timesteps}, got "
                                                 f"{o.noise_level_max!r}")
    batch_devices = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)
    gb, micro = d.global_batch_size, t.micro_batches
    if gb % micro:
        _fail("data.global_batch_size", f"{gb} does not split into train.micro_batches={micro} micro-batches")
    if (gb // micro) % batch_devices:
        _fail("data.global_batch_size", f"each micro-batch ({gb} / {micro} = {gb // micro} examples) must split over "
                                        f"the {batch_devices} batch devices of the mesh (data x fsdp = "
                                        f"{mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple of "
                                        f"{batch_devices * micro}, or change mesh.shape")
    if gb % jax.process_count():
        _fail("data.global_batch_size", f"{gb} does not split over {jax.process_count()} processes")
    if d.drop_remainder is not True:
        _fail("data.drop_remainder", "training needs full batches: set it to True")
    try:
        held_out.check_eval_config(config)
    except held_out.EvalConfigError as e:
        raise TrainConfigError(str(e)) from None
    if data:
        check_data(config)


def check_data(config: ml_collections.ConfigDict) -> None:
    """The `data` section can feed this stage: the pipeline's own checks, the data directory, and a precomputed
    dataset made for this stage (only VSR clips carry low-res frames). Reads metadata only (no grain/tfds import
    unless the data is precomputed)."""
    d = config.data
    try:
        from lavie_jax.data.pipeline import check_config as check_pipeline
        check_pipeline(d)
    except ValueError as e:
        raise TrainConfigError(f"config field {str(e)}" if str(e).startswith("data.") else str(e)) from None
    for field, required in _source_fields(d):
        section, name = field.split(".")
        if required and not d[section][name]:  # the table a dataset is built from also names its prepared copy
            _fail(f"data.{field}", f"is empty: the {section} dataset is built from this table (CSV or parquet), and "
                                   f"its prepared copy is found by it; set --config.data.{field}=PATH")
    if d.data_dir and not Path(d.data_dir).exists() and (not d.prepare or d.dataset == "precomputed"):
        _fail("data.data_dir", f"{d.data_dir} does not exist; fix the path, or set data.prepare=True to build "
                               f"{d.dataset} there")
    if d.data_dir and not Path(d.data_dir).exists():
        # nothing is prepared there yet: a dataset built from your files needs them (moving_shapes is procedural
        # and is simply generated there; lavie-train says so)
        for field, required in _source_fields(d):
            section, name = field.split(".")
            value = d[section][name]
            if (required or value) and not (value and Path(value).exists()):
                _fail(f"data.{field}", f"{value or '(empty)'} does not exist, and data.data_dir={d.data_dir} does "
                                       f"not exist either, so the dataset would be built there from it; fix "
                                       f"data.data_dir if the data was prepared elsewhere, else data.{field}")
    if d.dataset == "precomputed":
        from lavie_jax.data import sources

        try:
            directory = sources.precomputed_dirs(d)[0]
        except (ValueError, FileNotFoundError) as e:
            _fail("data.precomputed.name", str(e))
        features = json.loads((directory / "features.json").read_text()) if (directory / "features.json").is_file() \
            else {}
        text = json.dumps(features)
        has_lr = '"lr"' in text
        if has_lr != stages.get_stage(config.stage).low_res_input:
            made = " or ".join(s.name for s in stages.REGISTRY.values() if s.low_res_input == has_lr)
            _fail("data.precomputed.name", f"{d.precomputed.name!r} was precomputed for the {made} stage (its clips "
                                           f"{'carry' if has_lr else 'lack'} low-res frames) but the config is the "
                                           f"{config.stage} stage; precompute the {config.stage} stage's data")


def _source_fields(d: ml_collections.ConfigDict) -> list[tuple[str, bool]]:
    """(field under `data`, required) of the files a video_text / image_text dataset is built from (an empty
    video_dir / image_dir means the table holds absolute paths)."""
    fields = []
    if d.dataset == "video_text":
        fields += [("video_text.csv", True), ("video_text.video_dir", False)]
    if d.images.source == "image_text" and stages.get_stage(d.stage).images_wanted(d):
        fields += [("image_text.table", True), ("image_text.image_dir", False)]
    return fields


def num_image_frames(config: ml_collections.ConfigDict) -> int:
    """K still images per clip of a joint image-video batch (`Stage.image_frames`: base; 0 without images)."""
    return stages.get_stage(config.stage).image_frames(config.data)


def objective_from_config(config: ml_collections.ConfigDict, vae_scaling: float, vae_factor: int = 8) -> Objective:
    t, s = config.train, config.sample
    masks = t.objective.get("i2v_masks") or {"weights": (0.5, 0.3, 0.2), "max_n": 2}
    return Objective(
        vae_factor=int(vae_factor), i2v_mask_weights=tuple(float(w) for w in masks["weights"]),
        i2v_max_given=int(masks["max_n"]),
        stage=stages.get_stage(config.stage), prediction_type=t.objective.prediction_type,
        num_image_frames=num_image_frames(config),
        image_loss_weight=float(t.objective.image_loss_weight), text_dropout=float(t.objective.text_dropout),
        noise_level_max=int(t.objective.noise_level_max),
        low_res_schedule=(s.get("low_res_beta_schedule", "scaled_linear"), float(s.get("low_res_beta_start", 1e-4)),
                          float(s.get("low_res_beta_end", 0.02))),
        beta_schedule=(s.beta_schedule, float(s.beta_start), float(s.beta_end)),
        num_train_timesteps=int(s.num_train_timesteps), micro_batches=int(t.micro_batches),
        vae_frame_chunk=int(t.vae_frame_chunk), vae_scaling_factor=float(vae_scaling))


# ------------------------------------------------------------------------------------------------ LoRA

LORA_GROUP, TOKENS_GROUP = "lora", "tokens"
LORA_RULE = (r"\.wrapper\.adapter\.lora_[ab]$", LORA_GROUP)
TOKENS_RULE = (rf"^{tokens.ATTRIBUTE}\.embedding$", TOKENS_GROUP)


def lora_rules(config: ml_collections.ConfigDict) -> tuple:
    """`train.lora.rules` as a tuple (empty: no adapters)."""
    return store.run_lora_rules(config)


def lora_tokens(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`train.lora.tokens` as a tuple (empty: no learned tokens)."""
    return store.run_words(config)


def personalising(config: ml_collections.ConfigDict) -> bool:
    """A LoRA run (adapters and/or learned tokens train, the base stays frozen and out of the checkpoints)."""
    return store.personalised(config)


def _check_tokens(config: ml_collections.ConfigDict) -> None:
    """`train.lora.tokens` / `token_init` well formed (the tokenizer checks each is one token when the run builds)."""
    words, init = lora_tokens(config), tuple(config.train.lora.get("token_init") or ())
    bad = [w for w in words if not isinstance(w, str) or not w or " " in w]
    if bad or len(set(words)) != len(words):
        _fail("train.lora.tokens", f"{list(words)}: give distinct single words, e.g. ('sks',)")
    if init and len(init) != len(words):
        _fail("train.lora.token_init", f"{list(init)} has {len(init)} words for {len(words)} tokens "
                                       f"{list(words)}: give one per token, or none (each starts from its own row)")
    if config.data.dataset == "precomputed":
        _fail("data.dataset", "'precomputed' holds text embeddings, but train.lora.tokens learns the embedding of "
                              f"{list(words)} inside the text encoder, which needs the captions as tokens: train on "
                              "the clips themselves (e.g. data.dataset='video_text')")


def lora_groups(model: nnx.Module, config: ml_collections.ConfigDict) -> optim.ParamGroups:
    """A LoRA run's param groups: the adapters ('lora') and the learned tokens ('tokens') train, each with its lr
    multiplier from train.param_groups.lr_multipliers when given there; every base param is frozen."""
    mults = dict(config.train.param_groups.lr_multipliers)
    rules = ((LORA_RULE,) if lora_rules(config) else ()) + ((TOKENS_RULE,) if lora_tokens(config) else ())
    groups = [g for _, g in rules]
    return optim.param_groups(model, (*rules, (".*", optim.FROZEN)), {k: v for k, v in mults.items() if k in groups},
                              field="train.lora")


def add_adapters(unet: UNet3D, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                 rules: parallel.Rules = (), *, abstract: bool = False, text: Any = None) -> UNet3D:
    """Wrap `unet`'s layers with the `train.lora.rules` adapters and set its learned tokens (`train.lora.tokens`,
    their rows from `text`, the run's `EncoderModels`; zeros at placeholder ids without it, for the abstract
    checks), laid out on `mesh` by the sharding rules (as sharded `ShapeDtypeStruct`s when `abstract`).
    TrainConfigError names a rule or token that cannot work."""
    if lora_rules(config):
        try:
            add_lora(unet, lora_rules(config), seed=int(config.train.lora.seed), field="config field train.lora.rules")
        except LoRAError as e:
            raise TrainConfigError(str(e)) from None
    words = lora_tokens(config)
    if words:
        if text is None:
            ids, rows = range(len(words)), jnp.zeros((len(words), unet.arch.cross_attention_dim), jnp.float32)
        else:
            ids, rows = token_rows(config, text)
        setattr(unet, tokens.ATTRIBUTE, tokens.TextTokens(ids, rows))
    if mesh is not None:
        state = nnx.state(unet, nnx.LoRAParam) if not words else nnx.state(unet, lambda path, v: (
            isinstance(v, nnx.LoRAParam) or path[0] == tokens.ATTRIBUTE))
        shardings = parallel.state_shardings(state, mesh, rules)
        nnx.update(unet, with_shardings(state, shardings) if abstract else jax.device_put(state, shardings))
    return unet


def token_rows(config: ml_collections.ConfigDict, text: Any) -> tuple[list[int], jax.Array]:
    """(ids, starting rows `[n, D]`) of the run's learned tokens in the run's tokenizer and text encoder
    (`EncoderModels`): each token's own row, or that of its `token_init` word. TrainConfigError names a token
    that is not one word of the tokenizer."""
    words, init = lora_tokens(config), tuple(config.train.lora.get("token_init") or ())
    try:
        ids = word_ids(text.tokenizer, words, what="config field train.lora.tokens")
        start = word_ids(text.tokenizer, init, what="config field train.lora.token_init") if init else ids
    except ValueError as e:
        raise TrainConfigError(str(e)) from None
    table = tokens.token_table(text.text_encoder)[...]
    return ids, jnp.asarray(table[jnp.asarray(start)], jnp.float32)


def checkpointed(config: ml_collections.ConfigDict, state: TrainState) -> TrainState:
    """The part of a train state a checkpoint holds: all of it, except in a LoRA run, whose frozen base is stored
    once, in train.init, and read from there when a run resumes (`with_frozen`)."""
    return dataclasses.replace(state, frozen=None) if personalising(config) else state


def with_frozen(config: ml_collections.ConfigDict, restored: TrainState, built: TrainState) -> TrainState:
    """A restored state made whole: a LoRA run's frozen base from the built run (`checkpointed`)."""
    return dataclasses.replace(restored, frozen=built.frozen) if personalising(config) else restored


# ------------------------------------------------------------------------------------------------ models

def _init_source(config: ml_collections.ConfigDict) -> store.Source | None:
    """`train.init` checked without loading weights: a `lavie-convert` UNet or pipeline directory, or another
    `lavie-train` run (fine-tuning from its EMA params), of this stage and architecture; None for a random UNet."""
    init = config.train.init
    if not init:
        return None
    stage = stages.get_stage(config.stage)
    try:
        source = store.open_source(init, flag="train.init", kinds=("pipeline", "unet", "workdir"))
        if source.stage not in (None, config.stage, *stage.init_from):
            source = store.open_source(init, stage=config.stage, flag="train.init",
                                       kinds=("pipeline", "unet", "workdir"))  # its error names both stages
        stored = store.stored_arch(source)
    except store.SourceError as e:
        raise TrainConfigError(f"config field {e}") from None
    wanted = arch_from_config(config.unet.to_dict(), config.stage)
    if stored.stage != wanted.stage:  # another stage's UNet (Stage.init_from): conv_in is widened when loaded
        if stored.in_channels > wanted.in_channels:
            _fail("train.init", f"{init} holds a {stored.stage} UNet taking {stored.in_channels} input channels; the "
                                f"{config.stage} stage takes {wanted.in_channels}")
        stored = dataclasses.replace(stored, stage=wanted.stage, in_channels=wanted.in_channels)
    if stored != wanted:
        diff = [f.name for f in dataclasses.fields(UNetArch) if getattr(stored, f.name) != getattr(wanted, f.name)]
        _fail("train.init", f"{init} holds a UNet whose architecture differs from config.unet in {diff}; use the "
                            f"config that matches the checkpoint (e.g. the full-size `--config {config.stage}`)")
    return source


def _encoders_source(config: ml_collections.ConfigDict, init: store.Source | None) -> store.Source:
    """Where the frozen VAE / text encoder / tokenizer come from: `train.encoders` (a pipeline directory or
    'random'), else the `train.init` pipeline (or the encoders of the `train.init` run)."""
    enc = config.train.encoders
    if not enc and init is None:
        _fail("train.encoders", "no VAE and text encoder: train.init is empty (a random UNet); pass a pipeline "
                                "directory (e.g. a `lavie-convert sd|x4|pipeline` output) or 'random'")
    try:
        if enc:
            return store.open_source(enc, stage=config.stage, flag="config field train.encoders",
                                     kinds=("pipeline", store.RANDOM))
        if init.kind == "unet":
            raise store.SourceError(f"config field train.init {init} holds a single UNet; the VAE, text encoder and "
                                    "tokenizer come from a pipeline directory: set train.encoders to one (or "
                                    "'random')")
        return init
    except store.SourceError as e:
        raise TrainConfigError(str(e)) from None


def with_shardings(tree, shardings):
    """`tree`'s leaves as `ShapeDtypeStruct`s carrying `shardings` (a prefix tree of `tree`, e.g. one sharding per
    nnx.Variable)."""
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub),
                        shardings, tree)


def build_unet(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: parallel.Rules,
               init: store.Source | None, *, abstract: bool = False, text: Any = None) -> UNet3D:
    """The UNet on `mesh`, with the run's execution options: restored from `train.init` straight into its
    shardings, or initialised there (one jitted init whose outputs are laid out by the rules: no host copy of a
    full-size model). `abstract`: leaves are `ShapeDtypeStruct`s carrying those shardings, nothing is read or
    allocated (memory planning). A LoRA run's adapters and learned tokens (from `text`, the run's `EncoderModels`)
    are added (`add_adapters`)."""
    options = execution_options(config)
    arch = arch_from_config(config.unet.to_dict(), config.stage)
    if abstract or init is None:
        unet = abstract_unet(arch, options=options)
        state = nnx.state(unet, nnx.Param)
        shardings = parallel.state_shardings(state, mesh, rules)
        if abstract:
            nnx.update(unet, with_shardings(state, shardings))
        else:
            # the draws batched (models.random_init): the same values, a program XLA compiles several times faster
            # the seed is an argument (what nnx.Rngs(seed) does, traceable): one program for every seed, kept in
            # memory for the next build of this architecture in the process
            make = compiled_initialiser(lambda seed: nnx.state(UNet3D(arch, rngs=nnx.Rngs(jax.random.key(seed))),
                                                               nnx.Param),
                                        jax.ShapeDtypeStruct((), jnp.int32), out_shardings=shardings,
                                        key=("UNet3D", arch))
            nnx.update(unet, make(np.int32(config.train.seed)))
    elif init.stage in (None, config.stage):
        unet = store.load_unet(init, mesh=mesh, rules=rules, options=options)
    else:
        unet = _widened(store.load_unet(init, mesh=mesh, rules=rules, options=options), arch, mesh, rules, options)
    if personalising(config):
        add_adapters(unet, config, mesh, rules, abstract=abstract, text=text)
    return unet


def _widened(source: UNet3D, arch: UNetArch, mesh: jax.sharding.Mesh, rules: parallel.Rules,
             options) -> UNet3D:
    """A UNet of `arch` holding `source`'s params (another stage's UNet, `Stage.init_from`), its conv_in kernel
    `[3, 3, Cin, C]` widened to `arch.in_channels` with zeros: the new input channels start without effect, so the
    first step computes what `source` computed. Laid out on `mesh` by `rules`."""
    unet = abstract_unet(arch, options=options)
    target = nnx.state(unet, nnx.Param)
    shardings = parallel.state_shardings(target, mesh, rules)
    flat_src = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
    flat_sh = dict(nnx.to_flat_state(shardings))
    leaves = []
    for path, var in nnx.to_flat_state(target):
        value = flat_src[path][...]
        if value.shape != var.shape:  # conv_in.kernel: zero input channels appended
            pad = [(0, 0)] * value.ndim
            pad[-2] = (0, var.shape[-2] - value.shape[-2])
            value = jnp.pad(value, pad)
        sharding = flat_sh[path]
        leaves.append((path, jax.device_put(value, sharding if isinstance(sharding, jax.sharding.Sharding)
                                            else sharding[...])))
    nnx.update(unet, nnx.from_flat_state(leaves))
    return unet


@dataclasses.dataclass
class EncoderModels:
    vae: Any  # AutoencoderKL or None
    text_encoder: Any  # CLIPTextEncoder or None
    tokenizer: Any


def build_encoders(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: parallel.Rules,
                   source: store.Source, arch: UNetArch) -> EncoderModels:
    """The frozen VAE, text encoder and tokenizer on `mesh`, from a pipeline directory, a run's, or random: the one
    loader (`lavie_jax.io.store`), so sampling a work directory gets the very same ones."""
    vae, text, tokenizer = store.load_components(
        source, random=store.RandomParts.from_config(config.sample), width=arch.cross_attention_dim,
        seed=config.train.seed, mesh=mesh, rules=rules, options=execution_options(config))
    return EncoderModels(vae, text, tokenizer)


def execution_options(config: ml_collections.ConfigDict) -> ExecutionOptions:
    """The run's execution options (`train.compute_dtype`, `model.attention_impl`, `train.remat`, `sharding.rules`);
    TrainConfigError names a bad field."""
    try:
        return options_from_config(config, training=True)
    except ExecutionOptionsError as e:
        raise TrainConfigError(f"config field {e}") from None


def check_models(config: ml_collections.ConfigDict, arch: UNetArch, encoders: EncoderModels) -> None:
    """The UNet, VAE, text encoder and data fit together (before anything compiles)."""
    stage = stages.get_stage(config.stage)
    if arch.in_channels != stage.unet_in_channels:
        _fail("unet.in_channels", f"{arch.in_channels}, but the {config.stage} stage feeds the UNet "
                                  f"{stage.unet_in_channels} channels")
    vae, text = encoders.vae, encoders.text_encoder
    if vae.config.latent_channels != stages.LATENT_CHANNELS or arch.out_channels != stages.LATENT_CHANNELS:
        _fail("train.encoders", f"the VAE has {vae.config.latent_channels} latent channels and the UNet predicts "
                                f"{arch.out_channels}; LaVie stages need 4 for both")
    if text.config.hidden_size != arch.cross_attention_dim:
        _fail("train.encoders", f"the text encoder gives {text.config.hidden_size}-d embeddings but the UNet "
                                f"cross-attends to {arch.cross_attention_dim}-d text; use matching components")
    try:
        stage.check_data(config.data, vae.config.downsample_factor)
    except stages.StageConfigError as e:
        _fail(e.field, e.message)


def latent_shape(config: ml_collections.ConfigDict, vae_factor: int) -> tuple[int, int, int]:
    """(frames, latent height, latent width) of one training clip."""
    return stages.get_stage(config.stage).clip_latent_shape(config.data, vae_factor)


def step_flops(config: ml_collections.ConfigDict, arch: UNetArch, encoders: EncoderModels) -> int:
    """Analytic FLOPs of one training step (`models.flops.train_step_flops`): the UNet forward and backward over
    the global batch plus the frozen encoders' work inside the step."""
    d, k = config.data, num_image_frames(config)
    frames, h, w = latent_shape(config, encoders.vae.config.downsample_factor)
    b = d.global_batch_size
    precomputed = d.dataset == "precomputed"
    vae_images = b * stages.get_stage(config.stage).vae_frames(d)
    return train_step_flops(arch, b, frames + k, h, w, 77, k, vae=None if precomputed else encoders.vae.config,
                            vae_images=vae_images, text_encoder=None if precomputed else encoders.text_encoder.config,
                            text_batch=b * (1 + k))["total"]


def peak_tflops(config: ml_collections.ConfigDict) -> tuple[float, str]:
    """(per-device peak TFLOP/s for MFU, where it comes from): the config, the device table, or measured here."""
    if config.train.peak_tflops:
        return float(config.train.peak_tflops), "train.peak_tflops"
    kind = jax.devices()[0].device_kind
    table = peak_bf16_tflops(kind)
    if table:
        return table, f"{kind} bf16 peak"
    dtype = jnp.dtype(config.train.compute_dtype)
    return measure_peak(dtype.name), f"measured {dtype.name} matmul on {kind}"


@functools.lru_cache(maxsize=4)
def measure_peak(dtype_name: str) -> float:
    from lavie_jax.models.flops import measure_matmul_tflops

    return measure_matmul_tflops(1024, jnp.dtype(dtype_name))


@dataclasses.dataclass
class Run:
    """A built run: the initial train state on the mesh and the jitted step (see `build_run`)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    objective: Objective
    graphdef: nnx.GraphDef
    groups: optim.ParamGroups
    state: TrainState
    state_shardings: TrainState
    encoders: Encoders
    tables: dict
    step_fn: Any  # jitted (state, encoders, tables, batch) -> (state, metrics), state donated
    tokenizer: Any
    batch_sharding: NamedSharding
    flops_per_step: int
    arch: UNetArch
    vae_factor: int  # pixels per latent, each side
    inputs_graphdefs: tuple  # (VAE, text encoder) graphs of the step's StageInputs (VAE None on precomputed data)
    encoder_models: EncoderModels  # the frozen VAE, text encoder and tokenizer as modules (sampled evaluation)
    encoder_shardings: Encoders
    program_key: str  # what the step's program captures (`_step_key`): the cache key of programs built beside it


@dataclasses.dataclass(frozen=True)
class Checked:
    """What `check_run` found, without reading a weight: where the UNet and the encoders come from, the UNet's
    architecture and its param groups."""

    init: store.Source | None
    encoders: store.Source
    arch: UNetArch
    groups: optim.ParamGroups


def check_run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, synthetic_data: bool = False
              ) -> Checked:
    """Every check of a run that reads no weights: the config against the mesh and the data (`check_config`),
    `train.init` and `train.encoders` (metadata only), the architecture and the param-group rules (on the abstract
    UNet). `lavie-train` runs it before it writes anything, so a rejected config leaves no trace."""
    check_config(config, mesh, data=not synthetic_data)
    init = _init_source(config)
    encoders = _encoders_source(config, init)
    arch = arch_from_config(config.unet.to_dict(), config.stage)
    try:  # on the abstract model: a rule that selects nothing fails before any weight is made
        if personalising(config):
            groups = lora_groups(add_adapters(abstract_unet(arch), config), config)
        else:
            groups = optim.param_groups_from_config(abstract_unet(arch), config.train)
    except optim.OptimConfigError as e:
        raise TrainConfigError(str(e)) from None
    return Checked(init, encoders, arch, groups)


def _step_key(config: ml_collections.ConfigDict, *graphdefs: nnx.GraphDef) -> str:
    """Everything the train step captures, as text: the whole run config and the model graphs (their reprs list
    every module, static attribute and variable); any change is another program."""
    graphs = [hashlib.sha256(repr(g).encode()).hexdigest() for g in graphdefs]
    values = json.loads(config.to_json_best_effort())
    values.get("train", {}).pop("eval", None)  # evaluation settings never reach the step
    return json.dumps([json.dumps(values, sort_keys=True), graphs])


def build_run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, abstract: bool = False,
              compiler_options: dict | None = None, synthetic_data: bool = False, checked: Checked | None = None
              ) -> Run:
    """Check the config, build the models on `mesh`, the initial train state and the jitted step.

    `abstract`: the UNet's params, optimizer state and EMA are `ShapeDtypeStruct`s with their shardings (nothing
    allocated or initialised): to compile the step and read its memory analysis before committing devices.
    `compiler_options`: XLA options for the step (e.g. `{'xla_backend_optimization_level': 0}` in tests).
    `synthetic_data`: the caller feeds batches of its own (benchmarks): `config.data` only gives their shapes, and
    its source (e.g. a precomputed dataset) need not exist. `checked`: `check_run`'s result when the caller ran it
    already (then it is not run again)."""
    if checked is None:
        checked = check_run(config, mesh, synthetic_data=synthetic_data)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    init, arch, groups = checked.init, checked.arch, checked.groups
    encoders = build_encoders(config, mesh, rules, checked.encoders, arch)
    check_models(config, arch, encoders)
    unet = build_unet(config, mesh, rules, init, abstract=abstract, text=encoders)
    graphdef, trainable, frozen, rest = groups.split(unet)
    if jax.tree.leaves(rest):
        raise TrainConfigError(f"the UNet holds state other than params ({list(nnx.to_flat_state(rest))[:3]}); "
                               "lavie-train does not know how to train it")
    tx, lr_at = optim.make_optimizer(config.train, groups)
    ema_decay_at = optim.make_ema_decay(config.train)

    replicated = NamedSharding(mesh, P())
    param_sh = jax.tree.map(lambda x: x.sharding, trainable)
    opt_sh = optim.opt_state_shardings(tx, trainable, param_sh, replicated)
    shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                           ema=param_sh if ema_decay_at is not None else None,
                           frozen=jax.tree.map(lambda x: x.sharding, frozen), rng=replicated)
    with jax.set_mesh(mesh):
        def init(fn, shardings):
            return (jax.eval_shape(fn, trainable) if abstract
                    else jax.jit(fn, out_shardings=shardings)(trainable))

        opt_state = init(tx.init, opt_sh)
        ema = init(optim.init_ema, param_sh) if ema_decay_at is not None else None
        state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=trainable,
                           opt_state=opt_state, ema=ema, frozen=frozen,
                           rng=jax.device_put(jax.random.key(config.train.seed), replicated))
        if abstract:  # eval_shape drops shardings: give every leaf its own
            state = with_shardings(state, shardings)

    # precomputed latents need no VAE in the step, unless the stage encodes pixels there (Stage.encodes_in_step)
    precomputed = config.data.dataset == "precomputed" and not stages.get_stage(config.stage).encodes_in_step
    vae_gd, vae_state = nnx.split(encoders.vae)
    text_gd, text_state = nnx.split(encoders.text_encoder)
    null_tokens = tokenize(encoders.tokenizer, [stages.get_stage(config.stage).dropped_text],
                           max_length=encoders.text_encoder.config.max_position_embeddings)[0]
    with jax.set_mesh(mesh):
        null_text = jax.jit(lambda s, ids: nnx.merge(text_gd, s)(ids[None]).last_hidden_state[0].astype(jnp.float32),
                            out_shardings=replicated)(text_state, jax.device_put(null_tokens, replicated))
    enc = Encoders(vae=None if precomputed else vae_state, text=text_state,
                   null_tokens=jax.device_put(null_tokens, replicated), null_text=null_text)
    enc_sh = Encoders(vae=None if precomputed else jax.tree.map(lambda x: x.sharding, vae_state),
                      text=jax.tree.map(lambda x: x.sharding, text_state), null_tokens=replicated,
                      null_text=replicated)

    objective = objective_from_config(config, encoders.vae.scaling_factor, encoders.vae.config.downsample_factor)
    tables = {k: jax.device_put(v, replicated) for k, v in objective.tables().items()}
    inputs = StageInputs(objective, None if precomputed else vae_gd, text_gd)
    step = functools.partial(train_step, objective=objective, loss_fn=stage_loss(objective, graphdef, inputs), tx=tx,
                             lr_at=lr_at, ema_decay_at=ema_decay_at)
    batch_sh = parallel.batch_sharding(mesh)
    # keep_unused: every argument stays in the program (its memory analysis then accounts for all of them). The
    # step closes over what the config and the model graphs make (objective, optimizer, schedules, losses): they
    # are its key in the program cache, so a resumed or repeated run loads the compiled step without tracing it.
    program_key = _step_key(config, graphdef, vae_gd, text_gd)
    step_fn = program_cache.Program(step, key=program_key,
                                    in_shardings=(shardings, enc_sh, replicated, batch_sh),
                                    out_shardings=(shardings, replicated), donate_argnums=0, keep_unused=True,
                                    compiler_options=compiler_options)
    return Run(config=config, mesh=mesh, objective=objective, graphdef=graphdef, groups=groups, state=state,
               state_shardings=shardings, encoders=enc, tables=tables, step_fn=step_fn,
               tokenizer=encoders.tokenizer, batch_sharding=batch_sh,
               flops_per_step=step_flops(config, arch, encoders), arch=arch,
               vae_factor=encoders.vae.config.downsample_factor,
               inputs_graphdefs=(None if precomputed else vae_gd, text_gd), encoder_shardings=enc_sh,
               encoder_models=encoders,
               program_key=program_key)
