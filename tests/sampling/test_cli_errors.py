"""Bad input to `lavie-sample`, run in-process through `main`: each case exits with status 2 and one line on stderr
naming the problem and the fix (no traceback unless --traceback), before any model is loaded, and leaves no
output directory behind."""

import codecs
import os
import re
from pathlib import Path

import numpy as np
import pytest

from lavie_jax.sampling import cli
from tests.sampling.conftest import BASE_FRAMES, HEIGHT, STEPS, WIDTH

ROOT = Path(__file__).resolve().parents[2]
SIZE = [f"--config.sample.steps={STEPS}", f"--config.sample.num_frames={BASE_FRAMES}",
        f"--config.sample.height={HEIGHT}", f"--config.sample.width={WIDTH}", "--noprogress"]
RANDOM = ["--checkpoint", "random"]


@pytest.fixture
def files(tmp_path):
    """Bad and good inputs in tmp_path; the output directory every case names is tmp_path/out."""
    f = {"tmp": tmp_path, "out": tmp_path / "out", "file": tmp_path / "file.txt", "dir": tmp_path / "dir",
         "empty_dir": tmp_path / "empty_dir", "latin1": tmp_path / "latin1.txt", "blank": tmp_path / "blank.txt",
         "utf16": tmp_path / "utf16.txt", "not_video": tmp_path / "not_video.mp4", "ckpt": tmp_path / "ckpt",
         "torch": tmp_path / "model.safetensors", "nul": tmp_path / "nul.txt"}
    f["file"].write_text("x")
    f["dir"].mkdir()
    f["empty_dir"].mkdir()
    f["ckpt"].mkdir()
    f["latin1"].write_bytes("a cat\r\ncaf\u00e9 au lait\r\n".encode("latin-1"))
    f["blank"].write_text("\n   \n\t\n")
    f["utf16"].write_bytes(codecs.BOM_UTF16_LE + "a cat\n".encode("utf-16-le"))
    f["not_video"].write_text("not a video")
    f["torch"].write_bytes(b"\0" * 8)
    f["nul"].write_bytes(b"a cat\0\n")
    return f


def base(*extra):
    return ["lavie-sample", "--config", f"{ROOT}/configs/base.py:tiny", *SIZE, *extra]


def stage(name, *extra):
    return ["lavie-sample", "--config", f"{ROOT}/configs/{name}.py:tiny", f"--config.sample.steps={STEPS}", *extra]


INTERP = ["--interpolation", f"{ROOT}/configs/interpolation.py:tiny", "--interpolation-checkpoint", "random"]

# (id, argv from the files fixture, regex the message must match)
CASES = [
    # configs and overrides
    ("config-missing", lambda f: base()[:2] + ["configs/nope.py:tiny", *RANDOM, "--prompt", "a"],
     r"--config configs/nope.py:tiny: no such file configs/nope.py; config files there: configs/base.py"),
    ("config-variant", lambda f: ["lavie-sample", "--config", f"{ROOT}/configs/base.py:huge", *RANDOM, "--prompt", "a"],
     r"unknown config variant 'huge'; choose one of \('full', 'tiny', 'demo'\)"),
    ("config-absent", lambda f: ["lavie-sample", *RANDOM, "--prompt", "a"], r"--config is required"),
    ("override-unknown", lambda f: base(*RANDOM, "--prompt", "a", "--config.sample.stepz=3"),
     r"no field sample.stepz; did you mean --config.sample.steps"),
    ("override-type", lambda f: base(*RANDOM, "--prompt", "a", "--config.sample.steps=abc"),
     r"--config.sample.steps=abc: sample.steps takes an integer \(now 3\); 'abc' is not one"),
    ("override-without-stage", lambda f: base(*RANDOM, "--prompt", "a", "--vsr.sample.steps=3"),
     r"--vsr.sample.steps=3 overrides a field of --vsr, which is not given"),
    ("override-value", lambda f: base(*RANDOM, "--prompt", "a", "--config.sample.sampler=pndm"),
     r"sample.sampler: 'pndm' is not one of"),
    ("model-dtype", lambda f: base(*RANDOM, "--prompt", "a", "--config.model.dtype=float16"),
     r"--config.model.dtype: 'float16': choose one of \('float32', 'bfloat16'\)"),
    ("mesh", lambda f: base(*RANDOM, "--prompt", "a", "--config.mesh.shape=(16,1,1,1)"),
     r"--config.mesh.shape=\(16, 1, 1, 1\): .*needs 16 devices but 8 are available; -1 takes the remaining"),
    # stage order
    ("stage-wrong-flag", lambda f: base(*RANDOM, "--prompt", "a", "--interpolation", f"{ROOT}/configs/vsr.py:tiny",
                                        "--interpolation-checkpoint", "random"),
     r"--interpolation was given a vsr config; pass --interpolation interpolation"),
    ("stage-order", lambda f: stage("interpolation", *RANDOM, *INTERP, "--input", str(f["dir"])), r"must come after"),
    ("stage-skipped", lambda f: base(*RANDOM, "--prompt", "a", "--vsr", f"{ROOT}/configs/vsr.py:tiny",
                                     "--vsr-checkpoint", "random"),
     r"skip interpolation: a cascade runs consecutive stages; add --interpolation interpolation"),
    ("stage-checkpoint-alone", lambda f: base(*RANDOM, "--prompt", "a", "--vsr-checkpoint", "random"),
     r"--vsr-checkpoint given without --vsr CONFIG"),
    ("stage-no-checkpoint", lambda f: base(*RANDOM, "--prompt", "a", "--interpolation",
                                           f"{ROOT}/configs/interpolation.py:tiny"),
     r"--interpolation-checkpoint is required for the interpolation stage"),
    # checkpoints
    ("checkpoint-absent", lambda f: base("--prompt", "a"), r"--checkpoint is required"),
    ("checkpoint-missing", lambda f: base("--checkpoint", str(f["tmp"] / "nothing"), "--prompt", "a"),
     r"no such directory"),
    ("checkpoint-file", lambda f: base("--checkpoint", str(f["file"]), "--prompt", "a"),
     r"--checkpoint .*file.txt is a file; pass the pipeline directory written by lavie-convert"),
    ("checkpoint-torch", lambda f: base("--checkpoint", str(f["torch"]), "--prompt", "a"),
     r"is a PyTorch weight file; convert it first with lavie-convert"),
    ("checkpoint-not-ours", lambda f: base("--checkpoint", str(f["ckpt"]), "--prompt", "a"),
     r"--checkpoint .*ckpt: .*lavie_checkpoint.json is missing"),
    ("later-checkpoint-not-ours", lambda f: base(*RANDOM, "--prompt", "a", "--interpolation",
                                                 f"{ROOT}/configs/interpolation.py:tiny",
                                                 "--interpolation-checkpoint", str(f["ckpt"])),
     r"error: --interpolation-checkpoint .*ckpt: .*lavie_checkpoint.json is missing"),
    # prompts
    ("no-prompts", lambda f: base(*RANDOM), r"no prompts: pass --prompt TEXT"),
    ("empty-prompt", lambda f: base(*RANDOM, "--prompt", "a", "--prompt", " "),
     r"--prompt number 2 is empty; pass the text of the video"),
    ("positional", lambda f: base(*RANDOM, "a cat"), r"unexpected argument 'a cat': every value needs its flag"),
    ("prompt-file-missing", lambda f: base(*RANDOM, "--prompt-file", str(f["tmp"] / "none.txt")),
     r"--prompt-file .*none.txt: no such file; pass a text file with one prompt per line"),
    ("prompt-file-dir", lambda f: base(*RANDOM, "--prompt-file", str(f["dir"])), r"is a directory; pass a text file"),
    ("prompt-file-latin1", lambda f: base(*RANDOM, "--prompt-file", str(f["latin1"])),
     r"latin1.txt is not UTF-8 text: line 2 has byte 0xe9 at byte 3 of the line \(byte 10 of the file\); save it as "
     r"UTF-8, e\.g\. for a Latin-1 / Windows file: iconv -f latin1 -t utf-8 .*latin1.txt > prompts-utf8.txt"),
    ("prompt-file-utf16", lambda f: base(*RANDOM, "--prompt-file", str(f["utf16"])),
     r"is UTF-16 text; save it as UTF-8, e\.g\. iconv -f utf-16 -t utf-8"),
    ("prompt-file-blank", lambda f: base(*RANDOM, "--prompt-file", str(f["blank"])),
     r"blank.txt has no prompts \(it is empty or only blank lines\)"),
    ("prompt-file-binary", lambda f: base(*RANDOM, "--prompt-file", str(f["nul"])), r"holds NUL bytes"),
    ("prompt-with-input", lambda f: base(*RANDOM, "--prompt", "a", "--input", str(f["dir"])),
     r"--input videos are for"),
    # input videos
    ("input-missing", lambda f: stage("vsr", *RANDOM), r"a vsr first stage needs --input videos"),
    ("input-with-prompt", lambda f: stage("vsr", *RANDOM, "--prompt", "a"), r"reads its prompts from the --input"),
    ("input-nothing", lambda f: stage("vsr", *RANDOM, "--input", str(f["tmp"] / "nothing")), r"does not exist"),
    ("input-empty-dir", lambda f: stage("vsr", *RANDOM, "--input", str(f["empty_dir"])), r"no .mp4 or .gif videos"),
    ("input-not-video", lambda f: stage("vsr", *RANDOM, "--input", str(f["not_video"])), r"cannot decode video"),
    # output
    ("output-absent", lambda f: base(*RANDOM, "--prompt", "a"), r"--output DIR is required"),  # no --output added
    ("output-file", lambda f: base(*RANDOM, "--prompt", "a", "--output", str(f["file"])), r"not a directory|is a file"),
    ("output-under-file", lambda f: base(*RANDOM, "--prompt", "a", "--output", str(f["file"] / "x")),
     r"is a file|not a directory"),
    # numbers and other flags
    ("seed-negative", lambda f: base(*RANDOM, "--prompt", "a", "--seed", "-1"),
     r"argument --seed: must be from 0 to 4294967295, got -1"),
    ("seed-large", lambda f: base(*RANDOM, "--prompt", "a", "--seed", str(2 ** 32)), r"argument --seed: must be from 0 to 4294967295, got 4294967296"),
    ("seed-text", lambda f: base(*RANDOM, "--prompt", "a", "--seed=abc"), r"argument --seed: expected a whole number, got 'abc'"),
    ("bool-text", lambda f: base(*RANDOM, "--prompt", "a", "--overwrite=maybe"),
     r"--overwrite=maybe: expected true or false \(or --overwrite / --no-overwrite\)"),
    ("unknown-flag", lambda f: base(*RANDOM, "--promt", "a"), r"unrecognized arguments: --promt a; did you mean --prompt\?"),
    ("flagfile-missing", lambda f: base(*RANDOM, "--prompt", "a", f"--flagfile={f['tmp'] / 'none.txt'}"),
     r"--flagfile: Unable to open flagfile: \[Errno 2\] No such file or directory"),
    # --distributed
    ("cluster-without-distributed", lambda f: base(*RANDOM, "--prompt", "a", "--coordinator", "localhost:1234"),
     r"need --distributed"),
    ("cluster-partial", lambda f: base(*RANDOM, "--prompt", "a", "--distributed", "--num-processes", "2"),
     r"go together; pass all three or none"),
    ("cluster-count", lambda f: base(*RANDOM, "--prompt", "a", "--distributed", "--coordinator", "h:1",
                                     "--num-processes", "0", "--process-id", "0"),
     r"argument --num-processes: must be at least 1, got 0"),
    ("cluster-id", lambda f: base(*RANDOM, "--prompt", "a", "--distributed", "--coordinator", "h:1",
                                  "--num-processes", "2", "--process-id", "2"),
     r"--process-id 2 with --num-processes 2: ids run from 0 to 1"),
    ("cluster-address", lambda f: base(*RANDOM, "--prompt", "a", "--distributed", "--coordinator", "h",
                                       "--num-processes", "2", "--process-id", "0"),
     r"--coordinator 'h': expected HOST:PORT of process 0"),
    # LoRA adapters (tests/convert/test_lora_files.py: another stage's or architecture's)
    ("lora-missing", lambda f: base(*RANDOM, "--prompt", "a", "--lora", f"{f['tmp']}/nope.safetensors:0.5"),
     r"--lora .*nope.safetensors: no such file"),
    ("lora-not-a-file", lambda f: base(*RANDOM, "--prompt", "a", "--lora", str(f["torch"])),
     r"--lora: .*model.safetensors: unknown file format"),
    ("lora-stage-absent", lambda f: base(*RANDOM, "--prompt", "a", "--vsr-lora", str(f["torch"])),
     r"--vsr-lora given without --vsr CONFIG"),
    ("cluster-not-found", lambda f: base(*RANDOM, "--prompt", "a", "--distributed"),
     r"--distributed: could not join the run \(.*\); outside Cloud TPU / SLURM / Open MPI pass --coordinator"),
]


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(cli, "load_stage_pipeline", refuse)


@pytest.mark.parametrize("name, make_argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(name, make_argv, message, files, no_models, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = make_argv(files)
    if "--output" not in argv and name != "output-absent":
        argv += ["--output", str(files["out"])]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lavie-sample: error: "), err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert not files["out"].exists()  # a failed check creates nothing


def test_traceback_flag_adds_the_traceback(files, no_models, capsys):
    argv = base(*RANDOM, "--prompt", "a", "--config.sample.steps=abc", "--output", str(files["out"]))
    for extra, shown in (([], False), (["--traceback"], True)):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv + extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and ("Traceback (most recent call last)" in err) == shown
        assert err.strip().splitlines()[-1].startswith("lavie-sample: error: --config.sample.steps=abc")


def test_unexpected_failures_are_one_line_with_status_1(files, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "load_stage_pipeline", broken)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base(*RANDOM, "--prompt", "a", "--output", str(files["out"])))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.strip() == ("lavie-sample: unexpected error: RuntimeError: something inside broke (a bug if the "
                           "inputs are fine: please report it with the output of --traceback)")


def test_prompt_files_in_utf8_with_bom_and_crlf(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(codecs.BOM_UTF8 + "a caf\u00e9 scene\r\n\r\n  a dog  \r\nlast".encode())
    assert cli.read_prompt_file(path) == ["a caf\u00e9 scene", "a dog", "last"]


def test_unreadable_prompt_file(tmp_path, monkeypatch):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n")
    if os.geteuid() == 0:  # root reads anything: make the read fail as it would for a user
        def denied(self):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_bytes", denied)
    else:
        path.chmod(0)
    with pytest.raises(cli.UsageError, match=r"prompts.txt cannot be read \(Permission denied\); check its "
                                             r"permissions, e.g. chmod u\+r "):
        cli.read_prompt_file(path)


def test_read_only_output_parent(tmp_path, no_models, capsys, monkeypatch):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: report the directory as not writable, as it is for a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent and mode & os.W_OK
                            else real_access(p, mode, **kw))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base(*RANDOM, "--prompt", "a", "--output", str(parent / "out")))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "read_only" in err and ("writ" in err or "permission" in err.lower()), err
    assert not (parent / "out").exists()


def test_output_over_the_input_videos_is_refused_even_with_overwrite(tmp_path, no_models, capsys):
    from lavie_jax.io import video

    video.write_video(tmp_path / "a_cat.mp4", np.zeros((3, 16, 24, 3), np.uint8), fps=8)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(stage("vsr", *RANDOM, "--input", str(tmp_path), "--output", str(tmp_path), "--overwrite"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert re.fullmatch(r"lavie-sample: error: --output would write over the --input files .*a_cat.json, .*a_cat.mp4; "
                        r"choose another --output \(e\.g\. res/vsr for inputs in res/base\)", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_cat.mp4"]


def test_help_lists_every_flag(capsys):
    cli.main(["lavie-sample", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--interpolation", "--vsr", "--checkpoint", "--prompt-file", "--input", "--output",
                 "--seed", "--distributed", "--overwrite", "--traceback", "--compile-cache", "--no-compile-cache"):
        assert re.search(rf"^  {flag}[ ,\n]", out, re.M), flag  # an entry of its own, at the start of a line
    assert "--config.a.b=value" in out and "--interpolation.a.b=value" in out  # the override syntax


def test_flag_files_may_hold_config_overrides(tmp_path):
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text("--config.sample.steps=2\n--prompt=a cat\n")
    fv, configs = cli._parse(base(f"--flagfile={flagfile}"))
    assert configs["config"].sample.steps == 2 and fv.prompt == ["a cat"]
