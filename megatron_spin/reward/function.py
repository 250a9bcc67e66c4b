"""A user reward function named by dotted path: ``package.module:function`` (or ``package.module.function``).

The function is called once per batch with the list of :class:`RewardInput` when it is
declared ``batched`` (``reward_model.function.batched: true``), else once per sample as
``fn(prompt, response, reference)``.  Import errors name the path.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

from megatron_spin.reward.base import RewardError, RewardInput, RewardSource


def resolve_function(path: str) -> Callable:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RewardError(f"reward function {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward function {path!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward function {path!r}: {module_name} has no callable {attr!r}")
    return fn


class FunctionReward(RewardSource):
    name = "function"

    def __init__(self, path: str, batched: bool = False):
        self.path, self.batched = path, batched
        self._fn = resolve_function(path)

    def score(self, inputs: Sequence[RewardInput]) -> list[float]:
        if self.batched:
            return list(self._fn(list(inputs)))
        return [self._fn(x.prompt, x.response, x.reference) for x in inputs]
