"""Split a global preference batch into this data-parallel rank's micro-batches."""

from __future__ import annotations

from megatron_spin.errors import ConfigError
from megatron_spin.train.config import BatchConfig
from megatron_spin.pairs import PreferenceBatch


def rank_micro_batches(batch: PreferenceBatch, cfg: BatchConfig, dp_rank: int, dp_size: int) -> list[PreferenceBatch]:
    """Pairs ``[r·G/dp, (r+1)·G/dp)`` of the global batch, in micro-batches of ``cfg.micro_pairs``.

    The split depends only on the global batch, so the optimizer step is the same whatever
    the number of data-parallel ranks (each micro-batch loss is a mean over equally many
    pairs; Megatron averages over micro-batches and DDP over ranks).
    """
    cfg.micro_batches_per_rank(dp_size)  # raises naming the divisibility rule
    if batch.num_pairs != cfg.global_pairs:
        raise ConfigError("global_pairs", f"the batch holds {batch.num_pairs} pairs, global_pairs={cfg.global_pairs}")
    per_rank = cfg.global_pairs // dp_size
    mine = batch.select_pairs(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    return mine.split_micro_batches(cfg.micro_pairs)
