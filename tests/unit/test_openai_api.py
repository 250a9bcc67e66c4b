"""The embedded engine's OpenAI surface, in-process: request parsing (what is accepted, what is
refused and with which ``param``) and reply building (stop cuts, log-prob objects, streamed text).

The tokenizer is a real HF fast tokenizer built here: byte-level with no merges, so every byte
is a token and a character like ``é`` or ``€`` spans several tokens — the case incremental
detokenisation and text offsets must get right.  Its chat template is a one-liner.
"""

from __future__ import annotations

import pytest

from megatron_spin.rollout import protocol as P
from megatron_spin.rollout.embedded import openai_replies as R
from megatron_spin.rollout.embedded.openai_requests import OpenAIRequestError, parse_chat, parse_completion

CONTEXT = 64
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|end|>"] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|end|>")
    fast.chat_template = TEMPLATE
    return fast


def ids(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text)["input_ids"])


# --------------------------------------------------------------------------- completions requests


def test_completion_prompt_in_all_four_forms(tok):
    for prompt, expect in [("ab", (ids(tok, "ab"),)), (["ab", "c"], (ids(tok, "ab"), ids(tok, "c"))),
                           ([5, 6], ((5, 6),)), ([[5], [6, 7]], ((5,), (6, 7)))]:
        req = parse_completion({"prompt": prompt, "echo": True}, tok, CONTEXT)
        assert req.generate.input_ids == expect
    req = parse_completion({"prompt": [list(ids(tok, "hé"))], "echo": True}, tok, CONTEXT)
    assert req.echo_texts == ("hé",)  # token-id prompts are echoed decoded


def test_completion_defaults_and_what_echo_with_logprobs_asks(tok):
    req = parse_completion({"prompt": "x"}, tok, CONTEXT)
    s = req.generate.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.n, s.seed, s.stop) == (16, 1.0, 1.0, 1, None, ())
    assert not req.generate.return_logprob and req.logprobs is None and not req.stream and req.echo_texts is None
    scored = parse_completion({"prompt": "xy", "echo": True, "logprobs": 2, "max_tokens": 0}, tok, CONTEXT)
    g = scored.generate
    assert (g.return_logprob, g.logprob_start_len, g.top_logprobs_num, g.sampling.max_new_tokens) == (True, 0, 2, 0)
    plain = parse_completion({"prompt": "xy", "logprobs": 0, "stop": "\n", "seed": 4, "n": 3}, tok, CONTEXT)
    assert plain.generate.logprob_start_len == -1 and plain.logprobs == 0 and plain.stop == ("\n",)
    assert (plain.generate.sampling.seed, plain.generate.sampling.n) == (4, 3)


@pytest.mark.parametrize("extra, param", [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"5": 100}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"regex": "a+"}, "regex"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"min_tokens": 2}, "min_tokens"),
    ({"guided_json": {}}, "guided_json"),  # unknown fields are refused, as OpenAI refuses them
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 60}, "max_tokens"),  # prompt + max_tokens beyond the context
    ({"seed": 2**63}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"top_k": 0}, "top_k"),
    ({"echo": "yes"}, "echo"),
    ({"stream": True, "logprobs": 1}, "logprobs"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1], [-2]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
])
def test_completion_refusals_name_the_field(tok, extra, param):
    with pytest.raises(OpenAIRequestError) as info:
        parse_completion({"prompt": "hello", "max_tokens": 4, **extra}, tok, CONTEXT)
    assert info.value.param == param and str(info.value).startswith(P.COMPLETIONS)


def test_neutral_and_harmless_fields_are_accepted(tok):
    req = parse_completion({"prompt": "x", "model": "any", "user": "u", "presence_penalty": 0, "frequency_penalty": 0.0,
                            "logit_bias": {}, "best_of": 2, "n": 2, "suffix": None, "stream": False,
                            "stream_options": {"include_usage": True}, "top_k": 5, "ignore_eos": True,
                            "stop_token_ids": [3]}, tok, CONTEXT)
    s = req.generate.sampling
    assert (s.n, s.top_k, s.ignore_eos, s.stop_token_ids) == (2, 5, True, (3,))


def test_a_model_without_a_tokenizer_is_told_to_use_generate():
    with pytest.raises(OpenAIRequestError, match="no tokenizer"):
        parse_completion({"prompt": [1, 2]}, None, CONTEXT)
    with pytest.raises(OpenAIRequestError, match="body must be a JSON object"):
        parse_completion([1, 2], None, CONTEXT)


# --------------------------------------------------------------------------- chat requests


def test_chat_renders_the_template_and_defaults_to_the_rest_of_the_context(tok):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    req = parse_chat({"messages": messages, "logprobs": True, "top_logprobs": 2}, tok, CONTEXT)
    expect = ids(tok, "<system>Be brief.<user>Hi there<assistant>")  # developer is OpenAI's new name for system
    assert req.generate.input_ids == (expect,)
    assert req.generate.sampling.max_new_tokens == CONTEXT - len(expect)
    assert (req.logprobs, req.generate.top_logprobs_num, req.generate.return_logprob) == (2, 2, True)
    both = parse_chat({"messages": messages, "max_tokens": 5, "max_completion_tokens": 3}, tok, CONTEXT)
    assert both.generate.sampling.max_new_tokens == 3 and both.logprobs is None


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True, "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 70}]}, "messages"),  # fills the context
])
def test_chat_refusals_name_the_field(tok, body, param):
    with pytest.raises(OpenAIRequestError) as info:
        parse_chat(body, tok, CONTEXT)
    assert info.value.param == param and str(info.value).startswith(P.CHAT_COMPLETIONS)


def test_chat_needs_a_template_and_reports_the_templates_own_refusal(tok):
    hi = {"messages": [{"role": "user", "content": "hi"}]}
    saved = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(OpenAIRequestError, match="no chat template") as info:
            parse_chat(hi, tok, CONTEXT)
        assert info.value.param == "messages"
        tok.chat_template = "{{ raise_exception('roles must alternate') }}"
        with pytest.raises(OpenAIRequestError, match="roles must alternate"):
            parse_chat(hi, tok, CONTEXT)
    finally:
        tok.chat_template = saved


# --------------------------------------------------------------------------- replies


def test_text_pieces_release_a_split_character_once_complete(tok):
    pieces = R.TextPieces(tok)
    out = [pieces.push(t) for t in ids(tok, "hé€!")]
    assert out == ["h", "", "é", "", "", "€", "!"] and pieces.text == "hé€!"
    assert R.token_offsets(tok, ids(tok, "hé€!"), 4) == [0, 1, 1, 2, 2, 2, 3]


def make_completion(tok, text: str, prompt: tuple[int, ...] = (1,), **kw) -> P.Completion:
    out = ids(tok, text)
    return P.Completion(0, 0, out, kw.pop("finish_reason", "length"), "v7", len(prompt),
                        output_logprobs=tuple(-0.1 * (i + 1) for i in range(len(out))), **kw)


def test_a_stop_string_cuts_the_text_and_the_tokens_inside_it(tok):
    c = make_completion(tok, "ab€STOPcd", finish_reason="stop")
    ct = R.choice_text(tok, c, ("STOP", "never"))
    assert (ct.text, ct.finish_reason) == ("ab€", "stop")
    assert ct.kept == 5 and ct.offsets == (0, 1, 2, 2, 2)  # a, b and the three bytes of €; not S,T,O,P,c,d
    earliest = R.choice_text(tok, c, ("cd", "€"))
    assert earliest.text == "ab" and earliest.kept == 2  # the first occurrence of any stop string wins
    untouched = R.choice_text(tok, c, ())
    assert untouched.text == "ab€STOPcd" and untouched.kept == len(c.output_ids) and untouched.finish_reason == "stop"


def test_completion_reply_with_echo_and_logprobs_has_openais_shape(tok):
    prompt = ids(tok, "Hi")
    req = parse_completion({"prompt": "Hi", "echo": True, "logprobs": 1, "max_tokens": 3}, tok, CONTEXT)
    c = make_completion(tok, "yo!", prompt, input_logprobs=(None, -1.5),
                        input_top_logprobs=(None, ((prompt[1], -1.5),)),
                        output_top_logprobs=tuple(((t, -0.1 * (i + 1)),) for i, t in enumerate(ids(tok, "yo!"))))
    body = R.completion_reply(tok, req, [[c]], "tiny")
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == "Hiyo!" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert lp["tokens"] == ["H", "i", "y", "o", "!"] and lp["token_logprobs"][:2] == [None, -1.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"i": -1.5}
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert body["metadata"] == {"weight_version": "v7"}
    no_top = parse_completion({"prompt": "Hi", "logprobs": 0, "max_tokens": 3}, tok, CONTEXT)
    lp0 = R.completion_reply(tok, no_top, [[make_completion(tok, "yo!", prompt)]], "tiny")["choices"][0]["logprobs"]
    assert lp0["top_logprobs"] == [{}, {}, {}] and lp0["text_offset"] == [0, 1, 2]


def test_chat_reply_logprobs_list_the_kept_tokens_with_bytes(tok):
    req = parse_chat({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1,
                      "stop": "!"}, tok, CONTEXT)
    out = ids(tok, "é!x")
    c = make_completion(tok, "é!x", finish_reason="stop", output_top_logprobs=tuple(((t, -1.0),) for t in out))
    body = R.chat_reply(tok, req, [[c]], "tiny")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "é"} and choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert len(content) == 2  # the two bytes of é; "!" and "x" are cut
    assert content[0]["bytes"] == list("\ufffd".encode()) and len(content[0]["top_logprobs"]) == 1


def test_streamed_text_holds_back_what_may_start_a_stop_string(tok):
    s = R.StreamedText(tok, ("STOP",))
    deltas = [s.push(t) for t in ids(tok, "go ST")]
    assert "".join(deltas) == "go "  # "ST" may be the start of STOP
    deltas += [s.push(t) for t in ids(tok, "AR é")]
    assert "".join(deltas) == "go STAR é"
    deltas += [s.push(t) for t in ids(tok, "STOPxyz")]
    final = R.choice_text(tok, make_completion(tok, "go STAR éSTOPxyz"), ("STOP",)).text
    deltas.append(s.finish(final))
    assert "".join(deltas) == final == "go STAR é"
