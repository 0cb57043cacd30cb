"""`make bench-gpu` (bench/accelerator_bench.py) on the CPU: tiny configs, every row present with sane numbers.

Run as a subprocess on one CPU device (the suite's 8 emulated devices would split the sampler's batch); it
inherits the suite's persistent compilation cache, so a rerun mostly skips XLA (about 30 s on 2 cores, 80 s cold).
Attention policies 'xla' (runs everywhere) and 'cudnn' (needs a GPU: an 'n/a' row with the reason); a sweep over
one remat policy (each policy is one more train-step compile; remat itself: tests/models/test_unet_behaviour.py);
the forward rows of two stages (every stage's row is the same code at its own shape).
Numbers are only checked for sanity here: speed targets live in benchmarks, not tests.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    env = child_env()  # one CPU device, as on one accelerator
    cmd = [sys.executable, "-m", "bench.accelerator_bench", "--json", str(out), "--attention", "xla", "cudnn",
           "--remat-sweep", "--remat", "none", "--repeats", "1", "--train-steps", "1", "--steps", "2",
           "--stages", "base", "vsr", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_tiny_table_has_every_row_with_sane_numbers(bench_run):
    result, stdout = bench_run
    assert result["tiny"] is True and result["backend"] == "cpu"  # tiny automatically on a CPU
    assert result["dtype"] == "float32" and result["peak_bf16_tflops"] is None
    rows = {r["row"]: r for r in result["rows"]}
    default = result["attention_default"]  # the train and sample rows run the config's attention policy
    timed = ["matmul float32", "forward base [xla]", "forward vsr [xla]",
             f"  train base [remat=none, {default}]",
             f"sample base 2 steps [{default}]"]
    for name in timed:
        r = rows[name]
        assert not r["note"].startswith("n/a"), (name, r["note"])
        assert 0 < r["time_ms"] < 60_000, (name, r)
        assert r["tflop"] > 0 and math.isclose(r["tflops"], r["tflop"] / (r["time_ms"] / 1e3), rel_tol=1e-6)
        assert 0 < r["mfu_measured"] < 5, (name, r)  # tiny programs may beat a 1024^3 matmul, not by 5x
        assert r["mfu_peak"] is None
        assert name in stdout
    assert math.isclose(rows["matmul float32"]["mfu_measured"], 1.0)
    assert rows["forward [cudnn]"]["note"].startswith("n/a: ") and len(rows["forward [cudnn]"]["note"]) > 10

    # the train rows: the best policy, then the sweep, each with the compiled memory and a finite loss
    train = [r for r in result["rows"] if r["row"].lstrip().startswith("train base")]
    assert len(train) == 2 and "best remat" in train[0]["note"]
    assert train[0]["time_ms"] == min(r["time_ms"] for r in train[1:])
    for r in train:
        m = r["memory_bytes"]
        assert m["argument"] > 0 and m["temp"] > 0
        assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
        assert math.isfinite(r["loss"])
    # the forward rows' FLOPs are the analytic counts of one guided batch at each stage's sampling shape
    assert rows["forward base [xla]"]["shape"].startswith("2x4x4x6x4")
    assert not any(name.startswith(("forward interpolation", "forward i2v")) for name in rows)  # --stages base vsr
    assert rows["forward vsr [xla]"]["shape"].startswith("2x4x32x48x7")
