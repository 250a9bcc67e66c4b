"""Process groups and layouts: the only code that touches megatron's parallel_state globals."""

from megatron_spin.parallel.layout import LayoutError, ParallelLayout, validate_layout
from megatron_spin.parallel.groups import ParallelContext, destroy_parallel, init_parallel

__all__ = [
    "LayoutError",
    "ParallelLayout",
    "validate_layout",
    "ParallelContext",
    "init_parallel",
    "destroy_parallel",
]
