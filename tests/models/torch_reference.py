"""Independent PyTorch reference of LaVie's official UNet3D (base, interpolation, VSR), for parity tests.

Written from the project's LaVie architecture notes and a reading of the official `{base,interpolation,vsr}/models`,
not from lavie_jax. Layout is PyTorch's `[B, C, F, H, W]`; module attribute names reproduce the official ones, so the
released state-dict keys load with `strict=True`. Where the official code takes a diffusers block (Timesteps,
TimestepEmbedding, FeedForward) we take the same one. Things the official code hard-codes stay hard-coded here:

- GroupNorm eps: resnets and conv_norm_out use the config's `norm_eps`; Transformer3DModel.norm 1e-6; every VSR
  ResnetBlock3DCNN (`resblock_temporal`, `resblocks_3d_t`) and `resblocks_3d_s` use 32 groups and eps 1e-6 whatever
  `norm_num_groups`/`norm_eps` say (their constructors are called with the defaults). LayerNorms: eps 1e-5.
- Temporal attention (base/VSR): RoPE over the first 32 features (one shared RotaryEmbedding(32)), T5 buckets with
  32 buckets and max distance 32, `heads` rows of bias. Interpolation's is plain attention after the feed-forward.
- Downsample3D refuses padding 0 (NotImplementedError, as the official code); upsampling forwards the skip's size
  only when H or W is not a multiple of 2**num_upsamplers.

FreeNoise-LaVie (arthur-qiu/FreeNoise-LaVie, base stage only): `UNet3DReference(..., freenoise=(window, stride))`
runs its eval-branch temporal attention (each window a full attention call on its frames, residual inside, the
triangular weights, `where(count > 0, value / count, value)`, so uncovered frames come out 0 as there), and
`freenoise_noise` its noise rescheduling loop (the official shuffle is the stdlib `random.shuffle`; pass one in).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from einops import rearrange, repeat
from torch import nn

# The official ResnetBlock3D/ResnetBlock3DCNN constructor defaults; the VSR temporal resnets are built with them.
DEFAULT_GROUPS, DEFAULT_EPS = 32, 1e-6


class InflatedConv3d(nn.Conv2d):
    """A Conv2d applied to every frame of `[B, C, F, H, W]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.shape[2]
        y = super().forward(rearrange(x, "b c f h w -> (b f) c h w"))
        return rearrange(y, "(b f) c h w -> b c f h w", f=f)


class ResnetBlock3D(nn.Module):
    """GN -> SiLU -> conv1 (+temb) -> GN -> SiLU -> conv2, + (1x1-projected) input; GN pools all frames.

    `kernel=None`: 3x3 convs per frame (ResnetBlock3D); `kernel=(k,1,1)`: Conv3d conv1 and a (3,1,1) conv2
    (ResnetBlock3DCNN).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None,
                 groups: int = DEFAULT_GROUPS, groups_out: int | None = None, eps: float = DEFAULT_EPS,
                 output_scale_factor: float = 1.0, kernel: tuple[int, int, int] | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        if kernel is None:
            self.conv1 = InflatedConv3d(in_channels, out_channels, 3, padding=1)
        else:
            self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, padding=tuple((k - 1) // 2 for k in kernel))
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = (InflatedConv3d(out_channels, out_channels, 3, padding=1) if kernel is None
                      else nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0)))
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = (InflatedConv3d(in_channels, out_channels, 1) if kernel is None
                                  else nn.Conv3d(in_channels, out_channels, 1))
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


class Downsample3D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        if padding == 0:
            raise NotImplementedError("the official Downsample3D raises for padding 0")
        self.conv = InflatedConv3d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = InflatedConv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=[1.0, 2.0, 2.0], mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)


class RotaryEmbedding(nn.Module):
    """rotary_embedding_torch.RotaryEmbedding(dim): 'lang' freqs as a frozen Parameter (so `freqs` is a key)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def rotate_queries_or_keys(self, t: torch.Tensor) -> torch.Tensor:
        """Rotate `t [..., F, D]` by frame position; interleaved pairs over the first `2 * len(freqs)` features."""
        pos = torch.arange(t.shape[-2], dtype=self.freqs.dtype)
        angles = repeat(torch.einsum("i,j->ij", pos, self.freqs), "n d -> n (d r)", r=2)
        rot = angles.shape[-1]
        mid, rest = t[..., :rot], t[..., rot:]
        pairs = rearrange(mid, "... (d r) -> ... d r", r=2)
        half = rearrange(torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1), "... d r -> ... (d r)")
        return torch.cat([mid * angles.cos() + half * angles.sin(), rest], dim=-1)


class RelativePositionBias(nn.Module):
    """T5 bidirectional buckets of (key - query) -> learned bias `[heads, F, F]`."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        n = -rel
        half = self.num_buckets // 2
        ret = (n < 0).long() * half
        n = n.abs()
        max_exact = half // 2
        large = max_exact + (torch.log(n.float() / max_exact) / math.log(self.max_distance / max_exact)
                             * (half - max_exact)).long()
        large = torch.min(large, torch.full_like(large, half - 1))
        return ret + torch.where(n < max_exact, n, large)

    def forward(self, f: int) -> torch.Tensor:
        pos = torch.arange(f)
        return rearrange(self.relative_attention_bias(self.bucket(pos[None, :] - pos[:, None])), "i j h -> h i j")


class CrossAttention(nn.Module):
    """Softmax attention, `to_q/k/v` without bias, `to_out = [Linear, Dropout]`, scale dim_head^-0.5."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=self.heads) for t in (q, k, v))
        probs = (torch.bmm(q, k.transpose(1, 2)) * self.scale).softmax(-1)
        out = rearrange(torch.bmm(probs, v), "(b h) n d -> b n (h d)", h=self.heads)
        return self.to_out[1](self.to_out[0](out))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        return self._attend(self.to_q(x), self.to_k(ctx), self.to_v(ctx))


class SparseCausalAttention(CrossAttention):
    """Interpolation attn1: frame i attends to the tokens of frame 0 and frame max(i-1, 0)."""

    def forward(self, x: torch.Tensor, video_length: int) -> torch.Tensor:  # type: ignore[override]
        former = torch.arange(video_length) - 1
        former[0] = 0

        def gather(t: torch.Tensor) -> torch.Tensor:
            t = rearrange(t, "(b f) d c -> b f d c", f=video_length)
            t = torch.cat([t[:, [0] * video_length], t[:, former]], dim=2)
            return rearrange(t, "b f d c -> (b f) d c")

        return self._attend(self.to_q(x), gather(self.to_k(x)), gather(self.to_v(x)))


class TemporalAttention(CrossAttention):
    """Base/VSR attention over frames: q pre-scaled, RoPE (shared module) on q and k, + bucketed bias."""

    def __init__(self, dim: int, heads: int, dim_head: int, rotary_emb: RotaryEmbedding):
        super().__init__(dim, heads, dim_head)
        self.time_rel_pos_bias = RelativePositionBias(heads, max_distance=32)
        self.rotary_emb = rotary_emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q = self.scale * rearrange(self.to_q(x), "b f (h d) -> b h f d", h=self.heads)
        k = rearrange(self.to_k(x), "b f (h d) -> b h f d", h=self.heads)
        v = rearrange(self.to_v(x), "b f (h d) -> b h f d", h=self.heads)
        q, k = self.rotary_emb.rotate_queries_or_keys(q), self.rotary_emb.rotate_queries_or_keys(k)
        logits = torch.einsum("...hid,...hjd->...hij", q, k) + self.time_rel_pos_bias(x.shape[1])
        probs = (logits - logits.amax(-1, keepdim=True).detach()).softmax(-1)
        out = rearrange(torch.einsum("...hij,...hjd->...hid", probs, v), "b h f d -> b f (h d)")
        return self.to_out[1](self.to_out[0](out))


class BasicTransformerBlock(nn.Module):
    """Tokens `[(B F), HW, C]`. attn1 -> attn2 -> temporal -> ff (base, VSR) or attn1 -> attn2 -> ff -> temporal
    (interpolation, whose attn1 is sparse-causal and whose temporal attention is plain)."""

    def __init__(self, dim: int, heads: int, cross_dim: int, *, stage: str, only_cross: bool,
                 rotary_emb: RotaryEmbedding):
        super().__init__()
        dim_head = dim // heads
        self.stage, self.only_cross = stage, only_cross
        if stage == "interpolation":
            if only_cross:  # the official block calls SparseCausalAttention without video_length and crashes
                raise NotImplementedError("official interpolation blocks cannot run only_cross_attention")
            self.attn1 = SparseCausalAttention(dim, heads, dim_head)
        else:  # base builds attn1 with the model width even when only-cross; VSR gives it the text width
            self.attn1 = CrossAttention(dim, heads, dim_head, cross_dim if only_cross and stage == "vsr" else None)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, cross_dim)
        self.norm2 = nn.LayerNorm(dim)
        temporal = (CrossAttention(dim, heads, dim_head) if stage == "interpolation"
                    else TemporalAttention(dim, heads, dim_head, rotary_emb))
        name = "temporal" if stage == "vsr" else "temp"  # VSR: attn_temporal/norm_temporal; else attn_temp/norm_temp
        self.temporal_names = (f"attn_{name}", f"norm_{name}")
        setattr(self, self.temporal_names[0], temporal)
        setattr(self, self.temporal_names[1], nn.LayerNorm(dim))
        self.ff = FeedForward(dim, dropout=0.0, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    freenoise: tuple[int, int] | None = None  # (window, stride): FreeNoise-LaVie's windowed temporal attention

    def _temporal(self, x: torch.Tensor, f: int) -> torch.Tensor:
        attn, norm = (getattr(self, n) for n in self.temporal_names)
        d = x.shape[1]
        t = rearrange(x, "(b f) d c -> (b d) f c", f=f)
        if self.freenoise is None:
            t = attn(norm(t)) + t
        else:
            window, stride = self.freenoise
            n = norm(t)
            value, count = torch.zeros_like(t), torch.zeros_like(t)
            weights = torch.tensor([min(p + 1, window - p) for p in range(window)], dtype=t.dtype)[None, :, None]
            for s in range(0, (f - window) // stride * stride + 1, stride):
                e = s + window
                if e > f:
                    break
                value[:, s:e] += (attn(n[:, s:e]) + t[:, s:e]) * weights
                count[:, s:e] += weights
            t = torch.where(count > 0, value / count, value)
        return rearrange(t, "(b d) f c -> (b f) d c", d=d)

    def forward(self, x: torch.Tensor, text: torch.Tensor, video_length: int) -> torch.Tensor:
        h = self.norm1(x)
        if self.only_cross:
            x = self.attn1(h, text) + x
        elif self.stage == "interpolation":
            x = self.attn1(h, video_length) + x
        else:
            x = self.attn1(h) + x
        x = self.attn2(self.norm2(x), text) + x
        if self.stage != "interpolation":
            x = self._temporal(x, video_length)
        x = self.ff(self.norm3(x)) + x
        if self.stage == "interpolation":
            x = self._temporal(x, video_length)
        return x


class Transformer3DModel(nn.Module):
    """`[B, C, F, H, W]`: (VSR: resblock_temporal on the 5-D tensor first), per-frame GN, proj_in, block, proj_out,
    + residual."""

    def __init__(self, channels: int, heads: int, cross_dim: int, *, groups: int, linear_projection: bool,
                 only_cross: bool, stage: str, rotary_emb: RotaryEmbedding):
        super().__init__()
        if stage == "vsr":  # built with the constructor defaults: 32 groups, eps 1e-6, whatever the UNet config says
            self.resblock_temporal = ResnetBlock3D(channels, temb_channels=None, kernel=(3, 1, 1))
        self.stage, self.linear_projection = stage, linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels) if linear_projection else nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(
            channels, heads, cross_dim, stage=stage, only_cross=only_cross, rotary_emb=rotary_emb)])
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        f = x.shape[2]
        if self.stage == "vsr":
            x = self.resblock_temporal(x)
        x = rearrange(x, "b c f h w -> (b f) c h w")
        text = repeat(text, "b n c -> (b f) n c", f=f)
        bf, c, h, w = x.shape
        residual = x
        t = self.norm(x)
        if self.linear_projection:
            t = self.proj_in(t.permute(0, 2, 3, 1).reshape(bf, h * w, c))
        else:
            t = self.proj_in(t).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        for block in self.transformer_blocks:
            t = block(t, text, f)
        if self.linear_projection:
            t = self.proj_out(t).reshape(bf, h, w, c).permute(0, 3, 1, 2)
        else:
            t = self.proj_out(t.reshape(bf, h, w, c).permute(0, 3, 1, 2))
        return rearrange(t + residual, "(b f) c h w -> b c f h w", f=f)


class TemporalModule3D(nn.Module):
    """VSR, attention types ['', '']: x + shift_conv(resblocks_3d_s(resblocks_3d_t(x, temb), temb))."""

    def __init__(self, channels: int, temb_channels: int):
        super().__init__()
        self.resblocks_3d_t = ResnetBlock3D(channels, channels, temb_channels=temb_channels, kernel=(5, 1, 1))
        self.resblocks_3d_s = ResnetBlock3D(channels, channels, temb_channels=temb_channels, groups=32, groups_out=32)
        self.shift_conv = InflatedConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return x + self.shift_conv(self.resblocks_3d_s(self.resblocks_3d_t(x, temb), temb))


class EmptyTemporalModule3D(nn.Module):
    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return x


class UNetBlock(nn.Module):
    """Down (`prev_channels=None`) or up block: resnets, optional transformers after each, optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, prev_ch: int | None, *, num_layers: int, resample: bool,
                 transformer, resnet_kw: dict[str, Any], downsample_padding: int = 1):
        super().__init__()
        up = prev_ch is not None
        ins = ([(prev_ch if i == 0 else out_ch) + (in_ch if i == num_layers - 1 else out_ch) for i in range(num_layers)]
               if up else [in_ch if i == 0 else out_ch for i in range(num_layers)])
        self.resnets = nn.ModuleList([ResnetBlock3D(c, out_ch, **resnet_kw) for c in ins])
        self.attentions = nn.ModuleList([transformer(out_ch) for _ in ins]) if transformer else None
        if up:
            self.upsamplers = nn.ModuleList([Upsample3D(out_ch)]) if resample else None
        else:
            self.downsamplers = nn.ModuleList([Downsample3D(out_ch, downsample_padding)]) if resample else None

    def down(self, x: torch.Tensor, temb: torch.Tensor, text: torch.Tensor):
        states = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            x = self.attentions[i](x, text) if self.attentions is not None else x
            states += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states += (x,)
        return x, states

    def up(self, x: torch.Tensor, skips: tuple, temb: torch.Tensor, text: torch.Tensor, size=None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1]], dim=1), temb)
            skips = skips[:-1]
            x = self.attentions[i](x, text) if self.attentions is not None else x
        return self.upsamplers[0](x, size) if self.upsamplers is not None else x


class UNetMidBlock3DCrossAttn(nn.Module):
    def __init__(self, ch: int, transformer, resnet_kw: dict[str, Any]):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(ch, ch, **resnet_kw) for _ in range(2)])
        self.attentions = nn.ModuleList([transformer(ch)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, temb), text), temb)


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


class UNet3DReference(nn.Module):
    """The official UNet3DConditionModel (base: stage 'base'; interpolation: its `use_first_frame=True` variant)
    or UNet3DVSRModel ('vsr'), from a diffusers-style UNet config dict (2D or 3D block names).

    forward(sample [B, Cin, F, H, W], timestep [B] | scalar, encoder_hidden_states [B, L, D], class_labels [B],
    low_res [B, 3, F, H, W] (VSR, concatenated after `sample` as the official forward does)) -> [B, Cout, F, H, W].
    VSR temporal modules sit at `down_temporal_idx`/`mid_temporal`/`up_temporal_idx` (default: everywhere, as
    LaVie's released config).
    """

    def __init__(self, config: Mapping[str, Any], stage: str):
        super().__init__()
        if stage not in ("base", "interpolation", "vsr"):
            raise ValueError(stage)
        g = lambda k, d=None: config.get(k, d)  # noqa: E731
        self.stage, self.center = stage, bool(g("center_input_sample", False))
        ch = list(config["block_out_channels"])
        n, temb = len(ch), 4 * ch[0]
        heads = _per_block(g("attention_head_dim", 8), n)
        only_cross = _per_block(g("only_cross_attention", False), n)
        resnet_kw = dict(temb_channels=temb, groups=g("norm_num_groups", 32), eps=g("norm_eps", 1e-5))
        self.conv_in = InflatedConv3d(config["in_channels"], ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], g("flip_sin_to_cos", True), g("freq_shift", 0))
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        ncls = g("num_class_embeds")
        self.class_embedding = nn.Embedding(ncls, temb) if ncls is not None else None
        rotary = RotaryEmbedding(32)
        if stage == "vsr":  # registered at the top level too: `temporal_rotary_emb.freqs`
            self.temporal_rotary_emb = rotary

        def transformer(h: int, oc: bool):
            return lambda c: Transformer3DModel(c, h, config["cross_attention_dim"], groups=resnet_kw["groups"],
                                                linear_projection=bool(g("use_linear_projection", False)),
                                                only_cross=oc, stage=stage, rotary_emb=rotary)

        def temporal(i: int, where: str, c: int) -> nn.Module:
            idx = g(f"{where}_temporal_idx", tuple(range(n)))
            return TemporalModule3D(c, temb) if stage == "vsr" and i in idx else EmptyTemporalModule3D()

        self.down_blocks, down_t = nn.ModuleList(), []
        for i, kind in enumerate(config["down_block_types"]):
            attn = transformer(heads[i], only_cross[i]) if kind.startswith("CrossAttn") else None
            self.down_blocks.append(UNetBlock(ch[max(i - 1, 0)], ch[i], None, num_layers=g("layers_per_block", 2),
                                              resample=i < n - 1, transformer=attn, resnet_kw=resnet_kw,
                                              downsample_padding=g("downsample_padding", 1)))
            down_t.append(temporal(i, "down", ch[i]))
        self.mid_block = UNetMidBlock3DCrossAttn(ch[-1], transformer(heads[-1], False),
                                                 dict(resnet_kw, output_scale_factor=g("mid_block_scale_factor", 1)))
        rch, rheads, rcross = ch[::-1], heads[::-1], only_cross[::-1]
        self.up_blocks, up_t = nn.ModuleList(), []
        for i, kind in enumerate(config["up_block_types"]):
            attn = transformer(rheads[i], rcross[i]) if kind.startswith("CrossAttn") else None
            self.up_blocks.append(UNetBlock(rch[min(i + 1, n - 1)], rch[i], rch[max(i - 1, 0)],
                                            num_layers=g("layers_per_block", 2) + 1, resample=i < n - 1,
                                            transformer=attn, resnet_kw=resnet_kw))
            up_t.append(temporal(i, "up", rch[i]))
        if stage == "vsr":
            self.down_temporal_blocks, self.up_temporal_blocks = nn.ModuleList(down_t), nn.ModuleList(up_t)
            self.mid_temporal_block = (TemporalModule3D(ch[-1], temb) if g("mid_temporal", True)
                                       else EmptyTemporalModule3D())
        self.num_upsamplers = n - 1
        self.conv_norm_out = nn.GroupNorm(resnet_kw["groups"], ch[0], eps=resnet_kw["eps"])
        self.conv_out = InflatedConv3d(ch[0], config["out_channels"], 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                class_labels: torch.Tensor | None = None, low_res: torch.Tensor | None = None) -> torch.Tensor:
        vsr, text = self.stage == "vsr", encoder_hidden_states
        if low_res is not None:
            sample = torch.cat([sample, low_res], dim=1)
        forward_size = any(s % 2 ** self.num_upsamplers for s in sample.shape[-2:])
        if self.center:
            sample = 2 * sample - 1.0
        t = torch.as_tensor(timestep)
        t = (t[None] if t.ndim == 0 else t).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels)
        x = self.conv_in(sample)
        skips = (x,)
        for i, block in enumerate(self.down_blocks):
            x, states = block.down(x, emb, text)
            skips += states
            x = self.down_temporal_blocks[i](x, emb) if vsr else x
        x = self.mid_block(x, emb, text)
        x = self.mid_temporal_block(x, emb) if vsr else x
        size = None
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            if i < len(self.up_blocks) - 1 and forward_size:
                size = skips[-1].shape[2:]  # (F, H, W) of the next skip
            x = block.up(x, res, emb, text, size)
            x = self.up_temporal_blocks[i](x, emb) if vsr else x
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def set_freenoise_(model: nn.Module, window: tuple[int, int] | None) -> nn.Module:
    """Turn FreeNoise's windowed temporal attention on (`(window, stride)`) or off (None) in every block."""
    for module in model.modules():
        if isinstance(module, BasicTransformerBlock):
            module.freenoise = window
    return model


def freenoise_noise(latents: torch.Tensor, window: int, stride: int, shuffle) -> torch.Tensor:
    """FreeNoise-LaVie's `prepare_latents` loop on `[B, C, L, H, W]`: for f = window, window + stride, ... < L, the
    `stride` frames at f - window (a list of indices, shuffled in place by `shuffle`) are copied to f .. f + stride,
    in order, so later groups copy already-copied frames."""
    latents = latents.clone()
    for f in range(window, latents.shape[2], stride):
        index = list(range(f - window, f - window + stride))
        shuffle(index)
        latents[:, :, f:f + stride] = latents[:, :, index]
    return latents


def randomize_(model: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Random weights that keep activations O(1) and make every branch count (no zero-initialised projection).

    Linear/conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2); norm scales ~ 1 + N(0, 0.2^2), shifts ~ N(0, 0.2^2);
    embeddings ~ N(0, 0.5^2); rotary `freqs` keep their values. Returns the state dict as float32 numpy arrays.
    """
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda p, s: s * torch.randn(p.shape, generator=gen)  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                module.weight.copy_(rnd(module.weight, module.weight[0].numel() ** -0.5))
                if module.bias is not None:
                    module.bias.copy_(rnd(module.bias, 0.1))
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                module.weight.copy_(1 + rnd(module.weight, 0.2))
                module.bias.copy_(rnd(module.bias, 0.2))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(rnd(module.weight, 0.5))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
