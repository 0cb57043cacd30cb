"""lavie_jax.runtime.host_gc: the collector thresholds the entry points set, and a user's own higher choice kept."""

import gc

import pytest

from lavie_jax.runtime import host_gc


@pytest.fixture
def thresholds():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_raises_the_default_thresholds(thresholds):
    gc.set_threshold(700, 10, 10)  # CPython's defaults
    assert host_gc.configure() == host_gc.THRESHOLDS == gc.get_threshold()


def test_keeps_a_higher_setting(thresholds):
    gc.set_threshold(50_000, 20, 20)
    assert host_gc.configure() == (50_000, 20, 20)


def test_the_train_cli_sets_them_before_running(thresholds, monkeypatch):
    from lavie_jax.train import cli

    seen = []
    monkeypatch.setattr(cli, "run", lambda argv: seen.append(gc.get_threshold()))
    gc.set_threshold(700, 10, 10)
    assert cli.main(["lavie-train"]) == 0 and seen == [host_gc.THRESHOLDS]
