"""An independent PyTorch I3D with the parameter names of piergiaj's `pytorch_i3d.InceptionI3d` (written for these
tests from the architecture: channels-first, TF SAME padding by explicit `F.pad`, zero-padded max-pools), used as the
reference for the pytorch_i3d / TorchScript loaders and the whole preprocessing + feature path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = {"Mixed_3b": (192, (64, 96, 128, 16, 32, 32)), "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
          "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)), "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
          "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)), "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
          "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)), "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
          "Mixed_5c": (832, (384, 192, 384, 48, 128, 128))}


def pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    (t0, t1), (h0, h1), (w0, w1) = pads
    return F.pad(x, (w0, w1, h0, h1, t0, t1))


class Unit(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int = 1, eps: float = 1e-3, logits: bool = False):
        super().__init__()
        self.k, self.s, self.logits = (k,) * 3, (s,) * 3, logits
        self.conv3d = nn.Conv3d(cin, cout, k, s, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(cout, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(pad_same(x, self.k, self.s))
        return x if self.logits else F.relu(self.bn(x))


class Block(nn.Module):
    def __init__(self, cin: int, w: tuple[int, ...], eps: float):
        super().__init__()
        self.b0 = Unit(cin, w[0], 1, eps=eps)
        self.b1a, self.b1b = Unit(cin, w[1], 1, eps=eps), Unit(w[1], w[2], 3, eps=eps)
        self.b2a, self.b2b = Unit(cin, w[3], 1, eps=eps), Unit(w[3], w[4], 3, eps=eps)
        self.b3b = Unit(cin, w[5], 1, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool3d(pad_same(x, (3, 3, 3), (1, 1, 1)), 3, 1)
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], 1)


def max_pool(x: torch.Tensor, k: tuple[int, int, int], s: tuple[int, int, int]) -> torch.Tensor:
    return F.max_pool3d(pad_same(x, k, s), k, s)


class TorchI3D(nn.Module):
    """`[B, 3, T, H, W]` in [-1, 1] -> `[B, 400]` logits averaged over time."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit(3, 64, 7, 2, eps)
        self.Conv3d_2b_1x1 = Unit(64, 64, 1, eps=eps)
        self.Conv3d_2c_3x3 = Unit(64, 192, 3, eps=eps)
        for name, (cin, w) in WIDTHS.items():
            setattr(self, name, Block(cin, w, eps))
        self.logits = Unit(1024, 400, 1, logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = max_pool(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))
        x = max_pool(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)), (1, 3, 3), (1, 2, 2))
        x = max_pool(self.Mixed_3c(self.Mixed_3b(x)), (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, (2, min(7, x.shape[3]), min(7, x.shape[4])), 1)
        return self.logits(x).mean(dim=(2, 3, 4))


def random_torch_i3d(seed: int = 0, eps: float = 1e-3) -> TorchI3D:
    """Random weights with non-trivial BatchNorm statistics and scales, in eval mode."""
    torch.manual_seed(seed)
    model = TorchI3D(eps).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model
