"""One way to load models, wherever they come from: `lavie-convert` directories, `lavie-train` work directories, or
random weights. Sampling, training, export and evaluation all load through here.

    source = open_source("ckpt/base", stage="base")   # checked (kind, stage, completeness); no weights read
    unet = load_unet(source, mesh=mesh, rules=rules, options=options)
    vae, text_encoder, tokenizer = load_components(source, random=RandomParts("tiny_f8", "tiny", "sd14"), width=64)
    pipeline = load_pipeline("ckpt/base")             # the whole stage at once
    model, stream, meta = stored_params(source)       # one tensor at a time (export)

| source                        | kind       | UNet                                  | VAE, text encoder, tokenizer          |
|-------------------------------|------------|---------------------------------------|---------------------------------------|
| `lavie-convert` pipeline dir  | 'pipeline' | its `unet/`                           | its `vae/`, `text_encoder/`, `tokenizer/` |
| `lavie-convert` UNet dir      | 'unet'     | the directory                         | none (a UNet directory holds a UNet)  |
| `lavie-train` work directory  | 'workdir'  | its latest complete checkpoint: the EMA of the trained params (or the raw ones), frozen ones merged | those the run trained with: its `train.encoders` (or `train.init`) pipeline, or the random ones its config names |
| `'random'`                    | 'random'   | host-drawn random weights of an architecture the caller gives | named random components (`RandomParts`) |

Random weights are drawn with numpy on the host from the abstract models (`randomize`: normal / sqrt(fan_in)
kernels, unit norm scales, zero biases): eager NNX initialisation compiles one op per distinct param shape and takes
tens of seconds on a CPU. A training run with random components and the sampler of its work directory get the very
same ones (the VAE from the run's seed + 1, the text encoder from seed + 2).

Loaded weights land on `mesh` by the logical-axis `rules` (each param restored straight into its sharding), or on
the default device without a mesh; execution `options` (compute dtype, attention kernel; `lavie_jax.models.options`)
are applied to every model. Errors are `SourceError`s naming the flag or config field the source came from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lavie_jax.io import checkpoints, run_params, workdir as workdirs
from lavie_jax.io.checkpoints import CheckpointError
from lavie_jax.io.keycheck import check_keys
from lavie_jax.models import VAE_CONFIGS, AutoencoderKL, CLIPTextEncoder, UNet3D, abstract_text_encoder, abstract_vae
from lavie_jax.models.arch import UNetArch, arch_from_config
from lavie_jax.models.clip import text_encoder_config
from lavie_jax.models import tokens
from lavie_jax.models.lora import adapter_from_params, merge_params
from lavie_jax.models.options import ExecutionOptions
from lavie_jax.models.unet import abstract_unet
from lavie_jax.parallel import DEFAULT_RULES, Rules, shard_module

RANDOM = "random"
KINDS = ("pipeline", "unet", "workdir", RANDOM)


class SourceError(CheckpointError):
    """A model source cannot be used (missing, incomplete, another stage's, the wrong kind); the message names the
    flag or config field it came from and the fix."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where models come from (module docstring), checked by `open_source`."""

    kind: str
    path: Path | None = None
    stage: str | None = None  # the stage of its UNet (None: random, or a pipeline without a UNet stage)
    step: int | None = None  # a work directory's latest complete step
    flag: str = ""  # the flag or config field that named it, for messages

    def __str__(self) -> str:
        return RANDOM if self.path is None else str(self.path)

    @property
    def named(self) -> str:
        """How messages name it: 'FLAG PATH' (or the path alone)."""
        return f"{self.flag} {self}".strip()


@dataclasses.dataclass(frozen=True)
class RandomParts:
    """The components of a random pipeline, by name: `VAE_CONFIGS` key, `models.clip.text_encoder_config` name and
    tokenizer flavour (a stage config's `sample.vae`, `sample.text_encoder`, `sample.tokenizer`)."""

    vae: str
    text_encoder: str
    tokenizer: str

    @classmethod
    def from_config(cls, sample: Mapping[str, Any]) -> RandomParts:
        return cls(sample["vae"], sample["text_encoder"], sample["tokenizer"])


@dataclasses.dataclass
class Pipeline:
    """Everything one stage samples with; `metadata` says where it came from."""

    stage: str
    unet: UNet3D
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: Any  # lavie_jax.io.tokenizer.ClipTokenizer
    metadata: dict[str, Any]


# ------------------------------------------------------------------------------------------------ sources

def open_source(spec: str | os.PathLike | Source, *, stage: str | None = None, flag: str = "",
                kinds: tuple[str, ...] = KINDS) -> Source:
    """Check a model source without reading weights: its kind (one of `kinds`), that it is complete, and that its
    UNet belongs to `stage` (when given). SourceError names `flag` (the flag or config field it came from)."""
    if isinstance(spec, Source):
        source = spec
    elif str(spec) == RANDOM:
        source = Source(RANDOM, flag=flag)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise SourceError(f"{f'{flag} ' if flag else ''}{spec}: no such directory; pass {_describe(kinds)}")
        source = _workdir_source(path, flag) if workdirs.is_workdir(path) else _converted_source(path, flag)
    if source.kind not in kinds:
        raise SourceError(_kind_refusal(source, kinds))
    if stage is not None and source.stage is not None and source.stage != stage:
        held = "is a {} training run" if source.kind == "workdir" else "holds a {} UNet"
        raise SourceError(f"{source.named} {held.format(source.stage)} but the config is the {stage} stage; pass "
                          f"a {stage} checkpoint, or the {source.stage} config (`--config {source.stage}`)")
    return source


_DESCRIPTIONS = {"pipeline": "a pipeline directory (`lavie-convert pipeline|sd|x4`)",
                 "unet": "a UNet directory (`lavie-convert lavie`)", "workdir": "a `lavie-train` work directory",
                 RANDOM: f"'{RANDOM}' for random weights", "vae": "a VAE directory",
                 "text_encoder": "a text-encoder directory"}


def _describe(kinds: tuple[str, ...]) -> str:
    names = [_DESCRIPTIONS[k] for k in kinds]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _kind_refusal(source: Source, kinds: tuple[str, ...]) -> str:
    held = {"pipeline": "a pipeline", "workdir": "a lavie-train work directory", RANDOM: "random weights"}
    what = held.get(source.kind, f"a single {source.kind}")
    return f"{source.named} holds {what}, not what is needed here: pass {_describe(kinds)}"


def _workdir_source(path: Path, flag: str) -> Source:
    marker = json.loads((path / workdirs.MARKER).read_text())
    with workdirs.TrainCheckpointer(path, save_every=0, read_only=True) as ckpt:
        step = ckpt.latest_step()
    if step is None:
        raise SourceError(f"{f'{flag} ' if flag else ''}{path}: the training run has no complete checkpoint yet")
    return Source("workdir", path, marker.get("stage"), step, flag)


def _converted_source(path: Path, flag: str) -> Source:
    try:
        meta = checkpoints.read_metadata(path)
    except CheckpointError as e:
        raise SourceError(f"{f'{flag} ' if flag else ''}{path}: {e}") from None
    stage = meta.get("stage")
    if meta["kind"] == "pipeline" and "unet" in meta.get("components", {}):
        stage = checkpoints.read_metadata(checkpoints.component_dir(path, "unet")).get("stage") or stage
    return Source(meta["kind"], path, stage, None, flag)


def stored_arch(source: Source | str | os.PathLike) -> UNetArch:
    """The architecture of a source's UNet, from its metadata (no weights read)."""
    source = open_source(source, kinds=("pipeline", "unet", "workdir"))
    if source.kind == "workdir":
        config = workdirs.TrainCheckpointer(source.path, save_every=0, read_only=True).stored_config(source.step)
        return arch_from_config(config["unet"], config.get("stage"))
    return arch_from_config(checkpoints.read_metadata(checkpoints.component_dir(source.path, "unet"))["config"])


# ------------------------------------------------------------------------------------------------ loading

def randomize(model: nnx.Module, seed: int) -> nnx.Module:
    """Fill a concrete or abstract model's params with host-drawn random values (module docstring), in place."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape, leaf = tuple(var.shape), str(path[-1])
        if leaf == "scale":
            value = np.ones(shape, np.float32)
        elif len(shape) == 1:
            value = np.zeros(shape, np.float32)
        else:
            value = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
        var.set_value(jnp.asarray(value))
    nnx.update(model, state)
    return model


def load_unet(source: Source | str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
              rules: Rules = DEFAULT_RULES, options: ExecutionOptions | None = None, ema: bool = True,
              arch: UNetArch | None = None, seed: int = 0) -> UNet3D:
    """The ready UNet3D of a source (module docstring). `ema`: a work directory's EMA params (else the raw ones);
    `arch`: the architecture of random weights (`seed`), or, for a stored UNet, the one it must have.

    For repeated calls wrap it once: `fast = lavie_jax.models.compiled(unet)`; `fast(x, t, text)` runs the compiled
    forward without NNX's per-call graph walk and param copy."""
    source = open_source(source, kinds=("pipeline", "unet", "workdir", RANDOM))
    if source.kind == RANDOM:
        if arch is None:
            raise ValueError("random weights need the UNet's architecture: pass arch=")
        unet = randomize(abstract_unet(arch, options=options), seed)
        return shard_module(unet, mesh, rules) if mesh is not None else unet
    if arch is not None and (stored := stored_arch(source)) != arch:
        raise SourceError(f"{source.named}: its UNet's architecture differs from the config's unet section "
                          f"in {_arch_diff(stored, arch)}; use the config that matches the checkpoint")
    if source.kind == "workdir":
        return _workdir_unet(source, mesh, rules, options, ema)[0]
    return checkpoints.load_component(source.path, "unet", mesh=mesh, rules=rules, options=options)


def _arch_diff(a: UNetArch, b: UNetArch) -> list[str]:
    return [f.name for f in dataclasses.fields(UNetArch) if getattr(a, f.name) != getattr(b, f.name)]


def run_lora_rules(config: Mapping[str, Any]) -> tuple:
    """A run config's `train.lora.rules` (a stored dict or the ConfigDict; empty: no adapters)."""
    lora = (config.get("train") or {}).get("lora") or {}
    return tuple(tuple(r) for r in lora.get("rules") or ())


def run_tokens(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A stored LoRA run's learned tokens `{word: [D]}` (its `train.lora.tokens`, their rows from its saved
    `params`, by dotted path); empty when it learnt none."""
    words = run_words(config)
    if not words:
        return {}
    rows = params.get(f"{tokens.ATTRIBUTE}.embedding")
    if rows is None or np.shape(rows)[0] != len(words):
        raise SourceError(f"the run learnt tokens {list(words)}, but its checkpoint holds no rows for them: the run "
                          "config and the checkpoint disagree")
    return {w: np.asarray(r, np.float32) for w, r in zip(words, np.asarray(rows))}


def run_words(config: Mapping[str, Any]) -> tuple[str, ...]:
    """A run config's `train.lora.tokens` (a stored dict or the ConfigDict; empty: no learned tokens)."""
    return tuple(((config.get("train") or {}).get("lora") or {}).get("tokens") or ())


def personalised(config: Mapping[str, Any]) -> bool:
    """A run that trained adapters, learned tokens or both (its checkpoints hold them, not the base)."""
    return bool(run_lora_rules(config) or run_words(config))


def _lora_workdir_unet(source: Source, step: int, stored: Mapping[str, Any], params: dict, mesh, rules: Rules,
                       options) -> UNet3D:
    """A LoRA run's UNet: its base (the run's `train.init`, read again: the checkpoints do not hold it) with the
    trained adapters (`params`: EMA or raw) merged into the kernels."""
    try:
        base = open_source(stored["train"]["init"], stage=stored.get("stage"), kinds=("pipeline", "unet", "workdir"),
                           flag=f"the base of LoRA run {source.path} (its train.init)")
    except SourceError as e:
        raise SourceError(f"{e}; the run's checkpoints hold its adapters only: restore its base there") from None
    unet = load_unet(base, mesh=mesh, rules=rules, options=options)
    if run_lora_rules(stored):  # (a run of learned tokens alone leaves the UNet as it is)
        adapter = adapter_from_params(unet, run_lora_rules(stored), params)
        nnx.update(unet, merge_params(unet, [(adapter, 1.0)]))
    return unet


def _workdir_unet(source: Source, mesh, rules: Rules, options, ema: bool) -> tuple[UNet3D, dict[str, np.ndarray]]:
    """A work directory's UNet and the learned tokens of its run (`run_tokens`), from one read of its params."""
    step, stored, params = run_params.read_params(source.path, ema=ema, step=source.step)
    if personalised(stored):
        return (_lora_workdir_unet(source, step, stored, params, mesh, rules, options),
                run_tokens(stored, params))
    unet = abstract_unet(arch_from_config(stored["unet"], stored.get("stage")), options=options)
    state = nnx.state(unet, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    names = {".".join(map(str, p)): p for p in flat}
    check_keys({n: tuple(flat[p].shape) for n, p in names.items()}, {n: v.shape for n, v in params.items()},
               what=f"training checkpoint {source.path} (step {step})")
    paths = list(names.values())
    values = [params.pop(name) for name in names]
    if mesh is None:
        values = jax.device_put(values)  # one batched transfer; with a mesh, shard_module places them
    for path, value in zip(paths, values):
        flat[path].set_value(value)
    nnx.update(unet, state)
    return (shard_module(unet, mesh, rules) if mesh is not None else unet), {}


def load_components(source: Source | str | os.PathLike, *, random: RandomParts | None = None, width: int = 0,
                    seed: int = 0, mesh: jax.sharding.Mesh | None = None, rules: Rules = DEFAULT_RULES,
                    options: ExecutionOptions | None = None) -> tuple[AutoencoderKL, CLIPTextEncoder, Any]:
    """(VAE, text encoder, tokenizer) of a source (module docstring). Random components are named by `random`, with
    a text width of `width` for the 'tiny' encoder (the UNet's cross-attention width), drawn from `seed` + 1 and
    `seed` + 2. A work directory's are those its run trained with, from the run's own config and seed. A pipeline
    directory's are loaded once per process for the same mesh, rules and options and then shared: treat them as
    read-only."""
    from lavie_jax.io.text import load_tokenizer

    source = open_source(source, kinds=("pipeline", "workdir", RANDOM))
    if source.kind == "workdir":
        return _workdir_components(source, mesh, rules, options)
    if source.kind == RANDOM:
        if random is None:
            raise ValueError("random components need their names: pass random=RandomParts(...)")
        vae, text = _random_components(random, width, options, source.flag)
        vae, text = randomize(vae, seed + 1), randomize(text, seed + 2)
        if mesh is not None:
            vae, text = shard_module(vae, mesh, rules), shard_module(text, mesh, rules)
        return vae, text, load_tokenizer(flavor=random.tokenizer)
    return _pipeline_components(source.path.resolve(), (source.path / checkpoints.METADATA_FILE).stat().st_mtime_ns,
                                mesh, tuple(map(tuple, rules)), options)


@functools.lru_cache(maxsize=2)
def _pipeline_components(path: Path, stamp: int, mesh, rules, options) -> tuple:
    """The components of a pipeline directory, loaded once per process for the same placement and options (a
    cascade's stages often share them, e.g. the demo's three): the models are read-only to their users."""
    from lavie_jax.io.text import load_tokenizer

    kw = dict(mesh=mesh, rules=rules, options=options)
    meta = checkpoints.read_metadata(path)
    return (checkpoints.load_component(path, "vae", **kw), checkpoints.load_component(path, "text_encoder", **kw),
            load_tokenizer(path / meta["components"]["tokenizer"]))


def _random_components(parts: RandomParts, width: int, options, flag: str):
    if parts.vae not in VAE_CONFIGS:
        raise SourceError(f"config field sample.vae: unknown {parts.vae!r}; choose one of {sorted(VAE_CONFIGS)}")
    try:
        text = abstract_text_encoder(text_encoder_config(parts.text_encoder, width), options=options)
    except ValueError as e:
        raise SourceError(f"config field sample.text_encoder: {e}") from None
    return abstract_vae(parts.vae, options=options), text


def run_encoders(config: Mapping[str, Any]) -> str:
    """Where a training run's frozen VAE, text encoder and tokenizer come from: its `train.encoders`, else its
    `train.init` (when that is a pipeline), else random ('random')."""
    train = config["train"]
    encoders = train.get("encoders") or train.get("init") or RANDOM
    return encoders


def _workdir_components(source: Source, mesh, rules, options):
    config = workdirs.TrainCheckpointer(source.path, save_every=0, read_only=True).stored_config(source.step)
    encoders = run_encoders(config)
    flag = f"{source.named}: its run's train.encoders"
    if encoders != RANDOM:
        try:
            inner = open_source(encoders, flag=flag, kinds=("pipeline",))
        except SourceError as e:
            raise SourceError(f"{e} (the run took its VAE and text encoder from there)") from None
        return load_components(inner, mesh=mesh, rules=rules, options=options)
    arch = arch_from_config(config["unet"], config.get("stage"))
    return load_components(Source(RANDOM, flag=flag), random=RandomParts.from_config(config["sample"]),
                           width=arch.cross_attention_dim, seed=config["train"]["seed"], mesh=mesh, rules=rules,
                           options=options)


def load_pipeline(source: Source | str | os.PathLike, *, stage: str | None = None,
                  mesh: jax.sharding.Mesh | None = None, rules: Rules = DEFAULT_RULES,
                  options: ExecutionOptions | None = None, ema: bool = True, config: Any = None,
                  seed: int = 0) -> Pipeline:
    """A whole stage: UNet, VAE, text encoder and tokenizer of a pipeline directory, a work directory (its EMA
    params unless `ema=False`) or random weights (`config`: a stage config, whose `unet` and `sample` sections say
    what to draw; `seed`)."""
    source = open_source(source, stage=stage, kinds=("pipeline", "workdir", RANDOM))
    kw = dict(mesh=mesh, rules=rules, options=options)
    if source.kind == RANDOM:
        if config is None:
            raise ValueError("a random pipeline needs its stage config: pass config=")
        arch = arch_from_config(_plain(config["unet"]), config["stage"])
        unet = load_unet(source, arch=arch, seed=seed, **kw)
        parts = load_components(source, random=RandomParts.from_config(config["sample"]),
                                width=arch.cross_attention_dim, seed=seed, **kw)
        metadata = {"source": RANDOM}
    else:
        unet, learned = (_workdir_unet(source, mesh, rules, options, ema) if source.kind == "workdir"
                         else (load_unet(source, ema=ema, **kw), {}))
        parts = load_components(source, **kw)
        if learned:
            from lavie_jax.io.text import with_tokens  # a LoRA run's learned tokens: into a copy of its text encoder

            parts = (parts[0], with_tokens(parts[1], parts[2], learned, what=f"learned tokens of {source.path}"),
                     parts[2])
        metadata = ({"source": str(source.path), "step": source.step, "params": "ema" if ema else "raw"}
                    if source.kind == "workdir" else checkpoints.read_metadata(source.path))
    return Pipeline(unet.arch.stage, unet, *parts, metadata)


def _plain(section: Any) -> dict:
    return section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)


# ------------------------------------------------------------------------------------------------ streaming

def stored_params(source: Source | str | os.PathLike, *, component: str = "unet", ema: bool = True,
                  group_bytes: int = checkpoints.DEFAULT_GROUP_BYTES
                  ) -> tuple[nnx.Module, Iterator[tuple[tuple[str, ...], np.ndarray]], dict[str, Any]]:
    """(abstract model, `(param path, float32 array)` stream, metadata) of a stored model, checked against its
    architecture first: a component of a `lavie-convert` directory is read a group at a time; a work directory's
    UNet (its EMA params unless `ema=False`) is read whole (a training checkpoint stores it sharded). Paths are
    tuples of strings, in sorted order."""
    source = open_source(source, kinds=("pipeline", "unet", "workdir", "vae", "text_encoder"))
    if source.kind == "workdir":
        if component != "unet":
            raise SourceError(f"{source.path} is a lavie-train work directory: it holds a trained UNet only; its "
                              "VAE and text encoder are those of the pipeline directory it trained with")
        step, config, params = run_params.read_params(source.path, ema=ema, step=source.step)
        if personalised(config):  # the base with the adapters merged: a plain UNet from here on (learned tokens
            # belong to the text encoder, which a UNet export does not hold: export them with --adapters-only)
            model = _lora_workdir_unet(source, step, config, params, None, DEFAULT_RULES, None)
            params = {".".join(map(str, p)): np.asarray(v[...], np.float32)
                      for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        model = abstract_unet(arch_from_config(config["unet"], config.get("stage")))
        expected = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model,
                                                                                                  nnx.Param))}
        check_keys(expected, {k: v.shape for k, v in params.items()},
                   what=f"training checkpoint {source.path} (step {step})")
        stream = ((path, params[".".join(path)]) for path in sorted(tuple(n.split(".")) for n in params))
        meta = {"kind": "unet", "stage": config.get("stage"), "step": step, "params": "ema" if ema else "raw"}
        return model, stream, meta
    directory = checkpoints.component_dir(source.path, component)
    meta = checkpoints.read_metadata(directory)
    model = checkpoints.abstract_component(meta["kind"], meta["config"])
    checkpoints.check_stored_params(directory, model)
    return model, checkpoints.iter_stored_params(directory, group_bytes=group_bytes), meta
