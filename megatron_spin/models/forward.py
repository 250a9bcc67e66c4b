"""Forward passes over a TP × PP (× virtual PP) model with Megatron's pipeline schedules.

``forward_logits`` is the reference-style forward used by parity checks: it returns the full
vocabulary logits on the last pipeline stage (gathering the TP vocab shards, which training
code must never do — log-probs there are computed vocab-parallel).
"""

from __future__ import annotations

from typing import Optional

import torch


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """``[n, S]`` positions 0..S-1 (right-padded batches: padding never precedes a token)."""
    n, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(n, s)


def _true_vocab_size(chunk, default: int) -> int:
    """The builder's ``true_vocab_size`` of a chunk, through DDP / Float16 wrappers (``.module``)."""
    while not hasattr(chunk, "true_vocab_size") and hasattr(chunk, "module"):
        chunk = chunk.module
    return getattr(chunk, "true_vocab_size", default)


def _config(chunk):
    """The TransformerConfig of a chunk, through DDP / Float16 wrappers."""
    while not hasattr(chunk, "config") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk.config


def forward_logits(chunks: list, pctx, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits ``[b, s, vocab]`` (fp32) on the last PP stage; ``None`` on other stages.

    ``vocab`` is the true vocabulary: a model padded for TP (``builder.build_model``) computes
    -inf logits for the padded ids, and they are cut off here, so callers compare with HF as is.

    Right-padded or unpadded batches only: attention is causal without a padding mask, so
    padding after a sequence's last token cannot change that sequence's logits.  That is also
    how a model under sequence parallelism (MoE at TP > 1 with TE) gets a length TP divides:
    the batch is right-padded to a multiple of TP and the logits cut back to ``s``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = input_ids.shape
    if _config(chunks[0]).sequence_parallel and s % pctx.layout.tp:
        pad = pctx.layout.tp - s % pctx.layout.tp
        input_ids = torch.cat([input_ids, input_ids.new_zeros(b, pad)], dim=1)
        logits = forward_logits(chunks, pctx, input_ids)
        return None if logits is None else logits[:, :s].contiguous()
    captured: list[torch.Tensor] = []
    # One sequence per micro-batch: the interleaved schedule needs several micro-batches.
    micro = list(input_ids.split(1, dim=0))

    def forward_step(data_iterator, model):
        ids = next(data_iterator).to(next(model.parameters()).device)
        output = model(ids, position_ids(ids), attention_mask=None)

        def collect(output_tensor):
            # output_tensor: [b, s, vocab/TP] on the last stage
            captured.append(gather_from_tensor_model_parallel_region(output_tensor).float().cpu())
            return output_tensor.sum() * 0.0, {}

        return output, collect

    data = [iter(micro) for _ in chunks]
    for c in chunks:
        c.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data if len(chunks) > 1 else data[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro),
            seq_length=s,
            micro_batch_size=1,
            forward_only=True,
        )
    if not captured:
        return None
    logits = torch.cat(captured, dim=0)  # [b, s, V_pad]
    true_vocab = _true_vocab_size(chunks[-1], logits.shape[-1])
    return logits[..., :true_vocab].contiguous() if true_vocab < logits.shape[-1] else logits
