"""DPO-family preference losses as pure functions on per-sequence log-prob sums.

``loss/`` sees plain ``[P]`` tensors (one entry per (chosen, rejected) pair) and never
parallelism: builders gather the log-probs, the trainer reduces the per-pair losses
(DESIGN.md, "Parallelism is applied by builders").  The entry point is
:func:`preference_loss`; see ``preference.py`` for the table of losses and the modules it
names for each formula and the TRL convention it follows.
"""

from megatron_spin.loss.beta import resolve_beta
from megatron_spin.loss.types import LOSS_TYPES, PreferenceLossOutput

__all__ = ["LOSS_TYPES", "PreferenceLossOutput", "preference_loss", "resolve_beta"]


def __getattr__(name: str):
    # The losses need torch; the config (``loss.config``) does not, and processes that only read
    # a run's config (Ray's engine hosts) should not pay ~200 MB for importing it.
    if name == "preference_loss":
        from megatron_spin.loss.preference import preference_loss

        return preference_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
