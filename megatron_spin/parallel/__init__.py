"""Process groups and layouts: the only code that touches megatron's parallel_state globals."""

from megatron_spin.parallel.layout import LayoutError, ParallelLayout, validate_layout

__all__ = [
    "LayoutError",
    "ParallelLayout",
    "validate_layout",
    "ParallelContext",
    "init_parallel",
    "destroy_parallel",
]


def __getattr__(name: str):
    # The groups need torch.distributed; the layout rules (read by the run config) do not.
    if name in ("ParallelContext", "init_parallel", "destroy_parallel"):
        from megatron_spin.parallel import groups

        return getattr(groups, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
