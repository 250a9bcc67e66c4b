"""megatron_spin.train.logprobs: label shift, position ids, masked sequence log-probs.

The end-to-end test needs no Megatron: a tiny random HF Llama (fp32) supplies logits, the
per-token NLL is taken with F.cross_entropy against ``shifted_labels``, and ``sequence_logps``
with a collated PreferenceBatch's loss_mask must equal the log-probs of exactly the response
tokens, computed independently by running each unpadded prompt + response on its own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_spin.pairs import PreferencePair, collate_pairs
from megatron_spin.train.logprobs import model_token_nll, position_ids, sequence_logps, shifted_labels

# ------------------------------------------------------------------------------ shifted_labels


def test_shifted_labels_values():
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    original = tokens.clone()
    labels = shifted_labels(tokens)
    assert torch.equal(labels, torch.tensor([[2, 3, 4, 0], [6, 7, 8, 0]]))
    assert labels.dtype == tokens.dtype and labels.shape == tokens.shape
    assert torch.equal(tokens, original)  # input untouched


def test_shifted_labels_single_column():
    assert torch.equal(shifted_labels(torch.tensor([[9], [3]])), torch.tensor([[0], [0]]))


def test_shifted_labels_match_batch_labels_where_masked():
    pairs = [PreferencePair("a", (5, 6), (7, 8, 9), (10,), 1.0, 0.0, None)]
    batch = collate_pairs(pairs, pad_id=3)
    labels = shifted_labels(batch.tokens)
    # Identical except the last column (a dummy 0 here, pad_id there), which is always masked.
    assert torch.equal(labels[:, :-1], batch.labels[:, :-1])
    assert torch.all(batch.loss_mask[:, -1] == 0)


# -------------------------------------------------------------------------------- position_ids


def test_position_ids():
    tokens = torch.zeros(3, 5, dtype=torch.long)
    pos = position_ids(tokens)
    assert pos.shape == (3, 5) and pos.dtype == torch.long and pos.device == tokens.device
    for row in pos:
        assert torch.equal(row, torch.arange(5))


def test_model_token_nll_passes_shifted_labels_and_positions():
    calls = {}

    def fake_model(tokens, pos, attention_mask=None, labels=None):
        calls.update(tokens=tokens, pos=pos, attention_mask=attention_mask, labels=labels)
        return torch.ones_like(tokens, dtype=torch.float32)

    tokens = torch.tensor([[4, 5, 6], [7, 8, 9]])
    out = model_token_nll(fake_model, tokens)
    assert out.shape == tokens.shape
    assert calls["tokens"] is tokens and calls["attention_mask"] is None
    assert torch.equal(calls["pos"], position_ids(tokens))
    assert torch.equal(calls["labels"], shifted_labels(tokens))


# ------------------------------------------------------------------------------ sequence_logps


def test_sequence_logps_hand_values():
    token_nll = torch.tensor([[0.5, 1.0, 2.0, 4.0], [0.25, 0.125, 8.0, 16.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    logps = sequence_logps(token_nll, mask)
    assert logps.shape == (2,) and logps.dtype == torch.float32
    torch.testing.assert_close(logps, torch.tensor([-3.0, -16.25]), rtol=0, atol=0)
    logps.sum().backward()
    torch.testing.assert_close(token_nll.grad, -mask, rtol=0, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float16, torch.float64])
def test_sequence_logps_mask_dtypes(mask_dtype):
    token_nll = torch.tensor([[1.5, 2.5, 3.5]])
    mask = torch.tensor([[1, 0, 1]]).to(mask_dtype)
    out = sequence_logps(token_nll, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-5.0]), rtol=0, atol=0)


def test_sequence_logps_low_precision_nll_sums_in_fp32():
    token_nll = torch.full((1, 4096), 0.1, dtype=torch.bfloat16)
    out = sequence_logps(token_nll, torch.ones(1, 4096))
    assert out.dtype == torch.float32
    expected = -(token_nll.float().sum())
    torch.testing.assert_close(out, expected.reshape(1))


def test_sequence_logps_all_zero_mask_is_zero_with_zero_grad():
    token_nll = torch.tensor([[0.3, 1.7, 2.2], [0.4, 0.5, 0.6]], requires_grad=True)
    mask = torch.zeros(2, 3)
    logps = sequence_logps(token_nll, mask)
    assert torch.equal(logps, torch.zeros(2))  # exactly 0, not NaN
    logps.sum().backward()
    assert torch.isfinite(token_nll.grad).all()
    assert torch.equal(token_nll.grad, torch.zeros(2, 3))


def test_sequence_logps_one_row_all_masked():
    token_nll = torch.tensor([[0.3, 1.7, 2.2], [0.4, 0.5, 0.6]], requires_grad=True)
    mask = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    logps = sequence_logps(token_nll, mask)
    torch.testing.assert_close(logps, torch.tensor([0.0, -1.1]))
    # A loss built from a mean over rows stays finite too.
    (logps.mean()).backward()
    assert torch.isfinite(token_nll.grad).all()
    torch.testing.assert_close(token_nll.grad, -mask / 2)


# ----------------------------------------------------------------- end to end with a tiny HF Llama

VOCAB = 128
PAD = 0


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    return model


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=position_ids(tokens)).logits.float()


_REFERENCE_CACHE: dict = {}


def _reference_response_logp(model, prompt, response) -> float:
    """Sum of log p(response_t | prompt, response_<t) from the unpadded sequence alone."""
    key = (id(model), tuple(prompt), tuple(response))
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = _reference_uncached(model, prompt, response)
    return _REFERENCE_CACHE[key]


def _reference_uncached(model, prompt, response) -> float:
    seq = torch.tensor([list(prompt) + list(response)])
    logp = torch.log_softmax(_logits(model, seq)[0], dim=-1)  # [L, V]
    start = len(prompt)
    # Position t - 1 predicts token t; the response tokens are seq[start:].
    return sum(logp[t - 1, seq[0, t]].item() for t in range(start, seq.shape[1]))


def _pairs():
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return tuple(int(x) for x in torch.randint(1, VOCAB, (n,), generator=g))

    # Varied prompt/response lengths (incl. 1-token prompt and 1-token response).
    shapes = [(3, 5, 2), (1, 4, 6), (6, 1, 3), (2, 7, 7)]
    return [
        PreferencePair(f"p{i}", ids(lp), ids(lc), ids(lr), 1.0, 0.0, None)
        for i, (lp, lc, lr) in enumerate(shapes)
    ]


@pytest.mark.parametrize("pad_to_multiple_of", [1, 8])
def test_sequence_logps_matches_hf_llama(tiny_llama, pad_to_multiple_of):
    pairs = _pairs()
    batch = collate_pairs(pairs, pad_id=PAD, pad_to_multiple_of=pad_to_multiple_of)
    p = batch.num_pairs

    logits = _logits(tiny_llama, batch.tokens)  # [2P, S, V]
    token_nll = F.cross_entropy(
        logits.reshape(-1, VOCAB), shifted_labels(batch.tokens).reshape(-1), reduction="none"
    ).view_as(batch.tokens)
    logps = sequence_logps(token_nll, batch.loss_mask)  # [2P]
    assert logps.shape == (2 * p,)

    expected = torch.tensor(
        [_reference_response_logp(tiny_llama, pair.prompt_ids, pair.chosen_ids) for pair in pairs]
        + [_reference_response_logp(tiny_llama, pair.prompt_ids, pair.rejected_ids) for pair in pairs]
    )
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-4)
    assert torch.all(logps < 0)

    # The same through log_softmax + gather on the padded batch (the masked-sum identity).
    gathered = torch.log_softmax(logits, -1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps, (gathered * batch.loss_mask).sum(-1), rtol=1e-5, atol=1e-4)

    # Counting: the mask selects exactly the response tokens of each row.
    assert torch.equal(batch.loss_mask.sum(-1).long(), batch.response_lengths)


def test_sequence_logps_matches_hf_llama_after_truncation(tiny_llama):
    pairs = _pairs()
    max_length = 7
    batch = collate_pairs(pairs, pad_id=PAD, max_length=max_length, truncate="right")
    logits = _logits(tiny_llama, batch.tokens)
    token_nll = F.cross_entropy(logits.transpose(1, 2), shifted_labels(batch.tokens), reduction="none")
    logps = sequence_logps(token_nll, batch.loss_mask)

    def kept(prompt, response):
        return response[: max_length - len(prompt)]

    expected = torch.tensor(
        [_reference_response_logp(tiny_llama, q.prompt_ids, kept(q.prompt_ids, q.chosen_ids)) for q in pairs]
        + [_reference_response_logp(tiny_llama, q.prompt_ids, kept(q.prompt_ids, q.rejected_ids)) for q in pairs]
    )
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-4)


def test_sequence_logps_gradient_flows_only_through_response_tokens(tiny_llama):
    # d logp / d logits is zero at every prompt and padding position.
    pairs = _pairs()[:2]
    batch = collate_pairs(pairs, pad_id=PAD)
    logits = _logits(tiny_llama, batch.tokens).requires_grad_(True)
    token_nll = F.cross_entropy(logits.transpose(1, 2), shifted_labels(batch.tokens), reduction="none")
    sequence_logps(token_nll, batch.loss_mask).sum().backward()
    per_position = logits.grad.abs().sum(-1)  # [2P, S]
    assert torch.all(per_position[batch.loss_mask == 0] == 0)
    assert torch.all(per_position[batch.loss_mask == 1] > 0)
