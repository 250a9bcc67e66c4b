"""One pass of Megatron's pipeline schedule over preference micro-batches.

``forward_logps`` (no grad) gives per-sequence response log-probs — the reference pass and
the actor's own log-probs.  ``preference_forward_backward`` runs forward and backward of the
DPO-family loss.  Both use ``get_forward_backward_func()``, so PP and interleaved PP work
unchanged; on pipeline stages other than the last, nothing comes back.

A micro-batch holds ``k`` pairs as ``2k`` sequences, chosen first: rows ``[:k]`` are the
chosen responses and rows ``[k:]`` the rejected ones, all padded to one length ``S`` (the
pipeline sends activations of a fixed shape between stages).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_spin.loss import preference_loss
from megatron_spin.loss.config import LossConfig
from megatron_spin.loss.types import REFERENCE_LOSS_TYPES
from megatron_spin.train.logprobs import model_token_nll, sequence_logps


def _schedule(chunks, data, num_micro: int, seq_len: int, micro_size: int, forward_step, forward_only: bool,
              collect: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(data) for _ in chunks] if len(chunks) > 1 else iter(data),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_micro,
        seq_length=seq_len,
        micro_batch_size=micro_size,
        forward_only=forward_only,
        collect_non_loss_data=collect,
    )


def _aux_loss_sees_padding(chunk) -> bool:
    """Whether the update must hand the model a padding mask: a MoE router with a load-balancing
    loss would otherwise count padding tokens (and padding pairs) in it.  Not under sequence
    parallelism with PP: megatron-core 0.16 splits the mask over TP only on the first stage, so
    later stages would refuse it (their aux loss then counts padding: unverified on GPU)."""
    while not hasattr(chunk, "config") and hasattr(chunk, "module"):
        chunk = chunk.module
    cfg = chunk.config
    if cfg.num_moe_experts is None or cfg.moe_router_load_balancing_type == "none":
        return False
    return not (cfg.sequence_parallel and cfg.pipeline_model_parallel_size > 1)


def _geometry(micro_batches: Sequence) -> tuple[int, int]:
    shapes = {tuple(mb.tokens.shape) for mb in micro_batches}
    if len(shapes) != 1:
        raise ValueError(f"micro-batches must share one [2k, S] shape for the pipeline, got {sorted(shapes)}")
    (rows, seq_len), = shapes
    return rows, seq_len


def forward_logps(chunks: list, micro_batches: Sequence) -> Optional[list[torch.Tensor]]:
    """``[2k]`` response log-prob sums per micro-batch (last stage), else ``None``."""
    rows, seq_len = _geometry(micro_batches)
    device = next(chunks[0].parameters()).device

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        nll = model_token_nll(model, mb.tokens.to(device))

        def collect(output, non_loss_data=True):
            return sequence_logps(output, mb.loss_mask).detach().cpu()

        return nll, collect

    for c in chunks:
        c.eval()
    with torch.no_grad():
        out = _schedule(chunks, list(micro_batches), len(micro_batches), seq_len, rows, forward_step,
                        forward_only=True, collect=True)
    return list(out) if out else None


def preference_forward_backward(
    chunks: list,
    micro_batches: Sequence,
    ref_logps: Optional[Sequence[torch.Tensor]],
    loss_cfg: LossConfig,
    iteration: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Accumulate gradients of the mean per-pair loss over all micro-batches.

    Megatron divides each micro-batch loss by the number of micro-batches, and DDP averages
    over data-parallel ranks, so with equal micro-batch sizes the gradient is that of the
    mean loss over the global batch of pairs, whatever the number of ranks; padding pairs
    (weight 0) and the batch's ``loss_scale`` keep it the mean over the real pairs.
    Returns per-micro-batch sums over real pairs (last stage only; empty elsewhere).
    """

    rows, seq_len = _geometry(micro_batches)
    device = next(chunks[0].parameters()).device
    needs_ref = loss_cfg.loss_type in REFERENCE_LOSS_TYPES
    data = [(mb, None if ref_logps is None else ref_logps[i]) for i, mb in enumerate(micro_batches)]

    masks_padding = _aux_loss_sees_padding(chunks[0])

    def forward_step(data_iterator, model):
        mb, ref = next(data_iterator)
        padding = mb.padding_mask().to(device) if masks_padding else None
        nll = model_token_nll(model, mb.tokens.to(device), padding)

        def loss_func(output):
            k = mb.num_pairs
            if needs_ref and ref is None:  # only the last stage computes the loss, and needs them
                raise ValueError(f"loss_type={loss_cfg.loss_type!r} needs reference log-probs")
            logps = sequence_logps(output, mb.loss_mask)  # [2k]
            # ≥ 1: a row with no response token (padding, or a rank whose tokens are all masked)
            # has log-prob 0 and must give a finite, not 0/0, per-token average.
            lengths = mb.response_lengths.to(logps.device, torch.float32).clamp(min=1)
            zeros = torch.zeros_like(logps)
            r = ref.to(logps.device) if ref is not None else zeros
            out = preference_loss(
                logps[:k], logps[k:], r[:k], r[k:],
                beta=loss_cfg.beta, loss_type=loss_cfg.loss_type, label_smoothing=loss_cfg.label_smoothing,
                chosen_lengths=lengths[:k], rejected_lengths=lengths[k:], simpo_gamma=loss_cfg.simpo_gamma,
                nll_weight=loss_cfg.nll_weight, iteration=iteration,
            )
            # Padding pairs weigh 0; the scale makes the mean over real pairs (PreferenceBatch.padded_to).
            w = mb.pair_weights.to(logps.device)
            loss = (out.losses * w).mean() * mb.loss_scale
            # Sums over the real pairs: the actor divides by the real pair count of the whole batch.
            stats = {
                "pairs": w.sum(),
                # a fresh tensor, not ``loss``: Megatron divides the returned loss in place
                "loss": (out.losses.detach() * w).sum(),
                "reward_accuracy": ((out.chosen_rewards > out.rejected_rewards).float() * w).sum(),
                "reward_chosen": (out.chosen_rewards * w).sum(),
                "reward_rejected": (out.rejected_rewards * w).sum(),
                "reward_margin": ((out.chosen_rewards - out.rejected_rewards) * w).sum(),
                "logps_chosen": (logps[:k].detach() * w).sum(),
                "logps_rejected": (logps[k:].detach() * w).sum(),
                "response_tokens": (mb.response_lengths.to(w.device).float() * torch.cat([w, w])).sum(),
            }
            return loss, stats

        return nll, loss_func

    for c in chunks:
        c.train()
    return _schedule(chunks, data, len(data), seq_len, rows, forward_step, forward_only=False, collect=False)
