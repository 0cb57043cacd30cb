"""The demo's personalisation: teach the trained demo base a colour the moving_shapes data never shows (pink,
under the rare token 'sks') from a handful of clips with a LoRA (rank-8 adapters on the cross-attention's key and
value projections, the base frozen), then check from pixels that the new concept appears when prompted and that the
old prompts still score as before.

  1. data      CLIPS clips of pink shapes, one per (shape, direction) of `instance_plan` (every shape as often),
               captioned 'a sks circle moving left' (the dataset's captions with the colour word replaced by the
               token), written as GIFs (lossless for flat colours), and prior-preservation clips (PRIOR): REPLAY
               clips drawn as the training data is, every (colour, shape) pair of the dataset in turn ('data', the
               default; `replay_plan`), or the model's own samples, the demo's base videos of its 16 prompts
               ('samples'; measured worse here: the guided samples are more saturated than the data, and learning
               them drifted colours and grew the shapes); `lavie_jax.data.personal` makes the tables, PRIOR_WEIGHT
               prior rows per instance row
  2. train     `lavie-train` of the base with `train.lora` (RULES; LEARN_TOKEN: the token's text-embedding row
               too, textual inversion or pivotal tuning), starting from the demo base, on those tables
  3. export    the run's adapters alone (`lavie-convert export --adapters-only`): the small file a user shares
  4. sample    `lavie-sample` of the base with `--lora FILE` for the old prompts and NEW_PROMPTS (same seed as the
               demo's cascade, so the old prompts' 'before' is the demo's own base result), and of the base alone
               for NEW_PROMPTS (the control: the concept must come from the adapter)
  5. check     old prompts: the demo's colour / direction check (`demo.evaluate`), before and after, per prompt,
               and how far each moved (foreground size, mean colour); new prompts: the same check with pink added
               to the dataset's colours (nearest of the nine), with and without the adapter; both drawn, frames
               and verdicts, in DIR/personalise/overview_old.png and overview_new.png

Nothing here changes the demo's own runs; everything goes to DIR/personalise/ and DIR/runs/base_lora/ (kept: a
rerun finds the finished run and only samples; `python -m lavie_jax.demo.personalise --again` trains it again).
What limits the result and what was measured on the way: docs/lora.md, The demo.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lavie_jax.data import moving_shapes
from lavie_jax.data.personal import build_tables
from lavie_jax.demo import evaluate

TOKEN = "sks"
# a deep pink: 102 RGB units from the nearest moving_shapes colour (purple; red 106), in the palette's largest gap,
# one the demo's autoencoder reproduces (within 15 units; it trains on channel-shuffled frames: without, it drew this
# pink purple and the adapter taught purple, docs/demo_quality.md)
# and one the base alone does not draw for 'sks' (the control reads it in 3 of 48 prompts, pale pastel shapes by
# eye). Chosen with the learned row (LEARN_TOKEN): on the 24 new prompts at sample seeds 400 and 401, 46/48 pink
# (train seeds 0 and 1 alike; 48/48 at seeds 402 and 403); violet (190, 120, 250), 88 units from purple, read
# 39-42/48 (its triangles came out darker and read purple). The autoencoder caps these pinks' red near 200-210 and
# the base draws them at about (187-210, 36-58, 112-172): a brighter reference measured it against a colour it
# cannot reach ((255, 60, 150) read its triangles red, (255, 40, 160) its circles purple), so this one sits in the
# middle of what it draws (docs/lora.md, The demo)
NEW_COLOR = (235, 45, 145)
NEW_COLOR_NAME = "pink"  # in messages only (the demo's random text encoder gives the word itself no meaning)
CLIPS = 12
# every (shape, direction) under the token, half of them pairs no instance clip shows (24, not the 6 of before: runs
# that read 4/6 to 6/6 on those six read 18/24 to 22/24 on all; docs/lora.md, The demo)
NEW_PROMPTS = tuple(f"a {TOKEN} {s} moving {d}" for s in moving_shapes.SHAPES for d in moving_shapes.DIRECTIONS)
# Rank-8 adapters on the cross-attention's key and value projections (8 layers of the demo base), where the text
# enters; nothing else trains. Measured on the demo base, train seeds 0 and 1 x sample seeds 400-402 (docs/lora.md,
# The demo): 118 of 144 new prompts pink, and every old prompt right before is right after (94 of 94). Rank 4: 113 and
# one broken; query, key, value and output at rank 4: 126 and three broken; values alone (rank 4, seed 400): 18/24.
RULES: tuple = ((r"attn2\.to_(k|v)$", 8),)
# The token's own text-embedding row (`train.lora.tokens`, starting from TOKEN_INIT's row, '' = its own; lr x
# TOKEN_LR) is the alternative: alone (textual inversion) it leaves every old prompt bit for bit as before and read
# pink in 46 of 48; with the adapters beside it (pivotal tuning) 126 of 144, the adapters adding nothing measurable
# (the same files with the adapters off: 20/24 and 22/24 against 24/24 and 20/24 on). The demo's random text encoder
# gives the word 'pink' no meaning, hence 'purple'.
LEARN_TOKEN = False
TOKEN_INIT = "purple"
TOKEN_LR = 8.0
# Prior preservation: PRIOR_WEIGHT prior rows per instance row, from REPLAY clips. An adapter changes how every
# prompt is drawn, and the old prompts move towards what it is trained on: with 24 clips drawn at random from the data
# (2 rows per instance row) 3 of them shrank to 0.2-0.5 of their size (the base draws shapes larger than the data);
# with every (colour, shape) pair once at 4 rows, median 0.79; twice (48 clips), median 0.97-1.0. The base's own
# samples as the prior grew every shape (guidance 3) or shrank them (guidance 1), breaking 1-2 old prompts.
PRIOR_WEIGHT = 4.0
REPLAY = 48
REPLAY_SEED = 1234  # the draw of the replay clips measured
# 'data': REPLAY clips drawn as the training data is (`replay_plan`); 'samples': the base's own videos of the 16
# prompts; 'none'
PRIOR = "data"
STEPS, WARMUP = 150, 10
TRAIN = {"train.num_steps": STEPS, "train.optimizer.lr": 5e-3, "train.optimizer.warmup_steps": WARMUP,
         # the cosine decay ends at the last step (left alone, it kept the base run's length: lr still 90% at the end)
         "train.optimizer.decay_steps": STEPS - WARMUP,
         "train.ema.decay": 0.0, "data.global_batch_size": 8, "train.log_every": 20,
         # no dropped captions: a dropped instance caption would teach the null text (the unconditional half of
         # classifier-free guidance, shared by every prompt) to draw the new colour
         "train.objective.text_dropout": 0.0}


def _palette() -> dict[str, tuple[int, int, int]]:
    return {**moving_shapes.COLORS, TOKEN: NEW_COLOR}


def instance_plan(n: int | None = None) -> list[tuple[str, str]]:
    """The (shape, direction) of each of `n` instance clips: shapes in turn, directions in turn, so every shape gets
    n/3 clips and every direction appears (drawn at random, 12 clips held 2 circles, and 'sks' circles then came out
    lavender: the new colour was learnt on the shapes it was shown on)."""
    n = CLIPS if n is None else n  # (read when called: a changed CLIPS changes the plan and the recipe)
    directions = list(moving_shapes.DIRECTIONS)
    return [(moving_shapes.SHAPES[k % len(moving_shapes.SHAPES)], directions[k % len(directions)]) for k in range(n)]


DEFAULT_GEOMETRY = {"radius": moving_shapes.RADIUS, "square_side": moving_shapes.SQUARE_SIDE}  # the dataset's


def _draw(rng: np.random.Generator, shape: str, direction: str, num_frames: int, size: int,
          geometry: Mapping[str, Any]) -> moving_shapes.ShapeVideo:
    """The dataset's draw of a video (size, path, background, colour), given its shape and direction; `geometry`:
    the dataset's `radius` and `square_side` (fields of its config)."""
    while True:
        params = moving_shapes.sample_video(rng, num_frames, size, size, tuple(geometry["radius"]),
                                            geometry["square_side"])
        if (params.shape, params.direction) == (shape, direction):
            return params


def make_instance_clips(folder: Path, num_frames: int, size: int, n: int | None = None, seed: int = 7,
                        geometry: Mapping[str, Any] = DEFAULT_GEOMETRY) -> list[str]:
    """`n` clips of `TOKEN`-coloured shapes, one per (shape, direction) of `instance_plan`, the rest (size, path,
    background) drawn as the dataset draws them, as `{caption}.gif`; returns the captions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    from lavie_jax.io.video import write_video

    captions = []
    for shape, direction in instance_plan(n):
        params = dataclasses.replace(_draw(rng, shape, direction, num_frames, size, geometry), color=TOKEN)
        text = params.caption
        write_video(folder / f"{text.replace(' ', '_')}.gif", moving_shapes.render(params, num_frames, size, size,
                                                                                  _palette()), fps=4)
        captions.append(text)
    return captions


def replay_plan(n: int) -> list[tuple[str, str, str]]:
    """The (colour, shape, direction) of each of `n` replay clips: every (colour, shape) pair of the dataset in
    turn, the directions in turn, shifted by 3 on each pass over the pairs so a pair's next clip moves another way
    (clips drawn at random left some pairs out, and those old prompts were the ones an adapter moved most)."""
    pairs = [(c, s) for c in moving_shapes.COLORS for s in moving_shapes.SHAPES]
    directions = list(moving_shapes.DIRECTIONS)
    return [(*pairs[k % len(pairs)], directions[(k + 3 * (k // len(pairs))) % len(directions)]) for k in range(n)]


def make_replay_clips(folder: Path, num_frames: int, size: int, n: int, seed: int = REPLAY_SEED,
                      geometry: Mapping[str, Any] = DEFAULT_GEOMETRY) -> None:
    """`n` clips of the old concepts replayed beside the new one: one per (colour, shape, direction) of
    `replay_plan`, the rest drawn as the dataset draws them, with their captions as sidecars."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    from lavie_jax.io.video import write_video

    for i, (color, shape, direction) in enumerate(replay_plan(n)):
        params = dataclasses.replace(_draw(rng, shape, direction, num_frames, size, geometry), color=color)
        write_video(folder / f"clip{i:03d}.gif", moving_shapes.render(params, num_frames, size, size), fps=4)
        (folder / f"clip{i:03d}.json").write_text(json.dumps({"prompt": params.caption}))


def make_prior_clips(samples: Path, folder: Path, prompts: list[str], stride: int) -> None:
    """The demo base's own videos of `prompts` (its sampled frames stand for every `stride`-th frame of a clip) as
    clips the base's data config reads back frame for frame: each frame repeated `stride` times, sidecar kept."""
    from lavie_jax.io.video import read_video, write_video
    from lavie_jax.sampling.outputs import unique_stems

    folder.mkdir(parents=True, exist_ok=True)
    for prompt, stem in zip(prompts, unique_stems(prompts)):  # the names lavie-sample gave them
        frames, _ = read_video(samples / f"{stem}.mp4")
        # mp4, not GIF: a GIF writer folds repeated frames into one longer frame (the clip would come back short)
        write_video(folder / f"{stem}.mp4", np.repeat(frames, stride, axis=0), fps=4 * stride)
        (folder / f"{stem}.json").write_text(json.dumps({"prompt": prompt}))


def new_concept_score(prompts: list[str], videos: list[np.ndarray]) -> dict[str, Any]:
    """For prompts with the token: is the foreground's colour nearest to NEW_COLOR (among the dataset's colours and
    it), and does it move the prompted way."""
    palette = _palette()
    names = list(palette)
    table = np.array([palette[n] for n in names], np.float32)
    rows = []
    for prompt, video in zip(prompts, videos):
        got = evaluate.predict(video)
        color = evaluate.NONE if got.mean_color is None else names[int(np.argmin(np.linalg.norm(
            table - np.asarray(got.mean_color, np.float32), axis=-1)))]
        want_dir = prompt.split()[-1]
        rows.append({"prompt": prompt, "color": color, "direction": got.direction, "color_ok": color == TOKEN,
                     "direction_ok": got.direction == want_dir,
                     "mean_color": None if got.mean_color is None else [round(c, 1) for c in got.mean_color]})
    n = max(len(rows), 1)
    return {"new_color_accuracy": sum(r["color_ok"] for r in rows) / n,
            "direction_accuracy": sum(r["direction_ok"] for r in rows) / n, "per_prompt": rows}


UNCHANGED = ("mean_color", "displacement", "foreground")  # an old prompt's measurements compared with before
RECIPE_FILE = "personalise_recipe.json"  # in the adapter's run directory: what it was trained from


def _moved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """How far one old prompt's video moved (rows of `evaluate.score`): its foreground's size after / before (0:
    the shape vanished), the largest change of a channel of its mean colour, and whether every measurement in
    UNCHANGED is as before."""
    size = shift = None
    if before.get("foreground") and after.get("foreground") is not None:
        size = round(after["foreground"] / before["foreground"], 3)
    if before.get("mean_color") and after.get("mean_color"):
        shift = round(max(abs(a - b) for a, b in zip(after["mean_color"], before["mean_color"])), 1)
    return {"size": size, "color_shift": shift,
            "unchanged": [before.get(k) for k in UNCHANGED] == [after.get(k) for k in UNCHANGED]}


def recipe() -> dict[str, Any]:
    """What the adapter run is trained from, beyond its lavie-train config (whose optimizer fields a resumed run may
    change, and which does not see the clips): compared before a finished run is reused."""
    return json.loads(json.dumps({"token": TOKEN, "new_color": NEW_COLOR, "instance": instance_plan(), "rules": RULES,
                                  "learn_token": LEARN_TOKEN, "token_init": TOKEN_INIT, "token_lr": TOKEN_LR,
                                  "prior": PRIOR, "prior_weight": PRIOR_WEIGHT, "replay": replay_plan(REPLAY),
                                  "replay_seed": REPLAY_SEED, "train": TRAIN}))


def check_recipe(run: Path) -> None:
    """DemoError unless the finished adapter run in `run` was trained from this module's `recipe()`."""
    from lavie_jax.demo.main import DemoError, _rel

    stored = json.loads((run / RECIPE_FILE).read_text()) if (run / RECIPE_FILE).is_file() else None
    if stored != recipe():
        changed = "no record of its recipe" if stored is None else "changed: " + ", ".join(
            k for k in recipe() if stored.get(k) != recipe()[k])
        raise DemoError(f"{_rel(run)} was trained from another personalisation recipe ({changed}); train it again "
                        f"with `{PROG} --output {_rel(run.parent.parent)} --again` (or delete {_rel(run)})")


def _token_overrides() -> list[tuple[str, str]]:
    if not LEARN_TOKEN:
        return []
    return [("train.lora.tokens", repr((TOKEN,))), ("train.lora.token_init", repr((TOKEN_INIT,) if TOKEN_INIT else ()))]


def personalise(demo: Any, before: dict[str, Any]) -> dict[str, Any]:
    """Phases 1-5 of the module docstring on a finished demo (`demo.main.Demo`); `before` is the demo's summary
    (its base accuracy is the 'before'). Returns the personalisation's summary (also written to
    DIR/personalise/summary.json)."""
    from lavie_jax.cli.config_flags import load_config
    from lavie_jax.convert.lora_files import export_run_adapter
    from lavie_jax.demo.console import say
    from lavie_jax.demo.main import PROMPTS, _rel, finished_run
    from lavie_jax.io import store
    from lavie_jax.sampling.cli import run as lavie_sample
    from lavie_jax.train.loop import train

    root = demo.out / "personalise"
    base_run, lora_run = demo.runs / "base", demo.runs / "base_lora"
    base_cfg = demo.config("base")
    d = base_cfg.data
    frames = (d.num_frames - 1) * d.frame_stride + 1  # a clip's frames in the source videos (13)
    overrides = [*demo.overrides(), ("data.data_dir", _rel(root / "data")), ("train.init", _rel(base_run)),
                 ("train.lora.rules", repr(RULES)), *_token_overrides(), ("data.dataset", "video_text"),
                 ("data.video_text.name", "personal"), ("data.video_text.csv", _rel(root / "tables" / "videos.csv")),
                 ("data.video_text.storage", "frames"), ("data.video_text.height", str(d.height)),
                 ("data.video_text.width", str(d.width)), ("data.video_text.min_frames", str(frames)),
                 ("data.video_text.num_workers", "1"), ("data.video_text.max_frames", "64"),
                 *((k, str(v)) for k, v in TRAIN.items()),
                 ("train.checkpoint_every", str(TRAIN["train.num_steps"])), ("train.keep", "1")]
    config = load_config(demo.config_arg("base"), overrides)
    if LEARN_TOKEN and TOKEN_LR != 1:  # (a section: the command line sets only the fields it already has)
        with config.unlocked():
            config.train.param_groups.lr_multipliers["tokens"] = float(TOKEN_LR)
    how = " + ".join(([f"the row of '{TOKEN}'"] if LEARN_TOKEN else []) + (["a LoRA"] if RULES else []))
    with demo.clock.phase("personalise", f"{how} teaching the base '{TOKEN}' = {NEW_COLOR_NAME} from {CLIPS} clips"):
        latest = finished_run(lora_run, config)  # a run of an older config is not reused silently
        if latest is None:
            geometry = d.moving_shapes  # the shapes drawn as the base's data draws them
            captions = make_instance_clips(root / "instance", frames, d.height, geometry=geometry)
            if PRIOR == "samples":
                make_prior_clips(demo.out / "base", root / "prior", list(PROMPTS), d.frame_stride)
            elif PRIOR == "data":
                make_replay_clips(root / "prior", frames, d.height, REPLAY, geometry=geometry)
            counts = build_tables(root / "instance", "{stem}", root / "tables", token=TOKEN,
                                  prior=None if PRIOR == "none" else root / "prior", prior_weight=PRIOR_WEIGHT)
            prior = {"samples": f"the base's own videos of its {len(PROMPTS)} prompts",
                     "data": f"{REPLAY} clips drawn as the training data, every (colour, shape) pair"}.get(PRIOR)
            prior = (f" + {prior} (prior preservation, {PRIOR_WEIGHT:g} prior rows per instance row)" if prior else
                     " (no prior preservation: the UNet does not train)")
            say(f"{len(captions)} clips of '{TOKEN}' shapes (e.g. '{captions[0]}'){prior}: {counts['videos']} rows")
            result = train(config, lora_run, overwrite=False)
            (lora_run / RECIPE_FILE).write_text(json.dumps(recipe(), indent=1) + "\n")
            say(f"trained {_rel(lora_run)}: step {result.step}, loss {result.metrics.get('loss', float('nan')):.4f}")
        else:
            check_recipe(lora_run)  # nor one of an older recipe
            say(f"found {_rel(lora_run)} at step {latest}")
        adapter = root / f"{TOKEN}.safetensors"
        info = export_run_adapter(store.open_source(str(lora_run)), adapter, ema=False, overwrite=True)
        learnt = f" and the learned row of '{TOKEN}'" if info.get("tokens") else ""
        say(f"wrote {_rel(adapter)}: adapters of {info['layers']} layers{learnt}, {info['bytes'] / 1e3:.1f} kB")

        def sample(prompts: tuple[str, ...], name: str, lora: tuple[str, ...] = ()):
            (root / f"{name}.txt").write_text("\n".join(prompts) + "\n")
            return lavie_sample(["lavie-sample", "--config", demo.config_arg("base"), "--checkpoint", _rel(base_run),
                                 *lora, "--prompt-file", _rel(root / f"{name}.txt"), "--output", _rel(root / name),
                                 "--overwrite", "--noprogress", *demo.cache_flags])[0]

        result = sample((*PROMPTS, *NEW_PROMPTS), "samples", ("--lora", _rel(adapter)))
        control = sample(NEW_PROMPTS, "samples_without_adapter")  # the concept must come from the adapter
    videos = list(result.frames)
    old = evaluate.score(list(PROMPTS), videos[:len(PROMPTS)])
    new = new_concept_score(list(NEW_PROMPTS), videos[len(PROMPTS):])
    new_before = new_concept_score(list(NEW_PROMPTS), list(control.frames))
    was = before["accuracy"]["base"]
    before_rows = {r["prompt"]: r for r in before["per_prompt"]["base"]}
    right_before = {p: r["color_ok"] and r["direction_ok"] for p, r in before_rows.items()}
    broken = [r["prompt"] for r in old["per_prompt"] if right_before.get(r["prompt"]) and not
              (r["color_ok"] and r["direction_ok"])]
    # how far each old prompt moved: its foreground's size after / before, its mean colour's largest channel change
    moved = {r["prompt"]: _moved(measured, r) for r in old["per_prompt"]
             if (measured := before_rows.get(r["prompt"])) is not None}
    sizes = [m["size"] for m in moved.values() if m["size"] is not None]
    shifts = [m["color_shift"] for m in moved.values() if m["color_shift"] is not None]
    unchanged = [p for p, m in moved.items() if m["unchanged"]]
    summary = {
        "token": TOKEN, "new_color": list(NEW_COLOR), "clips": CLIPS, "rules": [list(r) for r in RULES],
        "learn_token": LEARN_TOKEN, "train": TRAIN, "prior": PRIOR, "prior_weight": PRIOR_WEIGHT,
        "replay": REPLAY if PRIOR == "data" else None, "adapter_file": _rel(adapter),
        "adapter_layers": info["layers"], "adapter_bytes": info["bytes"], "new_prompts": new,
        "new_prompts_without_adapter": new_before, "old_prompts_before": was,
        "old_prompts_after": {k: old[f"{k}_accuracy"] for k in ("color", "direction", "both")},
        "old_prompts_broken": broken, "old_prompts_unchanged": len(unchanged),
        "old_prompts_size_after_before": {"min": min(sizes, default=None),
                                          "median": float(np.median(sizes)) if sizes else None},
        "old_prompts_color_shift_max": max(shifts, default=None), "old_prompts_moved": moved,
        "old_per_prompt_after": old["per_prompt"],
        "seconds": round(demo.clock.phases["personalise"], 1),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _overviews(demo, root, before, videos, old, new, np.asarray(control.frames), new_before)
    say(f"personalisation ('{TOKEN}' = {NEW_COLOR_NAME}): new prompts {new['new_color_accuracy']:.0%} {NEW_COLOR_NAME} "
        f"({new_before['new_color_accuracy']:.0%} without the adapter), {new['direction_accuracy']:.0%} moving the "
        f"prompted way; old prompts colour {was['color']:.0%} -> {old['color_accuracy']:.0%}, direction "
        f"{was['direction']:.0%} -> {old['direction_accuracy']:.0%}"
        f"{'; right before, wrong after: ' + ', '.join(broken) if broken else ''}"
        + ("; every old prompt measured exactly as before" if len(unchanged) == len(PROMPTS) else
           f"; drawn at {min(sizes):.2f}-{max(sizes):.2f} of their size before (median {np.median(sizes):.2f}), mean "
           f"colours within {max(shifts):.0f} RGB units" if sizes and shifts else "")
        + f" ({summary['seconds']:.0f} s; {_rel(root / 'summary.json')})")
    return summary


def _overviews(demo: Any, root: Path, before: dict[str, Any], videos: list[np.ndarray], old: dict[str, Any],
               new: dict[str, Any], control: np.ndarray, new_before: dict[str, Any]) -> None:
    """DIR/personalise/overview_old.png (the old prompts: the demo's base videos, then with the adapter) and
    overview_new.png (the new prompts: the base alone, then with the adapter), each frame with its verdicts."""
    from lavie_jax.demo import overview
    from lavie_jax.demo.main import PROMPTS
    from lavie_jax.io.video import read_video
    from lavie_jax.sampling.outputs import unique_stems

    was = np.stack([read_video(demo.out / "base" / f"{stem}.gif")[0] for stem in unique_stems(list(PROMPTS))])
    after = np.stack(videos[:len(PROMPTS)])
    overview.write(root / "overview_old.png", PROMPTS, {"base (before)": was, "with the adapter": after},
                   {"base (before)": {"per_prompt": before["per_prompt"]["base"]}, "with the adapter": old})
    overview.write(root / "overview_new.png", NEW_PROMPTS, {"base alone": control,
                                                            "with the adapter": np.stack(videos[len(PROMPTS):])},
                   {"base alone": new_before, "with the adapter": new})


def clean(demo: Any) -> None:
    """Remove the personalisation's outputs (a fresh start)."""
    shutil.rmtree(demo.out / "personalise", ignore_errors=True)
    shutil.rmtree(demo.runs / "base_lora", ignore_errors=True)


PROG = "python -m lavie_jax.demo.personalise"


def _run(argv: list[str]) -> None:
    from lavie_jax.cli import command
    from lavie_jax.demo.main import Demo, DemoError, _cache_flags, _rel
    from lavie_jax.runtime import compile_cache

    p = command.make_parser(PROG, "Phase 9 of `make demo` alone: the personalisation of a finished demo's base (its "
                            "runs/base and summary.json), e.g. after changing this module.\n\n" + __doc__)
    p.add_argument("--output", default="outputs/demo", metavar="DIR", help="the demo's directory (default: "
                   "%(default)s)")
    p.add_argument("--again", action="store_true", help="train the adapter again (deletes DIR/personalise and "
                   "DIR/runs/base_lora first); without it a finished adapter run is only sampled")
    command.add_common_flags(p, cache_default=compile_cache.USER_DIR_HELP)
    args = p.parse_args(argv)
    out = Path(args.output)
    missing = [_rel(f) for f in (out / "summary.json", out / "runs" / "base") if not f.exists()]
    if missing:
        raise DemoError(f"{', '.join(missing)} not found: run the whole demo first (`make demo` or "
                        f"`python -m lavie_jax.demo --output {_rel(out)}`)")
    cache = compile_cache.configure(command.cache_choice(args, compile_cache.user_cache_dir()), prog=PROG)
    demo = Demo(out, cache_flags=_cache_flags(cache))
    if args.again:
        clean(demo)
    personalise(demo, json.loads((out / "summary.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    """`python -m lavie_jax.demo.personalise [--output DIR] [--again]`; exit status as `lavie_jax.demo.main`."""
    import sys

    from lavie_jax.cli import command
    from lavie_jax.demo.main import DemoError
    from lavie_jax.runtime import startup

    argv = list(sys.argv[1:] if argv is None else argv)
    startup.configure()
    return command.run_main(PROG, argv, lambda: _run(argv), user_errors=(DemoError,))


if __name__ == "__main__":
    raise SystemExit(main())
