"""Fixtures shared by the multi-process tests."""

from __future__ import annotations

import pytest

from megatron_spin.convert.pipeline import convert_hf_to_megatron
from tests.conftest import make_tiny_hf


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Llama (4 layers, untied) converted to a Megatron checkpoint."""
    root = tmp_path_factory.mktemp("train")
    hf = make_tiny_hf(root / "hf", "llama", tied=False, layers=4)
    convert_hf_to_megatron(hf, root / "mcore", log=lambda *_: None)
    return root / "mcore"
