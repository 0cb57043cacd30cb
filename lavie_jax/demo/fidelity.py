"""Does a later stage keep what it was given? Fidelity to the input and background cleanliness, from pixels.

- `psnr_to_input`: an upscaled video (VSR) averaged back down to its input's size (box filter), or an interpolated
  video at its key frames' positions (0, 4, 8, ...: the frames the base made), against the input; PSNR in dB.
- `background_noise`: the root mean square (RGB, 0..255) of each frame's high-pass (the frame minus its 3x3 box
  mean) over its background pixels, i.e. those further than a margin from the foreground
  (`evaluate.foreground_mask`) and off the frame's edge. The dataset's backgrounds are flat (0), and a smooth
  upscale of a blotchy input stays near 0, so this measures the fine texture a stage invents: speckles, grain.
- `bicubic`: the plain upscale a super-resolution stage has to beat (PIL bicubic), the reference for both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lavie_jax.data.transforms import resize_frames
from lavie_jax.demo.evaluate import foreground_mask
from lavie_jax.stages.interpolation import KEY_FRAME_STRIDE

MARGIN = 1 / 16  # of the frame size: pixels this close to the foreground are its edge, not background


def bicubic(video: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 `[F, h, w, 3]` -> uint8 `[F, *size, 3]`, PIL bicubic."""
    return resize_frames(np.asarray(video), size, method="bicubic")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def downscale(video: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float64 box-filter average of `video [F, H, W, 3]` down to `size` (H, W multiples of it)."""
    f, h, w, c = video.shape
    fy, fx = h // size[0], w // size[1]
    return np.asarray(video, np.float64).reshape(f, size[0], fy, size[1], fx, c).mean(axis=(2, 4))


def psnr_to_input(output: np.ndarray, given: np.ndarray) -> float:
    """PSNR (dB) of a stage's `output [F', H', W', 3]` against its input `[F, H, W, 3]`: upscaled output averaged
    down to the input's size; interpolated output (F' = 4F - 3) at the input frames' positions."""
    output, given = np.asarray(output), np.asarray(given)
    if output.shape[0] != given.shape[0]:
        output = output[::KEY_FRAME_STRIDE]
    if output.shape[1:3] != given.shape[1:3]:
        output = downscale(output, given.shape[1:3])
    if output.shape != given.shape:
        raise ValueError(f"cannot compare a stage's output {output.shape} with its input {given.shape}")
    return psnr(output, given)


def background_noise(video: np.ndarray) -> float:
    """Mean over frames of the RMS high-pass of the background pixels of `video [F, H, W, 3]` (module docstring)."""
    video = np.asarray(video)
    x = video.astype(np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    box = sum(padded[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9
    high = x - box
    mask = foreground_mask(video)
    h, w = mask.shape[1:]
    reach = max(1, round(MARGIN * min(h, w)))
    near = mask.copy()
    for _ in range(reach):  # grow the foreground by `reach` pixels (4-neighbourhood)
        grown = near.copy()
        grown[:, 1:] |= near[:, :-1]
        grown[:, :-1] |= near[:, 1:]
        grown[:, :, 1:] |= near[:, :, :-1]
        grown[:, :, :-1] |= near[:, :, 1:]
        near = grown
    edge = np.zeros((h, w), bool)
    edge[reach:-reach, reach:-reach] = True
    values = [np.sqrt(np.mean(np.square(frame[~n & edge]))) for frame, n in zip(high, near) if (~n & edge).sum() > 8]
    return float(np.mean(values)) if values else float("nan")


def stage_fidelity(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> dict[str, float]:
    """Means over videos: {'psnr_to_input', 'background_noise'} of `outputs`, and for an upscaling stage the same of
    the bicubic upscale of `inputs` ('bicubic_psnr_to_input', 'bicubic_background_noise')."""
    out = {"psnr_to_input": float(np.mean([psnr_to_input(o, i) for o, i in zip(outputs, inputs)])),
           "background_noise": float(np.mean([background_noise(o) for o in outputs]))}
    size = tuple(np.asarray(outputs[0]).shape[1:3])
    if size != tuple(np.asarray(inputs[0]).shape[1:3]):
        upscaled = [bicubic(i, size) for i in inputs]
        out["bicubic_psnr_to_input"] = float(np.mean([psnr_to_input(u, i) for u, i in zip(upscaled, inputs)]))
        out["bicubic_background_noise"] = float(np.mean([background_noise(u) for u in upscaled]))
    return {k: round(v, 2) for k, v in out.items()}
