"""The cascade: base -> interpolation -> VSR, any contiguous run of it, frames passed in memory.

    cascade = Cascade([base_sampler, interp_sampler, vsr_sampler])   # or e.g. [interp_sampler, vsr_sampler]
    results = cascade.run(["a corgi walking in the park at sunrise, oil painting style"], output_dir="res")

Each stage gets the previous stage's uint8 frames and frame rate (what the official code would read back from its
mp4 files, minus the compression) and the same prompts; the stage's own options add the official prompt changes
(underscores, ', 4k.'). With `output_dir`, each stage writes its videos and sidecars into `output_dir/STAGE/`, as
the official `res/base`, `res/interpolation`, `res/vsr`. The whole chain is checked before the first stage runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lavie_jax.sampling.outputs import check_no_overwrite, check_output_dir, unique_stems, write_result
from lavie_jax.sampling.sampler import StageResult, StageSampler
from lavie_jax.stages import STAGES, RequestError


class Cascade:
    """Stage samplers run in order; they must be consecutive stages of the cascade (by `Stage.rank`: base,
    interpolation, vsr), each after the first refining a video."""

    def __init__(self, samplers: Sequence[StageSampler]):
        self.samplers = list(samplers)
        if not self.samplers:
            raise ValueError("a cascade needs at least one stage sampler")
        order = [s.spec.rank for s in self.samplers]
        if order != list(range(order[0], order[0] + len(order))) or not all(s.spec.takes_video
                                                                             for s in self.samplers[1:]):
            raise ValueError(f"cascade stages {[s.stage for s in self.samplers]} must be a contiguous run of "
                             f"{list(STAGES)} in that order")

    @property
    def stages(self) -> list[str]:
        return [s.stage for s in self.samplers]

    def check(self, prompts: Sequence[str], videos: Sequence[np.ndarray] | None = None,
              fps: float | None = None) -> None:
        """Check every stage's request with the shapes the previous stages will produce (RequestError)."""
        first = self.samplers[0]
        videos = first.check_request(prompts, videos, fps)
        shape = first.output_shape(videos[0].shape if videos else None)
        rate = first.options.fps or fps
        for sampler in self.samplers[1:]:
            stand_in = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (*shape, 3))  # no memory
            try:
                sampler.check_request(prompts, [stand_in] * len(prompts), rate)
            except RequestError as e:
                raise RequestError(f"after the {self.stages[self.stages.index(sampler.stage) - 1]} stage's "
                                   f"{shape[0]}x{shape[1]}x{shape[2]} videos: {e}") from e
            shape = sampler.output_shape((*shape, 3))
            rate = sampler.options.fps or rate

    def run(self, prompts: Sequence[str], videos: Sequence[np.ndarray] | None = None, *, seed: int | None = None,
            fps: float | None = None, indices: Sequence[int] | None = None,
            output_dir: str | os.PathLike | None = None, sources: Sequence[str | None] | None = None,
            stems: Sequence[str] | None = None, overwrite: bool = False, progress: bool = False,
            sidecar: Callable[[StageResult], dict[str, Any]] | None = None) -> list[StageResult]:
        """Run every stage; returns each stage's StageResult. `seed` None uses each stage's `sample.seed`;
        `videos`/`fps` are the first stage's inputs (interpolation or vsr first), `sources` their file names;
        `stems`/`overwrite` as in `write_result` (existing files are refused before the first stage runs);
        `sidecar(result)`: more sidecar fields for a stage's result (a story's seams)."""
        self.check(prompts, videos, fps)
        stems = list(stems) if stems is not None else unique_stems(prompts)
        if output_dir is not None:
            for sampler in self.samplers:
                directory = check_output_dir(Path(output_dir) / sampler.stage)
                check_no_overwrite(directory, stems, sampler.options.formats, overwrite)
        results = []
        for sampler in self.samplers:
            result = sampler.sample(prompts, videos, seed=seed, fps=fps, indices=indices, progress=progress)
            written = []
            if output_dir is not None:
                written = write_result(result, Path(output_dir) / sampler.stage, config=sampler.config,
                                       indices=indices, sources=sources, stems=stems, overwrite=overwrite,
                                       extra=sidecar(result) if sidecar else None)
            results.append(result)
            videos, fps = list(result.frames), result.fps
            sources = [str(p.with_suffix("." + result.options.formats[0])) for p in written] or None
        return results
