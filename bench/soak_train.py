"""Soak test of `lavie-train`'s resume: the tiny base trained for a few hundred steps while it is killed at random
moments (SIGKILL and SIGTERM, some of them while a checkpoint is being written) and a random file of a random
checkpoint is damaged now and then, rerunning the same command after each; at the end the loss of every step must
equal, bit for bit, the loss of the same step in an uninterrupted run.

    python -m bench.soak_train                          # 240 steps, up to 40 kills: about 25 min on 2 CPU cores
    python -m bench.soak_train --steps 40 --kills 6     # a short one

Not part of `make test`. Each run's output goes to OUT/logs/; the summary (kills by kind, damages and how each was
met, whether the losses match) is printed and written to OUT/summary.json. Exit status 0 when every loss matches.

Damage: a random file of a random complete checkpoint is truncated to a random shorter length (as `truncate -s`
does), or, for a file of the saved arrays, 64 of its bytes are overwritten. The run must move a damaged step aside
when it next reads it and resume from the step before it (or start over). Most damages hit the newest checkpoint,
the one the next run resumes from. Each damage's outcome is counted: moved
aside; read back intact (the run resumed from it and its arrays matched the fingerprints saved with them: the
bytes lost were ones the read did not need); or never read again (the run had moved past that step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TMP = ".orbax-checkpoint-tmp"  # orbax's directory of a save in progress
KILLS = ("SIGKILL", "SIGTERM", "SIGKILL during a save", "SIGTERM during a save")


def _command(workdir: Path, data_dir: Path, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "lavie_jax.train.cli", "--config", "base:tiny", "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", f"--config.train.num_steps={a.steps}", "--config.train.log_every=1",
            f"--config.train.checkpoint_every={a.checkpoint_every}", f"--config.train.keep={a.keep}"]


def _losses(workdir: Path) -> list[tuple[int, float]]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]  # (evaluation rows hold eval/* only)


def _last_step(workdir: Path) -> int:
    steps = [s for s, _ in _losses(workdir)]
    return steps[-1] if steps else 0


def _saving(workdir: Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(TMP in p.name for p in directory.iterdir())


def _committed(workdir: Path) -> list[Path]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists()),
                  key=lambda p: int(p.name))


def _damage(workdir: Path, rng: random.Random) -> dict | None:
    """Damage one file of a complete checkpoint (mostly the newest, which the next run resumes from; else a random
    one); what was done, or None if there is none."""
    steps = _committed(workdir)
    if not steps:
        return None
    step = steps[-1] if rng.random() < 0.7 else rng.choice(steps)
    files = [p for p in step.rglob("*") if p.is_file() and p.stat().st_size > 0]
    target = rng.choice(files)
    size = target.stat().st_size
    if "/d/" in str(target) and size > 64 and rng.random() < 0.5:  # an array data file: overwrite 64 bytes
        offset = rng.randrange(size - 64)
        with open(target, "r+b") as f:
            f.seek(offset)
            f.write(os.urandom(64))
        how = f"overwrote 64 bytes at {offset} of {size}"
    else:
        length = rng.randrange(size)
        os.truncate(target, length)
        how = f"truncated {size} -> {length} bytes"
    return {"step": int(step.name), "file": str(target.relative_to(step)), "how": how}


def _run_once(cmd: list[str], workdir: Path, log: Path, kill: str | None, rng: random.Random,
              a: argparse.Namespace) -> dict:
    """One run of the command; `kill` (one of KILLS) stops it at a random moment. Returns what happened."""
    start_step = _last_step(workdir)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        sent, at_step = None, None
        if kill is not None:
            after = rng.randint(1, a.checkpoint_every + 4)  # new steps this run trains before the signal
            during_save = kill.endswith("during a save")
            while proc.poll() is None:
                step = _last_step(workdir)
                if step - start_step >= after and (not during_save or _saving(workdir)):
                    if during_save:
                        time.sleep(rng.uniform(0, 0.3))  # somewhere in the write
                    sent, at_step = kill, _last_step(workdir)
                    proc.send_signal(signal.SIGKILL if kill.startswith("SIGKILL") else signal.SIGTERM)
                    break
                time.sleep(0.01)
        rc = proc.wait()
    text = log.read_text(errors="replace")
    return {"rc": rc, "signal": sent, "at_step": at_step, "from_step": start_step, "to_step": _last_step(workdir),
            "damaged_noticed": [int(s) for s in re.findall(r"checkpoint step (\d+) in \S+ is damaged", text)],
            "incomplete_noticed": [int(s) for s in re.findall(r"checkpoint step (\d+) in \S+ is incomplete", text)],
            "resumed_from": int(m.group(1)) if (m := re.search(r"resumed from step (\d+)", text)) else None,
            "started_over": "starting from the beginning" in text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--checkpoint-every", type=int, default=8)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--kills", type=int, default=40, help="runs stopped by a signal before one may finish")
    p.add_argument("--damage", type=float, default=0.4, help="chance of damaging a checkpoint after each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/soak"))
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    out = a.out.resolve()
    logs, data_dir = out / "logs", out / "data"
    logs.mkdir(parents=True, exist_ok=True)
    reference, soak = out / "reference", out / "soak"
    t0 = time.time()

    if _last_step(reference) != a.steps or not (reference / "checkpoints" / str(a.steps)).exists():
        print(f"[soak] the uninterrupted run: {a.steps} steps in {reference}", flush=True)
        cmd = _command(reference, data_dir, a) + ["--overwrite"]
        if subprocess.run(cmd, cwd=REPO, stdout=open(logs / "reference.log", "w"), stderr=subprocess.STDOUT).returncode:
            print(f"[soak] the uninterrupted run failed: see {logs / 'reference.log'}")
            return 1
    expected = dict(_losses(reference))
    reference_s = time.time() - t0

    shutil.rmtree(soak, ignore_errors=True)  # a fresh soak each time
    cmd = _command(soak, data_dir, a)
    events, kills, damages, runs = Counter(), [], [], 0
    t1 = time.time()
    while True:
        runs += 1
        kill = rng.choice(KILLS) if len(kills) < a.kills else None
        events["half-written saves removed"] += _saving(soak)  # a kill during a save left orbax's temporary
        r = _run_once(cmd, soak, logs / f"run{runs:03d}.log", kill, rng, a)
        for d in damages:  # how the runs met each damage: moved aside, or read back intact (bytes it did not need)
            if d["outcome"] == "never read again":
                if d["step"] in r["damaged_noticed"] + r["incomplete_noticed"]:
                    d["outcome"] = "moved aside"
                elif d["step"] == r["resumed_from"]:
                    d["outcome"] = "read back intact"
        line = (f"[soak] run {runs}: steps {r['from_step']} -> {r['to_step']}, rc {r['rc']}"
                + (f", {r['signal']} after step {r['at_step']}" if r["signal"] else "")
                + (f", damaged step(s) {r['damaged_noticed']} moved aside" if r["damaged_noticed"] else "")
                + (f", incomplete step(s) {r['incomplete_noticed']} moved aside" if r["incomplete_noticed"] else ""))
        print(line, flush=True)
        events["incomplete moved aside"] += len(r["incomplete_noticed"])
        events["damaged moved aside"] += len(r["damaged_noticed"])
        events["started over"] += r["started_over"]
        expected_rc = 0 if r["signal"] is None or r["signal"].startswith("SIGTERM") else -signal.SIGKILL
        if r["rc"] != expected_rc:
            print(f"[soak] FAILED: run {runs} exited with {r['rc']}; see {logs / f'run{runs:03d}.log'}")
            return 1
        if r["signal"] is not None:
            kills.append(r["signal"])
        if r["rc"] == 0 and r["to_step"] == a.steps and soak / "checkpoints" / str(a.steps) in _committed(soak):
            break  # finished (a SIGTERM during the last save only waits for it)
        if runs > 4 * a.kills + 20:
            print("[soak] FAILED: the run does not finish")
            return 1
        if rng.random() < a.damage:
            damage = _damage(soak, rng)
            if damage is not None:
                damage["outcome"] = "never read again"
                damages.append(damage)
                print(f"[soak]   damaged step {damage['step']}: {damage['file']} ({damage['how']})", flush=True)

    got = _losses(soak)
    steps = [s for s, _ in got]
    mismatched = [s for s, loss in got if expected.get(s) != loss]
    complete = steps == list(range(1, a.steps + 1))
    summary = {
        "steps": a.steps, "checkpoint_every": a.checkpoint_every, "keep": a.keep, "seed": a.seed, "runs": runs,
        "kills": dict(Counter(kills)), "kills_total": len(kills), "damages": len(damages),
        "damage_outcomes": dict(Counter(d["outcome"] for d in damages)),
        "damage_details": damages, "events": dict(events),
        "every_step_logged_once": complete, "mismatched_steps": mismatched,
        "losses_match_bitwise": complete and not mismatched,
        "reference_s": round(reference_s, 1), "soak_s": round(time.time() - t1, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "damage_details"}, indent=1))
    return 0 if summary["losses_match_bitwise"] else 1


if __name__ == "__main__":
    sys.exit(main())
