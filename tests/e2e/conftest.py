"""Fixtures shared by the e2e tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_chat_model(smollm2_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template: real prompts, steps in seconds."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("online") / "tiny"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out
