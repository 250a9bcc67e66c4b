"""Shared by the example recipes: compose the run config from overrides and run it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout


def run_with(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_module

    from megatron_spin.config.run import load_run_config
    from megatron_spin.main import run

    with initialize_config_module(config_module="megatron_spin.config.conf", version_base=None):
        cfg = compose(config_name="spin_trainer", overrides=overrides + sys.argv[1:])
    return run(load_run_config(cfg))
