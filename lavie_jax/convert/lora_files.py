"""LoRA adapter files: ours written in the diffusers/PEFT layout under the official LaVie module names, and every
common layout read back (spec applications.md section 5).

Written (`save_adapter`): a safetensors file holding only the adapters, float32, keys
`<official module>.lora_A.weight [r, I(, kh, kw)]` and `<official module>.lora_B.weight [O, r(, 1, 1)]` (e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight`: the names of the official LaVie
checkpoints, `attn_temporal` for the VSR stage). The header metadata records `lavie_kind: lora`, `lavie_stage`, the
alphas (`lora_alphas`: JSON `{module: alpha}`) and diffusers' `lora_adapter_metadata` (`r`, `lora_alpha`,
`rank_pattern`, `alpha_pattern`, `target_modules`), so PEFT-aware tools find alpha too.

Read (`read_adapter`), against a model's own module table (never by splitting names on `_`):

| family                  | A / B suffixes                                  | module names                      | alpha |
|-------------------------|-------------------------------------------------|-----------------------------------|-------|
| ours, PEFT, diffusers   | `.lora_A.weight` / `.lora_B.weight`             | bare, `unet.`, `base_model.model.` | our metadata, `lora_adapter_metadata`, a `.alpha` tensor, `adapter_config.json` beside the file |
| kohya (A1111, Civitai)  | `.lora_down.weight` / `.lora_up.weight`         | `lora_unet_` + module with `.` -> `_` | `.alpha` 0-d tensor |
| diffusers converted     | `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down/up.weight` | as diffusers | `.alpha` |
| old attn-procs          | `<attn>.processor.to_q_lora.down.weight` / `.up.weight` | `to_out_lora` -> `to_out.0` | none |

Alpha absent means alpha = rank (scale 1). Text-encoder tensors (`lora_te*_`, `text_encoder.`, `te.`) are listed in
`skipped`: lavie-jax adapts the UNet only. Community Stable Diffusion 1.x LoRAs load onto the base stage's spatial
layers, whose names are SD 1.4's.

Learned tokens (`models.tokens`: textual inversion / pivotal tuning) travel in the same file as embeddings bundled
with a LoRA, the A1111 / kohya convention: `bundle_emb.<word>.string_to_param.*` `[1, D]` (written; A1111's
key inside a `.pt` embedding), or `bundle_emb.<word>.emb_params` `[1, D]` (kohya's standalone safetensors key, read
too), the word being the token prompts use; our metadata lists them in order (`lavie_tokens`). One vector per word:
a multi-vector embedding (A1111 replaces its name by n vectors) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from lavie_jax.convert.export import Entry, write_safetensors
from lavie_jax.convert.keymap import official_names, to_flax_layout, to_torch_layout, torch_key
from lavie_jax.convert.torch_files import WeightFileError, open_weights
from lavie_jax.io import run_params, store
from lavie_jax.io.safe_io import FileOwnership, atomic_file, check_output_file
from lavie_jax.models.arch import arch_from_config
from lavie_jax.models.layers import Dense
from lavie_jax.models.lora import Adapter, LayerAdapter, LoRAError, adapter_from_params, check_adapter, lora_weights
from lavie_jax.models.unet import abstract_unet
from lavie_jax.models.wrapping import layer_paths

KIND = "lora"
_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")
_PREFIXES = ("base_model.model.unet.", "base_model.model.", "unet.", "model.diffusion_model.")
# (down suffix, up suffix), longest first so `.lora.down.weight` is not taken for something shorter
_SUFFIXES = ((".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
             (".lora_A.default.weight", ".lora_B.default.weight"),
             (".lora.down.weight", ".lora.up.weight"),
             ("_lora.down.weight", "_lora.up.weight"),
             (".lora_down.weight", ".lora_up.weight"),
             (".lora_A.weight", ".lora_B.weight"))


@dataclasses.dataclass
class AdapterFile:
    """An adapter read from a file: `{layer path: LayerAdapter}` in our layouts, the layout it came in, and the
    tensors it held for models lavie-jax does not adapt (the text encoder)."""

    path: str
    layers: dict[str, LayerAdapter]
    layout: str
    stage: str | None
    skipped: list[str]
    tokens: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # learned token rows {word: [D]}


def _why_not_ours(path: Path) -> str | None:
    try:
        meta = _metadata(path)
    except (OSError, WeightFileError) as e:
        return f"it cannot be read as a safetensors file ({e})"
    return None if meta.get("lavie_kind") == KIND else "it is not a lavie-jax adapter file (no lavie_kind: lora)"


ADAPTERS = FileOwnership(what="a LoRA adapter file written by lavie-jax", writer="lavie-jax", recognise=_why_not_ours)


def _metadata(path: Path) -> dict[str, str]:
    with open_weights(path) as weights:
        return dict(weights.metadata)


def module_table(model: nnx.Module) -> dict[str, str]:
    """`{official module name: layer path}` of every wrappable layer of `model` (e.g. `...attn1.to_out.0` ->
    `...attn1.to_out`)."""
    names = official_names(model)
    table = {}
    for path in layer_paths(model):
        key = torch_key((*path.split("."), "kernel"), renames=names)
        table[key[: -len(".weight")]] = path
    return table


def _stage(model: nnx.Module) -> str | None:
    arch = getattr(model, "arch", None)
    return getattr(arch, "stage", None)


# ---------------------------------------------------------------------------------------------------- writing

BUNDLE = "bundle_emb."
_BUNDLE_SUFFIXES = (".string_to_param.*", ".emb_params")  # A1111 (written), kohya


def adapter_tensors(model: nnx.Module, adapter: Adapter | None = None, tokens: Mapping[str, np.ndarray] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(`{key: float32 array}` in PyTorch layouts, header metadata) of `adapter` (default: `model`'s LoRA-wrapped
    layers) under the official module names of `model`, and of the learned `tokens` (`{word: [D]}`)."""
    tokens = dict(tokens or {})
    adapter = lora_weights(model) if adapter is None else adapter
    if not adapter and not tokens:
        raise LoRAError("the model has no LoRA adapters or learned tokens to save; add them first "
                        "(models.lora.add_lora)")
    width = model.arch.cross_attention_dim
    for word, row in tokens.items():
        if np.asarray(row).reshape(-1).shape != (width,):
            raise LoRAError(f"learned token {word!r} has shape {list(np.shape(row))}, but this UNet's text is "
                            f"{width}-d")
    token_tensors = {f"{BUNDLE}{w}{_BUNDLE_SUFFIXES[0]}": np.asarray(r, np.float32).reshape(1, -1)
                     for w, r in tokens.items()}
    token_meta = {"lavie_tokens": json.dumps(list(tokens))} if tokens else {}
    if not adapter:
        return token_tensors, {"format": "pt", "lavie_kind": KIND, "lavie_stage": str(_stage(model)), **token_meta}
    check_adapter(model, adapter)
    layers = layer_paths(model)
    by_path = {p: m for m, p in module_table(model).items()}
    tensors, alphas, ranks = {}, {}, {}
    for path in sorted(adapter):
        w, module = adapter[path], by_path[path]
        a, b = np.asarray(w.a, np.float32), np.asarray(w.b, np.float32)
        a_t = to_torch_layout(a, "kernel")  # [*k, I, r] -> [r, I, *k]
        b_t = b.T if isinstance(layers[path], Dense) else b.T.reshape(*b.T.shape, *(1,) * (a.ndim - 2))
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a_t)
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b_t)
        alphas[module], ranks[module] = float(w.alpha), int(w.rank)
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    peft = {"r": r0, "lora_alpha": a0, "target_modules": sorted(alphas),
            "rank_pattern": {m: r for m, r in ranks.items() if r != r0},
            "alpha_pattern": {m: a for m, a in alphas.items() if a != a0}}
    meta = {"format": "pt", "lavie_kind": KIND, "lavie_stage": str(_stage(model)),
            "lora_alphas": json.dumps(alphas, sort_keys=True), "lora_adapter_metadata": json.dumps(peft, sort_keys=True)}
    return tensors | token_tensors, meta | token_meta


def save_adapter(path: str | os.PathLike, model: nnx.Module, adapter: Adapter | None = None, *,
                 overwrite: bool = False, flag: str = "--output", tokens: Mapping[str, np.ndarray] | None = None
                 ) -> int:
    """Write `adapter` (default: `model`'s LoRA-wrapped layers) and the learned `tokens` (`{word: [D]}`) alone as a
    safetensors file (module docstring); returns its size. An existing file is replaced only with `overwrite` and
    only if it is one of ours."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAError(f"{flag} {path}: adapter files are .safetensors; name it e.g. {path.with_suffix('.safetensors')}")
    tensors, meta = adapter_tensors(model, adapter, tokens)
    entries: list[Entry] = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    check_output_file(path, ADAPTERS, overwrite=overwrite, flag=flag)
    with atomic_file(path, ADAPTERS, overwrite=overwrite, flag=flag) as tmp:
        write_safetensors(tmp, entries, tensors.items(), metadata=meta)
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------------- reading

def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, 'down' | 'up' | 'alpha') of a LoRA key, or None for a key that is none of these."""
    for down, up in _SUFFIXES:
        if key.endswith(down):
            return key[: -len(down)], "down"
        if key.endswith(up):
            return key[: -len(up)], "up"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return None


def _old_attn_procs(module: str) -> str:
    """`...attn1.processor.to_q` (an old attn-procs name, `_lora` already cut) -> `...attn1.to_q`."""
    if ".processor." not in module:
        return module
    head, _, tail = module.rpartition(".processor.")
    return f"{head}.{'to_out.0' if tail == 'to_out' else tail}"


def _resolve(module: str, table: Mapping[str, str], kohya: Mapping[str, str]) -> str | None:
    if module.startswith("lora_unet_"):
        return kohya.get(module[len("lora_unet_"):])
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    return table.get(_old_attn_procs(module))


def _peft_alphas(path: Path, meta: Mapping[str, str]) -> tuple[dict[str, float], float | None, bool]:
    """({module: alpha}, default alpha or None, rslora) from our metadata, diffusers' `lora_adapter_metadata`, or a
    PEFT `adapter_config.json` beside the file."""
    if "lora_alphas" in meta:
        return {k: float(v) for k, v in json.loads(meta["lora_alphas"]).items()}, None, False
    config = None
    if "lora_adapter_metadata" in meta:
        config = json.loads(meta["lora_adapter_metadata"])
    elif (path.parent / "adapter_config.json").is_file():
        config = json.loads((path.parent / "adapter_config.json").read_text())
    if not isinstance(config, dict) or "lora_alpha" not in config:
        return {}, None, False
    pattern = {k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
    return pattern, float(config["lora_alpha"]), bool(config.get("use_rslora", False))


def _to_ours(module: str, down: np.ndarray, up: np.ndarray, layer: nnx.Module, source: str) -> tuple[np.ndarray,
                                                                                                        np.ndarray]:
    """PyTorch-layout down `[r, I(, *k)]` / up `[O, r(, 1, 1)]` -> our `a [*k, I, r]` / `b [r, O]`."""
    if up.ndim > 2:
        if any(s != 1 for s in up.shape[2:]):
            raise LoRAError(f"{source}: {module}: the up weight {list(up.shape)} is not 1x1; only 1x1 up projections "
                            "(kohya, PEFT, LoCon) are supported")
        up = up.reshape(up.shape[:2])
    if isinstance(layer, Dense) and down.ndim > 2:
        if any(s != 1 for s in down.shape[2:]):
            raise LoRAError(f"{source}: {module} is a linear layer here, but its down weight is {list(down.shape)}")
        down = down.reshape(down.shape[:2])  # SD's 1x1 conv proj_in/proj_out, linear in lavie-jax
    if not isinstance(layer, Dense) and down.ndim == 2:  # a linear LoRA on a 1x1 conv
        down = down.reshape(*down.shape, *(1,) * (layer.kernel.ndim - 2))
    return to_flax_layout(np.asarray(down, np.float32), "kernel"), np.asarray(up, np.float32).T


def read_adapter(path: str | os.PathLike, model: nnx.Module, *, flag: str = "--lora") -> AdapterFile:
    """Read a LoRA file of any layout in the module docstring onto `model`'s layers (an abstract model will do:
    only its module table and kernel shapes are used). LoRAError (or WeightFileError for an unreadable file) names
    the file, the problem and the fix: an adapter of another stage or architecture, unknown module names, a
    down without its up."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"{flag} {path}: no such file")
    source = f"{flag} {path}"
    try:
        with open_weights(path) as weights:
            meta = dict(weights.metadata)
            raw = {k: np.array(weights[k]) for k in weights}
    except WeightFileError as e:
        raise LoRAError(f"{flag}: {e}") from None
    stage = meta.get("lavie_stage") if meta.get("lavie_kind") == KIND else None
    if stage is not None and stage != str(_stage(model)):
        raise LoRAError(f"{source} is an adapter of the {stage} stage, but the model is the {_stage(model)} stage's; "
                        f"use it with the {stage} stage (e.g. --config {stage})")
    table = module_table(model)
    kohya = {m.replace(".", "_"): p for m, p in table.items()}
    parts: dict[str, dict[str, np.ndarray]] = {}
    skipped, unknown, layout = [], [], set()
    tokens = _bundled_tokens(raw, model, source)
    for key, value in raw.items():
        if key.startswith(BUNDLE):
            continue
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, part = split
        if module.startswith(_TEXT_PREFIXES):
            skipped.append(key)
            continue
        parts.setdefault(module, {})[part] = value
        if part != "alpha":
            layout.add("kohya" if module.startswith("lora_unet_") else
                       "lavie-jax" if meta.get("lavie_kind") == KIND else "diffusers")
    if unknown:
        raise LoRAError(f"{source}: {len(unknown)} tensors are not LoRA weights (e.g. {unknown[:2]}); is this a model "
                        "checkpoint rather than an adapter?")
    if not parts and not tokens:
        raise LoRAError(f"{source} holds no UNet adapters" + (f" (only {len(skipped)} text-encoder tensors, which "
                                                              "lavie-jax does not adapt)" if skipped else ""))
    alphas, default_alpha, rslora = _peft_alphas(path, meta)
    layers_by_path = layer_paths(model)
    out, missing = {}, []
    for module, got in parts.items():
        if "down" not in got or "up" not in got:
            raise LoRAError(f"{source}: {module} has {sorted(got)} but needs both down (A) and up (B) weights; the "
                            "file is incomplete")
        layer_path = _resolve(module, table, kohya)
        if layer_path is None:
            missing.append(module)
            continue
        a, b = _to_ours(module, got["down"], got["up"], layers_by_path[layer_path], source)
        rank = a.shape[-1]
        bare = module
        for prefix in _PREFIXES:
            bare = bare.removeprefix(prefix)
        if "alpha" in got:
            alpha = float(np.asarray(got["alpha"]).reshape(()))
        elif bare in alphas:
            alpha = alphas[bare]
        elif default_alpha is not None:
            alpha = default_alpha * (rank ** 0.5 if rslora else 1.0)  # rsLoRA: lora_alpha / sqrt(r) = alpha' / r
        else:
            alpha = float(rank)
        out[layer_path] = LayerAdapter(a, b, alpha)
    if missing:
        raise LoRAError(f"{source}: modules {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)} of "
                        f"{len(parts)}) are not layers of this {_stage(model)} UNet: the adapter was made for "
                        f"another architecture or stage (this UNet's layers are named like "
                        f"{next(iter(table))})")
    check_adapter(model, out, what=source)
    return AdapterFile(str(path), out, "+".join(sorted(layout | ({"embeddings"} if tokens else set()))), stage,
                       skipped, tokens)


def _bundled_tokens(raw: Mapping[str, np.ndarray], model: nnx.Module, source: str) -> dict[str, np.ndarray]:
    """`{word: [D]}` of a file's bundled embeddings (module docstring), checked against the UNet's text width."""
    out = {}
    width = model.arch.cross_attention_dim
    for key, value in raw.items():
        if not key.startswith(BUNDLE):
            continue
        name, suffix = key[len(BUNDLE):].partition(".")[::2]
        if "." + suffix not in _BUNDLE_SUFFIXES:
            raise LoRAError(f"{source}: {key} is a bundled embedding of an unknown layout (lavie-jax reads "
                            f"{BUNDLE}<word>{' or '.join(_BUNDLE_SUFFIXES)})")
        value = np.asarray(value, np.float32)
        if value.ndim == 1:
            value = value[None]
        if value.ndim != 2 or value.shape[1] != width:
            raise LoRAError(f"{source}: the embedding of {name!r} is {list(value.shape)}, but this UNet's text is "
                            f"{width}-d: it was learnt for another text encoder")
        if value.shape[0] != 1:
            raise LoRAError(f"{source}: the embedding of {name!r} has {value.shape[0]} vectors; lavie-jax learns and "
                            "loads one vector per word (a one-token word's row)")
        if name in out:
            raise LoRAError(f"{source}: the embedding of {name!r} appears twice")
        out[name] = value[0]
    return out


def parse_lora_arg(value: str) -> tuple[str, float]:
    """`FILE[:SCALE]` (a command-line `--lora`) -> (file, multiplier); the scale defaults to 1."""
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return value, 1.0


def read_adapters(values: Sequence[str], model: nnx.Module, *, flag: str = "--lora"
                  ) -> list[tuple[AdapterFile, float]]:
    """`--lora FILE[:SCALE]` values -> [(AdapterFile, multiplier)], every file checked against `model`."""
    return [(read_adapter(f, model, flag=flag), m) for f, m in map(parse_lora_arg, values)]


def adapter_summary(files: Sequence[tuple[AdapterFile, float]]) -> str:
    """One line per adapter: file, layout, layers, ranks, scale, and what was skipped."""
    lines = []
    for f, m in files:
        ranks = sorted({w.rank for w in f.layers.values()})
        skipped = f", {len(f.skipped)} text-encoder tensors skipped" if f.skipped else ""
        words = f", learned tokens {', '.join(f.tokens)}" if f.tokens else ""
        lines.append(f"LoRA {f.path} ({f.layout}): {len(f.layers)} layers, rank {'/'.join(map(str, ranks)) or '-'}, "
                     f"scale {m:g}{words}{skipped}")
    return "\n".join(lines)



def export_run_adapter(source: store.Source, output: str | os.PathLike, *, ema: bool = True,
                       overwrite: bool = False) -> dict:
    """Write the adapters of a LoRA `lavie-train` work directory (its latest checkpoint's EMA, or raw, params) alone
    as an adapter file; returns {"output", "step", "layers", "bytes"}."""
    step, config, params = run_params.read_params(source.path, ema=ema, step=source.step)
    rules = store.run_lora_rules(config)
    tokens = store.run_tokens(config, params)
    if not rules and not tokens:
        raise LoRAError(f"--checkpoint {source.path} is not a LoRA run (its train.lora.rules and tokens are empty): "
                        "export its UNet without --adapters-only")
    model = abstract_unet(arch_from_config(config["unet"], config.get("stage")))
    adapter = adapter_from_params(model, rules, params) if rules else {}
    size = save_adapter(output, model, adapter, overwrite=overwrite, tokens=tokens)
    return {"output": str(output), "step": step, "layers": len(adapter), "tokens": list(tokens), "bytes": size}
