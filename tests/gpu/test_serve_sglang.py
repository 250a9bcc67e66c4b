"""GPU tier: ``megatron-spin-serve --engine sglang`` answers the same OpenAI client code as the
embedded engine (tests/e2e/test_serve.py).  Skipped without CUDA and the ``sglang`` package.
UNVERIFIED: no GPU has run this file.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.e2e.test_serve import start_serve, stop_serve

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("sglang") is None,
                       reason="needs CUDA and sglang (pip install .[sglang])"),
]


def test_serve_starts_sglang_and_answers_the_openai_client(smollm2_dir):
    import openai

    proc, url, key, lines = start_serve(smollm2_dir, "--engine", "sglang", "--dtype", "bfloat16",
                                        "--served-model-name", "smollm2")
    try:
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        assert "smollm2" in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(model="smollm2", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say hello."}])
        assert reply.choices[0].message.content and reply.usage.total_tokens > reply.usage.prompt_tokens
        echoed = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=0, echo=True,
                                           logprobs=1, temperature=0)
        assert echoed.choices[0].logprobs.token_logprobs[0] is None
        assert all(lp <= 0 for lp in echoed.choices[0].logprobs.token_logprobs[1:])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    finally:
        assert stop_serve(proc) == 0, "".join(lines)
