"""Multi-host sampling: two real jax processes (4 CPU devices each) run the same `lavie-sample --distributed`
command, which samples one request on one 8-device mesh spanning both.

Rows are split over all 8 devices, results are gathered to every process, and only process 0 writes files. The
videos equal those of a single process on one device with the same seed.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import portpicker
import pytest

from lavie_jax.sampling.stages import StageSampler
from tests.models.tiny_configs import rel_err
from tests.sampling.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a panda taking a selfie", "a corgi walking in the park", "a teddy bear"]

_HOST = textwrap.dedent("""
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    import jax, numpy as np
    index, port, out, root = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    sys.path.insert(0, root)
    from lavie_jax.sampling import cli
    from tests.sampling.conftest import BASE_FRAMES, HEIGHT, STEPS, WIDTH
    results = cli.run([
        'lavie-sample', '--distributed', f'--coordinator=localhost:{port}', '--num-processes=2',
        f'--process-id={index}', '--config', f'{root}/configs/base.py:tiny', '--checkpoint', 'random',
        '--config.mesh.shape=(2,4,1,1)',  # 8 devices over both processes; params FSDP-sharded across them
        f'--config.sample.steps={STEPS}', f'--config.sample.num_frames={BASE_FRAMES}',
        f'--config.sample.height={HEIGHT}', f'--config.sample.width={WIDTH}', '--config.sample.batch_size=0',
        '--noprogress', '--seed=11', f'--output={out}/videos{index}', *[f'--prompt={p}' for p in sys.argv[5:]]])
    assert jax.process_count() == 2 and jax.device_count() == 8 and len(jax.local_devices()) == 4
    np.save(os.path.join(out, f'latents{index}.npy'), results[0].latents)
    jax.distributed.shutdown()
    print('DONE', flush=True)
""")


@pytest.mark.slow
def test_two_processes_sample_like_one_device(pipelines, mesh1, tmp_path):
    (tmp_path / "host.py").write_text(_HOST)
    port = str(portpicker.pick_unused_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "host.py"), str(i), port, str(tmp_path), str(ROOT),
                               *PROMPTS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        finally:
            proc.kill()
        assert proc.returncode == 0 and "DONE" in outputs[-1], outputs[-1][-3000:]
    single = StageSampler(tiny_config("base"), pipelines["base"], mesh1).sample(PROMPTS, seed=11)
    for i in range(2):  # every process holds the whole result
        assert rel_err(np.load(tmp_path / f"latents{i}.npy"), single.latents) <= 1e-5
    written = sorted(p.name for p in (tmp_path / "videos0").iterdir())
    assert written == sorted(f"{p.replace(' ', '_')}.{ext}" for p in PROMPTS for ext in ("mp4", "json"))
    assert json.loads((tmp_path / "videos0" / "a_teddy_bear.json").read_text())["seed"] == 11
    assert not list((tmp_path / "videos1").iterdir())  # process 1 writes nothing
