"""Tiny diffusers model folders shared by the inflation and pipeline tests (built once per session)."""

import pytest

from tests.convert.helpers import diffusers_folder, lavie_checkpoint


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """(folder, torch models) of a tiny Stable Diffusion v1.x layout, safetensors files."""
    return diffusers_folder(tmp_path_factory.mktemp("sd"), "sd")


@pytest.fixture(scope="session")
def x4_folder(tmp_path_factory):
    """(folder, torch models) of a tiny x4-upscaler layout, .bin files."""
    return diffusers_folder(tmp_path_factory.mktemp("x4"), "x4", safe=False)


@pytest.fixture(scope="session")
def base_checkpoint():
    """(diffusers reference, LaVie base state dict) with temporal branches zeroed."""
    return lavie_checkpoint("base")
