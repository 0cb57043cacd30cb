"""`lavie_jax.cli.config_flags`: packaged configs by name, config files by path, `--config.a.b=value` overrides from a
command line, and the one error class (with a message naming the flag, the problem and the fix) for everything that
can go wrong."""

import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from lavie_jax.cli.config_flags import ConfigArgError, config_names, load_config, parse_config_flags

ROOT = Path(__file__).resolve().parents[1]
BASE = "base:tiny"
PACKAGED = "packaged configs: base, demo, i2v, interpolation, vsr \\(e.g. --config base:tiny\\)"
NAMES = ("config", "interpolation", "vsr")


def parse(*args: str, names=NAMES):
    return parse_config_flags(["prog", *args], names)


def test_overrides_in_every_form_by_field_type():
    configs, rest = parse("--config", BASE, "--prompt", "a cat", "--config.sample.steps=3",
                          "--config.sample.guidance_scale", "5", "--config.sample.cond_first",
                          "--noconfig.sample.underscore_prompts", "--config.sample.formats=mp4,gif",
                          "--config.mesh.shape=(1,2,1,1)", "--config.model.attention_impl=xla",
                          "--config.unet.block_out_channels=[16,32]", "--config.sample.seed=0x10")
    c = configs["config"]
    assert (c.sample.steps, c.sample.guidance_scale, c.sample.cond_first, c.sample.underscore_prompts) == \
        (3, 5.0, True, False)
    assert (c.sample.formats, c.mesh.shape, c.model.attention_impl, c.unet.block_out_channels, c.sample.seed) == \
        ("mp4,gif", (1, 2, 1, 1), "xla", [16, 32], 16)
    assert configs["interpolation"] is None and configs["vsr"] is None
    assert rest == ["prog", "--prompt", "a cat"]
    with pytest.raises(AttributeError):  # locked, as config_flags left it: a typo in code cannot add a field
        c.sample.stepz = 3


def test_stage_flags_keep_their_own_overrides_and_stop_at_double_dash():
    configs, rest = parse(f"--config={BASE}", "--vsr", "vsr:tiny", "--vsr.sample.steps=2",
                          "--vsr-checkpoint", "random", "--", "--config.sample.steps=9")
    assert configs["config"].sample.steps == 4 and configs["vsr"].sample.steps == 2
    assert rest == ["prog", "--vsr-checkpoint", "random", "--", "--config.sample.steps=9"]
    # a tuple field given several times collects single values, as ml_collections' config flags do
    configs, _ = parse("--config", BASE, "--config.mesh.shape=2", "--config.mesh.shape=4", "--config.mesh.shape",
                       "1", "--config.mesh.shape=1")
    assert configs["config"].mesh.shape == (2, 4, 1, 1)


def test_load_config_is_reusable_without_a_command_line():
    config = load_config(BASE, {"sample.steps": "7", "data.seed": "3"})
    assert (config.sample.steps, config.data.seed, config.stage) == (7, 3, "base")
    assert load_config(f"{ROOT}/configs/vsr.py").stage == "vsr"
    assert load_config("vsr").stage == "vsr"


def test_packaged_configs_by_name_equal_their_files():
    assert config_names() == ("base", "demo", "i2v", "interpolation", "vsr")
    for stage in ("base", "interpolation", "vsr"):
        for variant in ("", ":tiny", ":demo"):
            by_name = load_config(f"{stage}{variant}")
            assert by_name.to_dict() == load_config(f"{ROOT}/configs/{stage}.py{variant}").to_dict()
            assert by_name.stage == stage
    assert load_config("demo").text_width == load_config("base:demo").unet.cross_attention_dim


def test_a_copy_of_a_packaged_config_loads_by_path_from_any_working_directory(tmp_path, monkeypatch):
    """A config of one's own starts as a copy of a packaged one, which imports `lavie_jax.configs.common`; files are
    run without touching sys.path, so a file importing a package of its own gets one error saying so."""
    mine = tmp_path / "mine" / "my_base.py"
    mine.parent.mkdir()
    shutil.copy(ROOT / "configs" / "base.py", mine)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    path = list(sys.path)
    assert load_config(f"{mine}:tiny").to_dict() == load_config("base:tiny").to_dict()
    with pytest.raises(ConfigArgError, match=r"my_base.py:large: unknown config variant 'large'; choose one of"):
        load_config(f"{mine}:large")
    package = tmp_path / "proj" / "cfgpkg_for_config_cli_test"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "shared.py").write_text("STEPS = 11\n")
    (package / "stage.py").write_text(textwrap.dedent("""
        import ml_collections
        from cfgpkg_for_config_cli_test.shared import STEPS

        def get_config(arg=None):
            return ml_collections.ConfigDict({"stage": "base", "sample": {"steps": STEPS}})
    """))
    with pytest.raises(ConfigArgError, match=r"stage.py failed to load: ModuleNotFoundError: .*cfgpkg_for_config_cli_"
                                             r"test.*sys.path unchanged: .*from lavie_jax.configs import common"):
        load_config(str(package / "stage.py"))
    assert sys.path == path


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nope.py:tiny"],
     r"^--config configs/nope.py:tiny: no such file configs/nope.py; config files there: configs/base.py, "),
    (["--config", "nope:tiny"],
     rf"^--config nope:tiny: nope is neither a config file nor a packaged config; {PACKAGED}, or pass a config file"),
    (["--config", "common"], rf"common is neither a config file nor a packaged config; {PACKAGED}"),
    (["--config", "elsewhere/vsr.py:tiny"],
     rf"no such file elsewhere/vsr.py; did you mean the packaged --config vsr:tiny\?; {PACKAGED}$"),
    (["--config", "demo:tiny"], r"^--config demo:tiny: get_config\(\) of lavie_jax.configs.demo takes no variant .*"
                                r"; drop ':tiny'$"),
    (["--config", f"{ROOT}/configs"], r"is a directory; pass a config file in it; config files there: .*base.py"),
    (["--config", "base:huge"], r"^--config base:huge: unknown config variant 'huge'; choose one of \('full', 'tiny', "
                                r"'demo'\) \(e\.g\. base:tiny\)$"),
    (["--config", f"{ROOT}/configs/common.py"], r"common.py defines no get_config\(\); pass a stage config file"),
    (["--config", f"{ROOT}/configs/base.py:huge"],
     r"base.py:huge: unknown config variant 'huge'; choose one of \('full', 'tiny', 'demo'\)"),
    (["--config="], r"^--config is empty; pass a config file"),
    (["--config"], r"^--config needs a value: a config file"),
    (["--config", "--checkpoint", "random"], r"^--config needs a value"),
    (["--config", BASE, "--config.sample.stepz=3"],
     r"^--config.sample.stepz: the config has no field sample.stepz; did you mean --config.sample.steps"),
    (["--config", BASE, "--config.steps=3"], r"no field steps; did you mean --config.sample.steps\?"),
    (["--config", BASE, "--config.sampel.steps=3"], r"no field sampel; did you mean --config.sample\?"),
    (["--config", BASE, "--config.bogus=1"], r"no field bogus; the fields of the config are: data, mesh, model, "),
    (["--config", BASE, "--config.sample.steps=abc"],
     r"^--config.sample.steps=abc: sample.steps takes an integer \(now 4\); 'abc' is not one$"),
    (["--config", BASE, "--config.sample.steps=2.5"], r"sample.steps takes an integer"),
    (["--config", BASE, "--config.sample.guidance_scale=high"], r"sample.guidance_scale takes a number"),
    (["--config", BASE, "--config.sample.cond_first=maybe"], r"sample.cond_first takes true or false"),
    (["--config", BASE, "--noconfig.sample.steps"], r"--noconfig.FIELD is for true/false fields only; use "),
    (["--config", BASE, "--config.sample.steps"], r"^--config.sample.steps needs a value: "),
    (["--config", BASE, "--config.sample=3"], r"sample is a section; set its fields one by one, e\.g\. "),
    (["--config", BASE, "--config.sample.steps.x=3"],
     r"sample.steps is a field \(now 4\), not a section; set it as --config.sample.steps=VALUE"),
    (["--config", BASE, "--interpolation.sample.steps=3"],
     r"^--interpolation.sample.steps=3 overrides a field of --interpolation, which is not given; add"),
])
def test_every_bad_config_argument_is_one_clear_error(args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigArgError, match=message) as info:
        parse(*args)
    assert "\n" not in str(info.value)


def test_broken_config_files(tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "raises.py").write_text("def get_config(arg=None):\n    return {}['x']\n")
    (tmp_path / "noarg.py").write_text("import ml_collections\n\ndef get_config():\n"
                                       "    return ml_collections.ConfigDict()\n")
    (tmp_path / "plain.py").write_text("def get_config(arg=None):\n    return {'a': 1}\n")
    (tmp_path / "none.py").write_text("def get_config(arg=None):\n    pass\n")
    (tmp_path / "binary.py").write_bytes(b"\x00\x01\x02")
    cases = {"syntax.py": r"is not a Python config file: invalid syntax at line 1",
             "raises.py": r"get_config\(\) of .*raises.py failed: KeyError: 'x' \(fix the file; --traceback",
             "noarg.py:tiny": r"get_config\(\) of .*noarg.py takes no variant .*; drop ':tiny'",
             "plain.py": r"returned dict, not an ml_collections.ConfigDict",
             "none.py": r"returned NoneType, not an ml_collections.ConfigDict",
             "binary.py": r"binary.py (is not a Python config file|failed to load)"}
    for name, message in cases.items():
        with pytest.raises(ConfigArgError, match=message):
            load_config(str(tmp_path / name))


def test_a_lavie_train_work_directory_gives_the_config_its_run_stored(tmp_path):
    """`--config RUN` (what lavie-sample takes when --checkpoint RUN comes without --config): the stored config,
    typed as the packaged one (tuples stay tuples), overrides applied; a variant or an unreadable config refused."""
    trained = load_config(BASE, [("train.num_steps", "7"), ("mesh.shape", "(1,1,1,1)"), ("sample.steps", "4")])
    run = tmp_path / "run"
    run.mkdir()
    (run / "lavie_workdir.json").write_text("{}")
    (run / "config.json").write_text(trained.to_json_best_effort())
    configs, _ = parse("--config", str(run), "--config.sample.steps=2")
    c = configs["config"]
    assert c.sample.steps == 2 and c.train.num_steps == 7 and c.mesh.shape == (1, 1, 1, 1)
    c.sample.steps = 4
    assert c.to_dict() == trained.to_dict()  # values and their types
    with pytest.raises(AttributeError):
        c.sample.stepz = 1  # locked as any config
    with pytest.raises(ConfigArgError, match=r"work directory's config has no variants; drop ':tiny'"):
        parse("--config", f"{run}:tiny")
    (run / "config.json").write_text('{"stage": "nope"}')
    with pytest.raises(ConfigArgError, match=r"names no stage config \(stage='nope'\); pass the config it was "
                                             r"trained with, --config NAME\[:variant\]"):
        parse("--config", str(run))
    (run / "config.json").unlink()
    with pytest.raises(ConfigArgError, match=r"cannot read the run's config .*config.json"):
        parse("--config", str(run))
    plain = tmp_path / "plain"  # not a work directory: a directory is still no config
    plain.mkdir()
    with pytest.raises(ConfigArgError, match="is a directory; pass a config file in it"):
        parse("--config", str(plain))
