"""train.liger_kernel: off by default, never on a CPU, an error when asked for without the package."""

from __future__ import annotations

import importlib.util

import pytest

from training.lora import TrainSettings, use_liger


def test_liger_is_off_by_default_and_never_on_a_cpu() -> None:
    assert TrainSettings().liger_kernel is False
    assert use_liger(False, gpu=True) is False
    assert use_liger(True, gpu=False) is False and use_liger(None, gpu=False) is False
    installed = importlib.util.find_spec("liger_kernel") is not None
    assert use_liger(None, gpu=True) is installed
    if not installed:
        with pytest.raises(ValueError, match="train.liger_kernel"):
            use_liger(True, gpu=True)
