"""Shared fixtures of the training tests."""

from __future__ import annotations

import pytest

import training.train as train_mod


@pytest.fixture(autouse=True)
def _float32_training_by_default(monkeypatch):
    """Train in float32 unless a test asks for bf16: on a CPU with AMX the default would be
    bf16 autocast (:func:`training.train.cpu_bf16_fast`), and a test's numbers must not depend
    on which CPU CI draws. Tests of the default itself patch the probe again."""
    monkeypatch.setattr(train_mod, "cpu_bf16_fast", lambda: False)
