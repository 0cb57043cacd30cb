"""UNet3D: the one denoiser module of all three LaVie stages (architecture from `UNetArch`).

Call: `unet(sample [B,F,H,W,Cin], timesteps [B], encoder_hidden_states [B,L,D], class_labels [B] | None,
num_image_frames=0) -> [B,F,H,W,Cout]`. `sample` already holds any conditioning channels (interpolation:
4 noisy + 4 conditioning latents; VSR: 4 latents + 3 low-res RGB).

Joint image-video training (base): pass a batch whose last `num_image_frames` frames are independent images (the
official recipe appends 4 per 16-frame clip). Spatial layers treat them like frames; temporal attention and temporal
convs skip them; frame-pooled GroupNorms compute the video's statistics over the video frames only and normalise
each image on its own. So a batch with images gives the video frames exactly the output of the video alone, and each
image exactly its output as a 1-frame batch without temporal layers. (The released official path mixes them.)
`encoder_hidden_states` may then be per frame, `[B, F, L, D]`, so each image is conditioned on its own caption.

Execution options (`lavie_jax.models.options.configure`; they change how, not what, the UNet computes): the compute
`dtype` and the attention kernel policy `attention_impl` of every layer (default float32 and 'auto': a kernel chosen
per call site when traced, `lavie_jax.models.attention_kernels`), and the UNet's own two:
- `sharding_rules`: the config's logical-axis rules; activations at block boundaries `[B, F, H, W, C]` are then
  constrained to `lavie_jax.parallel.ACTIVATION_VIDEO` (batch over ('fsdp', 'data'), frames over 'context') under
  the mesh of `jax.set_mesh`.
- `remat`: a rematerialisation policy by name (`REMAT_POLICIES`) applied to every down / mid / up block and
  temporal module: what the backward pass keeps instead of recomputing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lavie_jax import parallel
from lavie_jax.stages import get_stage
from lavie_jax.models.abstract import abstract_model
from lavie_jax.models.arch import UNetArch, arch_from_config, heads_up, only_cross_up
from lavie_jax.models.embeddings import TimestepEmbedding, timestep_sinusoid
from lavie_jax.models.layers import Conv, Embed, GroupNorm
from lavie_jax.models.options import REMAT_POLICIES, ExecutionOptions, configure
from lavie_jax.models.resnet import Downsample, ResnetBlock3D, TemporalModule3D, Upsample
from lavie_jax.models.transformer import Transformer3DModel


class DownBlock3D(nnx.Module):
    """Resnets (each followed by a transformer if `attention`), then an optional stride-2 downsampler.

    Returns the output and the skip tensors (one per resnet, plus the downsampled output).
    """

    def __init__(self, in_ch: int, out_ch: int, arch: UNetArch, *, attention: bool, heads: int, only_cross: bool,
                 add_downsample: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock3D(in_ch if j == 0 else out_ch, out_ch, temb_channels=arch.time_embed_dim,
                          groups=arch.norm_num_groups, eps=arch.norm_eps, rngs=rngs)
            for j in range(arch.layers_per_block)])
        self.attentions = nnx.List([
            Transformer3DModel(out_ch, heads, arch, only_cross=only_cross, rngs=rngs)
            for _ in range(arch.layers_per_block)]) if attention else None
        self.downsamplers = (nnx.List([Downsample(out_ch, padding=arch.downsample_padding, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x, temb, text, num_image_frames=0):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb, num_image_frames)
            if self.attentions is not None:
                x = self.attentions[j](x, text, num_image_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock3D(nnx.Module):
    """Resnets over `concat([x, skip])` (each followed by a transformer if `attention`), then an optional upsampler."""

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, arch: UNetArch, *, attention: bool, heads: int,
                 only_cross: bool, add_upsample: bool, rngs: nnx.Rngs):
        n = arch.layers_per_block + 1
        self.resnets = nnx.List([
            ResnetBlock3D((prev_ch if j == 0 else out_ch) + (in_ch if j == n - 1 else out_ch), out_ch,
                          temb_channels=arch.time_embed_dim, groups=arch.norm_num_groups, eps=arch.norm_eps,
                          rngs=rngs)
            for j in range(n)])
        self.attentions = nnx.List([
            Transformer3DModel(out_ch, heads, arch, only_cross=only_cross, rngs=rngs)
            for _ in range(n)]) if attention else None
        self.upsamplers = nnx.List([Upsample(out_ch, rngs=rngs)]) if add_upsample else None

    def __call__(self, x, skips, temb, text, num_image_frames=0, upsample_size=None):
        for j, resnet in enumerate(self.resnets):
            skip = skips.pop()
            x = resnet(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), temb, num_image_frames)
            if self.attentions is not None:
                x = self.attentions[j](x, text, num_image_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock3D(nnx.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, ch: int, arch: UNetArch, *, rngs: nnx.Rngs):
        kw = dict(temb_channels=arch.time_embed_dim, groups=arch.norm_num_groups, eps=arch.norm_eps,
                  output_scale_factor=arch.mid_block_scale_factor, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock3D(ch, ch, **kw), ResnetBlock3D(ch, ch, **kw)])
        self.attentions = nnx.List([Transformer3DModel(ch, arch.heads[-1], arch, only_cross=False, rngs=rngs)])

    def __call__(self, x, temb, text, num_image_frames=0):
        x = self.resnets[0](x, temb, num_image_frames)
        x = self.attentions[0](x, text, num_image_frames)
        return self.resnets[1](x, temb, num_image_frames)


class UNet3D(nnx.Module):
    """The LaVie denoiser (base, interpolation or VSR, chosen by `arch.stage` and its options). See module doc."""

    def __init__(self, arch: UNetArch, *, rngs: nnx.Rngs):
        self.arch = arch
        self.dtype = jnp.float32
        c = arch.block_out_channels
        n = arch.num_levels
        temb = arch.time_embed_dim
        kw = dict(rngs=rngs)
        self.conv_in = Conv(arch.in_channels, c[0], **kw)
        self.time_embedding = TimestepEmbedding(c[0], temb, **kw)
        self.class_embedding = (Embed(arch.num_class_embeds, temb, axes=("classes", "time_embed"), **kw)
                                if arch.num_class_embeds else None)

        def temporal_module(ch: int) -> TemporalModule3D:  # GroupNorms: VSR_TEMPORAL_NORM, not the config's
            return TemporalModule3D(ch, temb_channels=temb, kernel=arch.temporal_module_kernel, **kw)

        down, down_t = [], []
        out_ch = c[0]
        for i in range(n):
            in_ch, out_ch = out_ch, c[i]
            down.append(DownBlock3D(in_ch, out_ch, arch, attention=arch.down_has_attention[i], heads=arch.heads[i],
                                    only_cross=arch.only_cross_attention[i], add_downsample=i < n - 1, **kw))
            down_t.append(temporal_module(out_ch) if i in arch.down_temporal_idx else None)
        self.down_blocks = nnx.List(down)
        self.mid_block = MidBlock3D(c[-1], arch, **kw)
        rc = tuple(reversed(c))
        up, up_t = [], []
        out_ch = rc[0]
        for i in range(n):
            prev_ch, out_ch, in_ch = out_ch, rc[i], rc[min(i + 1, n - 1)]
            up.append(UpBlock3D(in_ch, prev_ch, out_ch, arch, attention=arch.up_has_attention[i],
                                heads=heads_up(arch)[i], only_cross=only_cross_up(arch)[i], add_upsample=i < n - 1,
                                **kw))
            up_t.append(temporal_module(out_ch) if i in arch.up_temporal_idx else None)
        self.up_blocks = nnx.List(up)
        if arch.down_temporal_idx or arch.mid_temporal or arch.up_temporal_idx:
            self.down_temporal_blocks = nnx.List(down_t)
            self.mid_temporal_block = temporal_module(c[-1]) if arch.mid_temporal else None
            self.up_temporal_blocks = nnx.List(up_t)
        else:
            self.down_temporal_blocks = self.mid_temporal_block = self.up_temporal_blocks = None
        self.conv_norm_out = GroupNorm(c[0], groups=arch.norm_num_groups, eps=arch.norm_eps)
        self.conv_out = Conv(c[0], arch.out_channels, **kw)
        self.sharding_rules: tuple = ()  # execution options (module docstring)
        self.remat = "none"

    def _block(self, module: nnx.Module, *args, **kwargs):
        """`module(*args, **kwargs)`, rematerialised by the configured policy (keyword arguments are static)."""
        if self.remat == "none":
            return module(*args, **kwargs)
        return nnx.remat(lambda m, *a: m(*a, **kwargs), policy=REMAT_POLICIES[self.remat])(module, *args)

    def _constrain(self, x: jax.Array) -> jax.Array:
        return parallel.constrain(x, parallel.ACTIVATION_VIDEO, self.sharding_rules)

    def _check_inputs(self, sample, timesteps, text, class_labels, num_image_frames) -> None:
        a = self.arch
        if sample.ndim != 5 or sample.shape[-1] != a.in_channels:
            raise ValueError(f"UNet3D ({a.stage}): sample must be [B, F, H, W, {a.in_channels}], got {sample.shape}")
        per_frame = text.ndim == 4 and text.shape[1] == sample.shape[1]
        if (text.ndim != 3 and not per_frame) or text.shape[0] != sample.shape[0] \
                or text.shape[-1] != a.cross_attention_dim:
            raise ValueError(f"UNet3D ({a.stage}): encoder_hidden_states must be [B={sample.shape[0]}, L, "
                             f"{a.cross_attention_dim}] or per frame [B, F={sample.shape[1]}, L, "
                             f"{a.cross_attention_dim}], got {text.shape}")
        if jnp.ndim(timesteps) not in (0, 1) or (jnp.ndim(timesteps) == 1 and timesteps.shape[0] not in (1, sample.shape[0])):
            raise ValueError(f"UNet3D ({a.stage}): timesteps must be a scalar or [B={sample.shape[0]}], "
                             f"got shape {jnp.shape(timesteps)}")
        if a.num_class_embeds and class_labels is None:
            raise ValueError(f"UNet3D ({a.stage}): this UNet has a class (noise-level) embedding; pass class_labels [B]")
        if not a.num_class_embeds and class_labels is not None:
            raise ValueError(f"UNet3D ({a.stage}): class_labels given but the architecture has no class embedding")
        if not 0 <= num_image_frames < sample.shape[1] and not (num_image_frames == sample.shape[1] > 0):
            raise ValueError(f"UNet3D: num_image_frames={num_image_frames} must be in [0, F={sample.shape[1]}]")

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 class_labels: jax.Array | None = None, *, num_image_frames: int = 0) -> jax.Array:
        """Predict noise (or v) `[B, F, H, W, out_channels]` float32; see the module docstring for the inputs."""
        a = self.arch
        self._check_inputs(sample, timesteps, encoder_hidden_states, class_labels, num_image_frames)
        b = sample.shape[0]
        x = (2 * sample - 1.0) if a.center_input_sample else sample
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = self.time_embedding(timestep_sinusoid(t, a.block_out_channels[0], flip_sin_to_cos=a.flip_sin_to_cos,
                                                     freq_shift=a.freq_shift).astype(self.dtype))
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(jnp.asarray(class_labels, jnp.int32).reshape(b))
        text = encoder_hidden_states.astype(self.dtype)
        nif = num_image_frames

        c = self._constrain
        x = c(self.conv_in(x))
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, res = self._block(block, x, temb, text, num_image_frames=nif)
            x, res = c(x), [c(r) for r in res]
            skips.extend(res)
            if self.down_temporal_blocks is not None and self.down_temporal_blocks[i] is not None:
                x = c(self._block(self.down_temporal_blocks[i], x, temb, num_image_frames=nif))
        x = c(self._block(self.mid_block, x, temb, text, num_image_frames=nif))
        if self.mid_temporal_block is not None:
            x = c(self._block(self.mid_temporal_block, x, temb, num_image_frames=nif))
        for i, block in enumerate(self.up_blocks):
            n_res = len(block.resnets)
            res, skips = skips[-n_res:], skips[:-n_res]
            size = tuple(skips[-1].shape[2:4]) if skips else None
            x = c(self._block(block, x, res, temb, text, num_image_frames=nif, upsample_size=size))
            if self.up_temporal_blocks is not None and self.up_temporal_blocks[i] is not None:
                x = c(self._block(self.up_temporal_blocks[i], x, temb, num_image_frames=nif))
        x = jax.nn.silu(self.conv_norm_out(x, nif))
        return c(self.conv_out(x).astype(jnp.float32))  # samplers and losses work in float32


def build_unet(config: UNetArch | Mapping[str, Any], *, stage: str | None = None, seed: int = 0,
               options: ExecutionOptions | None = None) -> UNet3D:
    """UNet3D from a `UNetArch` or a diffusers-style config dict (see `arch_from_config`), randomly initialised,
    with execution `options` applied (`lavie_jax.models.options`; default: float32, 'auto' attention)."""
    arch = config if isinstance(config, UNetArch) else arch_from_config(config, stage)
    return configure(UNet3D(arch, rngs=nnx.Rngs(seed)), options or ExecutionOptions())


def abstract_unet(config: UNetArch | Mapping[str, Any], *, stage: str | None = None,
                  options: ExecutionOptions | None = None) -> UNet3D:
    """The same module with `jax.ShapeDtypeStruct` leaves: no memory is allocated (for shapes, counts, restores,
    and initialisation straight into shardings). The traced structure is cached per architecture."""
    arch = config if isinstance(config, UNetArch) else arch_from_config(config, stage)
    model = abstract_model(("unet", arch), lambda: UNet3D(arch, rngs=nnx.Rngs(0)))
    return configure(model, options or ExecutionOptions())


def count_params(model: nnx.Module) -> int:
    """Number of learnable scalars (nnx.Param leaves) of a concrete or abstract module."""
    return sum(int(v.size) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_count(stage: str) -> int:
    """Learnable parameters of the released UNet of `stage` (a name of `lavie_jax.stages`), computed abstractly."""
    return count_params(abstract_unet(get_stage(stage).official_unet()))
