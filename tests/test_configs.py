"""The packaged configs (configs/, installed as lavie_jax.configs) and their boundary with the library: every stage
and variant loads by name with train settings the optimizer accepts; the sharding rules the configs write equal the
library's own default table; the library never imports the configs, and nothing edits sys.path to find them."""

import ast
from pathlib import Path

import pytest

from lavie_jax import parallel
from lavie_jax.cli.config_flags import load_config
from lavie_jax.train import optim

ROOT = Path(__file__).resolve().parents[1]
SPECS = [f"{stage}{variant}" for stage in ("base", "i2v", "interpolation", "vsr") for variant in ("", ":tiny", ":demo")]


@pytest.mark.parametrize("spec", SPECS)
def test_every_stage_config_loads_by_name_with_valid_train_settings(spec):
    config = load_config(spec)
    assert config.stage == spec.split(":")[0] == config.data.stage == config.unet.stage
    optim.validate_train_optim_config(config.train)


@pytest.mark.parametrize("spec", SPECS)
def test_the_configs_sharding_rules_are_the_librarys_default_rules(spec):
    """configs/common.py writes the table out (a config holds its own values); lavie_jax.parallel.DEFAULT_RULES is
    what library calls without a config use. Equal, so the two cannot drift apart unnoticed."""
    assert load_config(spec).sharding.rules == tuple(parallel.DEFAULT_RULES)


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_the_library_never_imports_the_configs():
    """lavie_jax reads configs only through the loader, which names the package as a string (importlib)."""
    offenders = []
    for path in _python_files("lavie_jax"):
        for name in _imported_modules(ast.parse(path.read_text(), str(path))):
            if name == "configs" or name.startswith(("configs.", "lavie_jax.configs")):
                offenders.append(f"{path.relative_to(ROOT)}: import {name}")
    assert not offenders, offenders


def test_configs_and_benchmarks_import_the_installed_package_and_nobody_edits_sys_path():
    offenders = []
    for path in _python_files("lavie_jax", "configs", "bench"):
        tree = ast.parse(path.read_text(), str(path))
        for name in _imported_modules(tree):
            if name == "configs" or name.startswith("configs."):  # the top-level folder is no package once installed
                offenders.append(f"{path.relative_to(ROOT)}: import {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                    and node.value.id == "sys":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: sys.path")
    assert not offenders, offenders
