"""One sampler per stage, built from its config: prompts (and input videos) -> uint8 videos.

    sampler = StageSampler(config, pipeline)             # config: a stage config; pipeline: load_stage_pipeline
    result = sampler.sample(["a panda taking a selfie"])  # base: StageResult.frames uint8 [B, 16, 320, 512, 3]
    result = interp.sample(prompts, result.frames)         # interpolation: [B, 61, 320, 512, 3]
    result = vsr.sample(prompts, result.frames, fps=24)    # vsr: [B, 61, 1280, 2048, 3]

A request is checked completely before any model runs (by the stage: `Stage.check_request`). It is then cut into
rows (a prompt; for VSR a prompt's chunk of `chunk_frames` frames, each a fresh full run as in the official code;
for interpolation of a long video, windows of `key_window` key frames overlapping by one: `Stage.frame_windows`),
and rows into batches of
`sample.batch_size` (0: all rows of one chunk length at once) padded to a multiple of the mesh's batch devices.
Each batch is text rows (+ the stage's conditioning, `programs.condition`) -> `programs.denoise_steps` (`sample.steps_per_call` steps per compiled
call; the latents stay on the mesh, and Ctrl-C / SIGTERM land within a call) -> `programs.decode`, with its rows
split over the mesh's batch axes (`parallel.BATCH_AXES`) and the params placed by the config's sharding rules
(replicated, or FSDP-sharded). Text embeddings and conditioning are computed on the mesh and never leave it until
the frames do. The rows of prompt i draw their noise from (seed, indices[i], chunk) only (see `programs`): the same
seed gives the same videos whatever the device count, batch size or padding.

Several processes (`lavie_jax.parallel.initialize_distributed`, `lavie-sample --distributed`): every process runs
the same request on one mesh over all of them; each places only its own devices' shards of the inputs
(`parallel.to_global`), and the finished latents and frames are gathered to every process (`parallel.to_host`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lavie_jax.stages import RequestError, get_stage
from lavie_jax.io.store import Pipeline
from lavie_jax.models.options import ExecutionOptions, configure, options_of
from lavie_jax.parallel import BATCH_AXES, batch_sharding, make_mesh, place_state, to_global, to_host
from lavie_jax.sampling import programs
from lavie_jax.sampling.options import SampleOptions, sample_options
from lavie_jax.sampling.pipeline import check_pipeline
from lavie_jax.io.text import encode_prompts


@dataclasses.dataclass
class StageResult:
    """What one stage produced for a request; `frames[i]` is the video of `prompts[i]`."""

    stage: str
    prompts: list[str]  # as requested
    text_prompts: list[str]  # what the text encoder saw (suffix, underscores)
    frames: np.ndarray  # uint8 [B, F, H, W, 3]
    latents: np.ndarray  # float32 [B, F, h, w, 4], the final (scaled) latents
    fps: float
    seed: int
    options: SampleOptions


@dataclasses.dataclass(frozen=True)
class _Row:
    prompt: int
    chunk: int
    start: int  # the run's frames of the input video (`Stage.frame_windows`: VSR chunks, interpolation windows)
    stop: int
    skip: int = 0  # output frames dropped from the front of the run (they repeat the run before's)


@dataclasses.dataclass
class _Request:
    text_prompts: list[str]
    text: jax.Array  # [B, P, L, D] guidance rows in the stage's batch order, replicated on the mesh
    videos: list  # uint8 input frames (interpolation, vsr)
    rows: list[_Row]
    batches: list[list[_Row]]
    seed: int
    seed_ids: jax.Array
    indices: list[int]


class StageSampler:
    """The sampler of `config.stage` over `pipeline` on `mesh` (default: `config.mesh.shape` over all devices)."""

    def __init__(self, config: ml_collections.ConfigDict, pipeline: Pipeline, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.stage = config.stage
        self.spec = get_stage(config.stage)
        self.options = sample_options(self.spec, config.sample)
        check_pipeline(pipeline, self.stage)
        self.pipeline = pipeline
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh.shape)
        rules = tuple(tuple(r) for r in config.sharding.rules)
        self._unet = placed_state(with_options(pipeline.unet, self.spec.execution_options(self.options)),
                                  self.mesh, rules)
        self._vae = placed_state(pipeline.vae, self.mesh, rules)
        self._text_encoder = nnx.merge(*placed_state(pipeline.text_encoder, self.mesh, rules))
        self.sampler = self.options.make_sampler()
        self._rows_sharding = batch_sharding(self.mesh)
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_devices = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
        self._tables = {k: to_global(v, self._replicated) for k, v in self.sampler.tables.items()}

    @property
    def vae_factor(self) -> int:
        return self.pipeline.vae.config.downsample_factor

    # ------------------------------------------------------------------------------------------ request checks

    def check_request(self, prompts: Sequence[str], videos: Sequence[np.ndarray] | np.ndarray | None,
                      fps: float | None) -> list[np.ndarray]:
        """Raise RequestError for anything that cannot run; return the videos as uint8 arrays."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise RequestError("no prompts given: pass a non-empty list of prompt strings")
        if any(not isinstance(p, str) for p in prompts):
            raise RequestError("every prompt must be a string")
        out = [] if videos is None else [np.asarray(v) for v in videos]
        if self.spec.takes_video and len(out) != len(prompts):
            raise RequestError(f"the {self.stage} stage needs one input video per prompt: got {len(prompts)} prompts "
                               f"and {len(out)} videos")
        self.spec.check_request(self.options, out, fps, self.vae_factor)
        return out

    # ------------------------------------------------------------------------------------------ sampling

    def text_prompt(self, prompt: str) -> str:
        """What the text encoder sees: the official stages 2 and 3 read the prompt back from a file stem
        (spaces -> underscores) and interpolation appends ', 4k.'."""
        o = self.options
        return (prompt.replace(" ", "_") if o.underscore_prompts else prompt) + o.prompt_suffix

    def _rows(self, num_prompts: int, num_frames: int) -> list[_Row]:
        windows = self.spec.frame_windows(self.options, num_frames)
        return [_Row(p, c, start, stop, skip) for p in range(num_prompts)
                for c, (start, stop, skip) in enumerate(windows)]

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        by_length: dict[int, list[_Row]] = {}
        for r in rows:
            by_length.setdefault(r.stop - r.start, []).append(r)
        out = []
        for group in by_length.values():
            size = self.options.batch_size or len(group)
            out += [group[i:i + size] for i in range(0, len(group), size)]
        return out

    def num_batches(self, num_prompts: int, num_frames: int = 0) -> int:
        return len(self._batches(self._rows(num_prompts, num_frames)))

    def output_shape(self, input_shape: Sequence[int] | None = None) -> tuple[int, int, int]:
        """(frames, height, width) of the videos made from inputs of `input_shape` ([F, H, W, ...]; None: no
        input video)."""
        return self.spec.output_shape(self.options, input_shape, self.vae_factor)

    def sample(self, prompts: Sequence[str], videos: Sequence[np.ndarray] | np.ndarray | None = None, *,
               seed: int | None = None, fps: float | None = None, indices: Sequence[int] | None = None,
               progress: bool = False) -> StageResult:
        """Sample one video per prompt (see the module docstring); `videos` are uint8 `[F, H, W, 3]` inputs of the
        interpolation / vsr stages, `fps` the input frame rate (VSR output rate when `sample.fps` is 0).

        `indices` (default 0..B-1) are the prompts' positions in a larger run: prompt i draws its noise from
        `indices[i]`, so a run split into several requests gives the videos of one request.
        """
        req = self._prepare(prompts, videos, seed, fps, indices)
        latents: dict[_Row, np.ndarray] = {}
        frames: dict[_Row, np.ndarray] = {}
        with _progress_bar(progress, len(req.batches) * (self.sampler.num_steps - self._first_step), self.stage
                           ) as bar, \
                jax.set_mesh(self.mesh):
            for k, batch in enumerate(req.batches):
                if bar is not None and len(req.batches) > 1:
                    bar.set_postfix_str(f"batch {k + 1}/{len(req.batches)}")
                lat, pix = self._run_batch(batch, req, bar)
                for j, r in enumerate(batch):
                    latents[r], frames[r] = lat[j], pix[j]
        joined = [[r for r in req.rows if r.prompt == p] for p in range(len(prompts))]
        return StageResult(self.stage, list(prompts), req.text_prompts,
                           np.stack([np.concatenate([frames[r][r.skip:] for r in rs]) for rs in joined]),
                           np.stack([np.concatenate([latents[r][r.skip:] for r in rs]) for rs in joined]),
                           self.options.fps or float(fps), req.seed, self.options)

    def denoise_inputs(self, prompts: Sequence[str], videos: Sequence[np.ndarray] | np.ndarray | None = None, *,
                       seed: int | None = None, fps: float | None = None) -> tuple[tuple, dict]:
        """(arguments, static keyword arguments) of the first `programs.denoise_steps` call of a request's first
        batch (from its initial noise, `sample.steps_per_call` steps): to compile, time (`run_loop`) or inspect
        the loop on its own (`bench.sampling_bench`)."""
        req = self._prepare(prompts, videos, seed, fps, None)
        with jax.set_mesh(self.mesh):
            return self._loop_inputs(req.batches[0], req)

    def _prepare(self, prompts, videos, seed, fps, indices) -> _Request:
        """Check the request, encode the prompts on the mesh, cut rows and batches (no UNet or VAE work yet)."""
        o = self.options
        videos = self.check_request(prompts, videos, fps)
        indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
        if len(indices) != len(prompts):
            raise RequestError(f"got {len(indices)} indices for {len(prompts)} prompts")
        seed = o.seed if seed is None else int(seed)
        if not 0 <= seed < 2 ** 32:
            raise RequestError(f"seed {seed} is outside 0..2^32-1")
        text_prompts = [self.text_prompt(p) for p in prompts]
        negatives = o.negative_prompt if o.classifier_free_guidance else None
        with jax.set_mesh(self.mesh):
            emb = encode_prompts(self._text_encoder, self.pipeline.tokenizer, text_prompts, negatives,
                                 put=lambda ids: to_global(ids, self._replicated))
            pairs = ([emb.cond] if emb.uncond is None else [emb.cond, emb.uncond] if o.cond_first
                     else [emb.uncond, emb.cond])
            text = jnp.stack(pairs, axis=1)
        rows = self._rows(len(prompts), videos[0].shape[0] if videos else self.output_shape()[0])
        seed_ids = to_global(np.array([seed, self.spec.seed_id], np.uint32), self._replicated)
        return _Request(text_prompts, text, videos, rows, self._batches(rows), seed, seed_ids, indices)

    def _put_rows(self, a) -> jax.Array:
        return to_global(a, self._rows_sharding)

    def _batch_inputs(self, batch: list[_Row], req: _Request) -> tuple[tuple, dict]:
        """(arguments, static keyword arguments) of a batch, padded to the batch devices: `(unet state, tables,
        text, seed_ids, row_ids, cond, labels, guidance)` and `graphdef, spec, stage, cond_first, latent_shape`."""
        o = self.options
        rows = batch + [batch[-1]] * (-len(batch) % self.batch_devices)  # padding rows are computed and dropped
        row_ids = self._put_rows(np.array([[req.indices[r.prompt], r.chunk] for r in rows], np.int32))
        text_rows = programs.take_rows(req.text, self._put_rows(np.array([r.prompt for r in rows], np.int32)),
                                       sharding=self._rows_sharding)
        cond = labels = None
        if req.videos:
            frames = self._put_rows(np.stack([req.videos[r.prompt][r.start:r.stop] for r in rows]))
            cond, labels = programs.condition(self._vae[1], frames, req.seed_ids, row_ids, graphdef=self._vae[0],
                                              chunk=o.decode_chunk, stage=self.spec,
                                              settings=self.spec.condition_settings(o))
        shape = self.spec.latent_shape(o, None if cond is None else cond.shape, self.vae_factor)
        args = (self._unet[1], self._tables, text_rows, req.seed_ids, row_ids, cond, labels,
                np.float32(o.guidance_scale))
        return args, dict(graphdef=self._unet[0], spec=self.sampler.spec, stage=self.spec, cond_first=o.cond_first,
                          latent_shape=tuple(shape))

    @property
    def _first_step(self) -> int:
        return self.spec.start_step(self.options)

    def _steps_per_call(self) -> int:
        """The largest divisor of the steps to run not above `sample.steps_per_call`: one compiled program."""
        n = self.sampler.num_steps - self._first_step
        return max(d for d in range(1, min(self.options.steps_per_call, n) + 1) if n % d == 0)

    def _loop_inputs(self, batch: list[_Row], req: _Request) -> tuple[tuple, dict]:
        args, kwargs = self._batch_inputs(batch, req)
        state, tables, *rest = args
        seed_ids, row_ids = rest[1], rest[2]
        shape = kwargs.pop("latent_shape")
        first = self._first_step
        if first:  # from the input, noised to step `first`'s level (Stage.start_step)
            rows = batch + [batch[-1]] * (-len(batch) % self.batch_devices)
            frames = self._put_rows(np.stack([req.videos[r.prompt][r.start:r.stop] for r in rows]))
            t = self.sampler.tables
            x = programs.input_latents(self._vae[1], frames, np.float32(t["sa"][first]), np.float32(t["sb"][first]),
                                       seed_ids, row_ids, graphdef=self._vae[0], chunk=self.options.decode_chunk,
                                       stage=self.spec, vae_factor=self.vae_factor,
                                       settings=self.spec.condition_settings(self.options))
        else:
            x = programs.initial_latents(seed_ids, row_ids, spec=kwargs["spec"], latent_shape=shape,
                                         stage=self.spec, settings=self.spec.noise_settings(self.options))
        return (state, tables, x, np.int32(first), *rest), dict(kwargs, num_steps=self._steps_per_call())

    def run_loop(self, args: tuple, kwargs: dict, bar=None) -> jax.Array:
        """Every denoising step of a batch, `kwargs['num_steps']` per compiled call from the `denoise_steps`
        arguments `args` (step 0's); returns the final latents, on the mesh. One call is kept in flight: the host
        waits for the call before the last one it dispatched, so the device never idles between calls and an
        interrupt (KeyboardInterrupt, SIGTERM handlers) takes effect within two calls."""
        state, tables, x, first, *rest = args
        per = kwargs["num_steps"]
        previous = None
        for start in range(int(first), self.sampler.num_steps, per):
            x = programs.denoise_steps(state, tables, x, np.int32(start), *rest, **kwargs)
            if previous is not None:
                previous.block_until_ready()
                if bar is not None:
                    bar.update(per)
            previous = x
        x.block_until_ready()
        if bar is not None:
            bar.update(per)
        return x

    def _run_batch(self, batch: list[_Row], req: _Request, bar=None) -> tuple[np.ndarray, np.ndarray]:
        x = self.run_loop(*self._loop_inputs(batch, req), bar=bar)
        pix = programs.decode(self._vae[1], x, graphdef=self._vae[0], chunk=self.options.decode_chunk,
                              stage=self.spec)
        return to_host(x)[:len(batch)], to_host(pix)[:len(batch)]


def with_options(model: nnx.Module, values: dict) -> nnx.Module:
    """`model` with the execution options `values` set (`lavie_jax.models.options`), on a new module object sharing
    its arrays (the pipeline's model is not touched); `model` itself when there are none."""
    current = options_of(model)
    if all(getattr(current, k) == v for k, v in values.items()):
        return model
    return configure(nnx.merge(*nnx.split(model)), ExecutionOptions(**values))


def placed_state(model: nnx.Module, mesh: jax.sharding.Mesh, rules) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of plain arrays placed on `mesh` by the logical-axis `rules`). The model is not touched, so
    one pipeline can serve samplers on different meshes; arrays already placed that way are not copied."""
    graphdef, state = nnx.split(model)
    return graphdef, place_state(state, mesh, rules)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, stage: str) -> Iterator:
    """A tqdm bar over denoising steps (advanced after each finished call of the loop), or None."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"{stage} steps", unit="step", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
