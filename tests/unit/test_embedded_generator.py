"""megatron_spin.rollout.embedded.generator: batched sampling over a tiny random HF model.

References are independent of the generator: ``model.generate`` on each unpadded prompt for
greedy decoding, and one plain full-sequence forward of ``prompt + output`` for log-probs and
for checking that sampled tokens lie inside the top-k / top-p sets.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_spin.rollout.embedded.generator import GenerationJob, HFGenerator, _plan_batches
from megatron_spin.rollout.protocol import SamplingParams
from tests.conftest import make_tiny_hf

EOS = 2  # LlamaConfig / Qwen2Config default
PROMPTS = [(5, 17, 99), (40, 41, 42, 43, 44, 45, 46, 47, 48), (200, 3, 77, 150, 9)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {f: make_tiny_hf(root / f, family=f, seed=3) for f in ("llama", "qwen2")}


def load(path, attn="eager"):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def llama(model_dirs):
    return load(model_dirs["llama"])


def greedy(max_new=12, **kw):
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, **kw)


def full_logprobs(model, ids):
    """(T-1,) log p(ids[t] | ids[:t]) for t >= 1 from one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # (T, V)


# ------------------------------------------------------------------------------ greedy / padding


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_matches_hf_generate_in_padded_batch(model_dirs, family, attn):
    model = load(model_dirs[family], attn)
    outs = HFGenerator(model, [EOS]).run([GenerationJob(p, greedy()) for p in PROMPTS])
    for prompt, out in zip(PROMPTS, outs):
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS)
        assert out.output_ids == tuple(ref[0, len(prompt):].tolist())
        assert out.finish_reason == ("stop" if out.output_ids[-1] == EOS else "length")
        assert out.output_logprobs is None and out.input_logprobs is None
    assert any(len(o.output_ids) == 12 for o in outs)  # the comparison covers real decoding


def test_top_k_1_and_tiny_top_p_equal_greedy(llama):
    gen = HFGenerator(llama, [EOS])
    ref = [o.output_ids for o in gen.run([GenerationJob(p, greedy()) for p in PROMPTS])]
    for params in (SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=1),
                   SamplingParams(max_new_tokens=12, temperature=1.5, top_p=1e-6)):
        assert [o.output_ids for o in gen.run([GenerationJob(p, params) for p in PROMPTS])] == ref


def test_sub_batch_split_gives_same_outputs(llama):
    jobs = [GenerationJob(p, greedy()) for p in PROMPTS * 2]
    assert _plan_batches(jobs, 25) == [[0], [1], [2], [3], [4], [5]]
    assert _plan_batches(jobs, 40) == [[0, 1], [2, 3], [4, 5]]
    whole = HFGenerator(llama, [EOS]).run(jobs)
    split = HFGenerator(llama, [EOS], max_batch_tokens=40).run(jobs)
    assert [o.output_ids for o in split] == [o.output_ids for o in whole]
    assert whole[:3] == whole[3:]


# ------------------------------------------------------------------------------ log-probs


@pytest.mark.parametrize("params", [greedy(16), SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9)])
def test_output_logprobs_match_full_forward(llama, params):
    outs = HFGenerator(llama, [EOS]).run([GenerationJob(p, params, return_logprob=True) for p in PROMPTS])
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.output_logprobs) == len(out.output_ids) > 0 and out.input_logprobs is None
        ref = full_logprobs(llama, list(prompt + out.output_ids))[len(prompt) - 1:]
        torch.testing.assert_close(torch.tensor(out.output_logprobs), ref, atol=1e-5, rtol=0)


def test_input_logprobs_scoring(llama):
    seqs = [PROMPTS[0] + PROMPTS[1], PROMPTS[2]]
    jobs = [GenerationJob(seqs[0], greedy(0), return_logprob=True, logprob_start_len=0),
            GenerationJob(seqs[1], greedy(0), return_logprob=True, logprob_start_len=2),
            GenerationJob(seqs[1], greedy(5), return_logprob=True, logprob_start_len=0)]
    outs = HFGenerator(llama, [EOS]).run(jobs)
    for out in outs[:2]:
        assert out.output_ids == () and out.output_logprobs == () and out.finish_reason == "length"
    ref0, ref1 = full_logprobs(llama, list(seqs[0])), full_logprobs(llama, list(seqs[1]))
    assert len(outs[0].input_logprobs) == len(seqs[0]) and outs[0].input_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(outs[0].input_logprobs[1:]), ref0, atol=1e-5, rtol=0)
    assert len(outs[1].input_logprobs) == len(seqs[1]) - 2
    torch.testing.assert_close(torch.tensor(outs[1].input_logprobs), ref1[1:], atol=1e-5, rtol=0)
    assert len(outs[2].input_logprobs) == len(seqs[1]) and outs[2].input_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(outs[2].input_logprobs[1:]), ref1, atol=1e-5, rtol=0)
    assert len(outs[2].output_ids) > 0
    # Nothing to compute at all: no forward, still well-formed.
    empty = HFGenerator(llama, [EOS]).run([GenerationJob(seqs[1], greedy(0))])[0]
    assert empty.output_ids == () and empty.finish_reason == "length" and empty.input_logprobs is None


def test_abandoned_rows_stop_and_the_others_are_unchanged(llama):
    """A job whose caller has gone ends "abort" where it is noticed; its neighbours are unaffected,
    and a sub-batch nobody waits for is not started."""
    gen = HFGenerator(llama, [EOS])
    jobs = [GenerationJob(p, greedy(10, ignore_eos=True)) for p in PROMPTS]
    reference = gen.run(jobs)
    asked = []

    def gone_after_three_steps(job):  # asked before the prefill and before every decode step
        asked.append(job)
        return job == 1 and asked.count(1) > 3

    outs = gen.run(jobs, gone_after_three_steps)
    assert outs[1].finish_reason == "abort" and len(outs[1].output_ids) == 3
    assert outs[1].output_ids == reference[1].output_ids[:3]
    assert [outs[0], outs[2]] == [reference[0], reference[2]]
    split = HFGenerator(llama, [EOS], max_batch_tokens=20)  # one job per sub-batch
    outs = split.run(jobs, lambda job: job != 2)
    assert [o.finish_reason for o in outs] == ["abort", "abort", "length"] and outs[2] == reference[2]
    assert outs[0].output_ids == outs[1].output_ids == ()


# ------------------------------------------------------------------------------ sampling


def test_seed_reproducible_regardless_of_batch(llama):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=123)
    gen = HFGenerator(llama, [EOS])
    alone = gen.run([GenerationJob(PROMPTS[2], params)])[0]
    others = [GenerationJob(PROMPTS[1], SamplingParams(max_new_tokens=20, temperature=1.0)),
              GenerationJob(PROMPTS[0], SamplingParams(max_new_tokens=4, temperature=0.8, seed=9)),
              GenerationJob(PROMPTS[1], greedy(30))]
    batched = gen.run(others[:2] + [GenerationJob(PROMPTS[2], params)] + others[2:])[2]
    assert batched == alone and len(alone.output_ids) > 3
    other_seed = gen.run([GenerationJob(PROMPTS[2], dataclasses.replace(params, seed=124))])[0]
    assert other_seed.output_ids != alone.output_ids


def test_sampled_tokens_stay_inside_top_k_and_top_p(llama):
    gen = HFGenerator(llama, [EOS])
    for params in (SamplingParams(max_new_tokens=24, temperature=2.0, top_k=3, ignore_eos=True, seed=5),
                   SamplingParams(max_new_tokens=24, temperature=2.0, top_p=0.3, ignore_eos=True, seed=5)):
        outs = gen.run([GenerationJob(p, params) for p in PROMPTS])
        for prompt, out in zip(PROMPTS, outs):
            logits = full_logits(llama, list(prompt + out.output_ids))[len(prompt) - 1:-1] / params.temperature
            order = logits.argsort(-1, descending=True)  # (T, V)
            rank = (order == torch.tensor(out.output_ids)[:, None]).float().argmax(-1)  # (T,)
            if params.top_k > 0:
                assert rank.max() < params.top_k
            else:
                probs = torch.softmax(logits, -1).gather(1, order)
                mass_before = (probs.cumsum(-1) - probs).gather(1, rank[:, None])[:, 0]
                assert (mass_before < params.top_p).all()
            assert len(set(out.output_ids)) > 1  # really sampled, not stuck on the argmax


# ------------------------------------------------------------------------------ stopping


def test_stop_token_ends_row_and_is_kept(llama):
    gen = HFGenerator(llama, [EOS])
    ref = gen.run([GenerationJob(PROMPTS[1], greedy(12, ignore_eos=True))])[0].output_ids
    stop = ref[3]
    k = ref.index(stop)
    # Batched with a longer row: the stopped row stays frozen while the other decodes on.
    other = GenerationJob(PROMPTS[0], greedy(12), return_logprob=True)
    out, longer = gen.run([GenerationJob(PROMPTS[1], greedy(12, ignore_eos=True, stop_token_ids=(stop,))), other])
    assert out.output_ids == ref[:k + 1] and out.finish_reason == "stop"
    solo = gen.run([other])[0]
    assert longer.output_ids == solo.output_ids and len(longer.output_ids) > k + 1
    torch.testing.assert_close(torch.tensor(longer.output_logprobs), torch.tensor(solo.output_logprobs),
                               atol=1e-5, rtol=0)


def test_eos_min_new_tokens_ignore_eos_and_length(llama):
    first = HFGenerator(llama, [EOS]).run([GenerationJob(PROMPTS[0], greedy(8))])[0].output_ids[0]
    gen = HFGenerator(llama, [first])  # the model's first greedy token is now its eos
    out = gen.run([GenerationJob(PROMPTS[0], greedy(8))])[0]
    assert out.output_ids == (first,) and out.finish_reason == "stop"
    out = gen.run([GenerationJob(PROMPTS[0], greedy(8, min_new_tokens=4), return_logprob=True)])[0]
    assert len(out.output_ids) >= 4 and first not in out.output_ids[:4]
    # Log-probs stay those of the unmasked model, even where eos was masked.
    ref = full_logprobs(llama, list(PROMPTS[0] + out.output_ids))[len(PROMPTS[0]) - 1:]
    torch.testing.assert_close(torch.tensor(out.output_logprobs), ref, atol=1e-5, rtol=0)
    sampled = gen.run([GenerationJob(PROMPTS[0], SamplingParams(max_new_tokens=8, min_new_tokens=8, seed=s,
                                                                 temperature=1.0)) for s in range(4)])
    assert all(first not in o.output_ids and o.finish_reason == "length" for o in sampled)
    out = gen.run([GenerationJob(PROMPTS[0], greedy(7, ignore_eos=True))])[0]
    assert len(out.output_ids) == 7 and out.output_ids[0] == first and out.finish_reason == "length"


def spelled(ids) -> str:
    """A detokenizer for the tokenizer-less test model: every id spells itself, ``<id>``."""
    return "".join(f"<{t}>" for t in ids)


def test_stop_string_ends_row_at_the_token_that_completes_it(llama):
    gen = HFGenerator(llama, [EOS], detokenize=spelled)
    ref = gen.run([GenerationJob(PROMPTS[1], greedy(12, ignore_eos=True))])[0].output_ids
    stop = f"{ref[4]}><{ref[5]}"  # spans two tokens, and starts inside the first of them
    k = next(i for i in range(len(ref)) if stop in spelled(ref[:i + 1]))
    other = GenerationJob(PROMPTS[0], greedy(12, ignore_eos=True))
    out, longer = gen.run([GenerationJob(PROMPTS[1], greedy(12, ignore_eos=True, stop=(stop, "never"))), other])
    assert out.output_ids == ref[:k + 1] and out.finish_reason == "stop" and k <= 5
    assert longer == gen.run([other])[0]  # its neighbour decodes on, unchanged
    unmatched = gen.run([GenerationJob(PROMPTS[1], greedy(12, ignore_eos=True, stop=("never",)))])[0]
    assert unmatched.output_ids == ref and unmatched.finish_reason == "length"
    # Not before min_new_tokens: the string in the first token ends the row at the first check after them.
    early = f"<{ref[0]}>"
    held = gen.run([GenerationJob(PROMPTS[1], greedy(12, ignore_eos=True, min_new_tokens=3, stop=(early,)))])[0]
    assert held.output_ids == ref[:4] and held.finish_reason == "stop"
    with pytest.raises(ValueError, match="detokenize"):
        HFGenerator(llama, [EOS]).run([GenerationJob(PROMPTS[1], greedy(4, stop=("x",)))])


def test_top_logprobs_are_the_best_tokens_of_the_same_distribution(llama):
    """Output and prompt positions: the k best (token, log-prob) pairs of the full forward, best
    first; at temperature 0 the chosen token is the best one with exactly its log-prob."""
    gen = HFGenerator(llama, [EOS])
    job = GenerationJob(PROMPTS[1], greedy(6, ignore_eos=True), return_logprob=True, logprob_start_len=0,
                        top_logprobs_num=3)
    out = gen.run([job, GenerationJob(PROMPTS[0], greedy(6), return_logprob=True)])[0]
    seq = list(PROMPTS[1] + out.output_ids)
    logp = torch.log_softmax(full_logits(llama, seq)[:-1], -1)  # (T-1, V): row t predicts seq[t+1]
    ref_values, ref_ids = logp.topk(3, -1)
    assert len(out.output_top_logprobs) == len(out.output_ids) == 6
    for i, (tok, lp, top) in enumerate(zip(out.output_ids, out.output_logprobs, out.output_top_logprobs)):
        assert top[0] == (tok, lp)  # greedy: identical floats, what lm-eval's is_greedy compares
        row = len(PROMPTS[1]) - 1 + i
        assert [t for t, _ in top] == ref_ids[row].tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), ref_values[row], atol=1e-5, rtol=0)
    assert out.input_top_logprobs[0] is None and len(out.input_top_logprobs) == len(PROMPTS[1])
    for p, top in enumerate(out.input_top_logprobs[1:], start=1):
        assert [t for t, _ in top] == ref_ids[p - 1].tolist()
    plain = gen.run([GenerationJob(PROMPTS[0], greedy(3), return_logprob=True)])[0]
    assert plain.output_top_logprobs is None and plain.input_top_logprobs is None


def test_on_token_hears_every_token_of_every_job_in_order(llama):
    gen = HFGenerator(llama, [EOS], max_batch_tokens=20)  # one job per sub-batch: job indices are global
    jobs = [GenerationJob(p, greedy(5, ignore_eos=True)) for p in PROMPTS]
    heard: dict[int, list[int]] = {}
    outs = gen.run(jobs, on_token=lambda job, tok: heard.setdefault(job, []).append(tok))
    assert {j: tuple(t) for j, t in heard.items()} == {j: o.output_ids for j, o in enumerate(outs)}


def test_inversion_sampling_draws_from_the_distribution():
    """The sampler's frequencies over 40 000 draws match ``p`` (Pearson chi-square below the 0.999
    quantile for 5 degrees of freedom, 20.5), tokens of probability 0 are never drawn, and an
    unnormalised row samples as its normalisation does."""
    from megatron_spin.rollout.embedded.generator import _sample_by_inversion

    p = torch.tensor([0.0, 0.05, 0.25, 0.0, 0.1, 0.4, 0.15, 0.05, 0.0])
    rows, reps = 8, 5000
    probs = torch.stack([p if i % 2 else 3.0 * p for i in range(rows)])  # (8, 9), half unnormalised
    gens = [torch.Generator().manual_seed(100 + i) for i in range(rows)]
    draws = torch.stack([_sample_by_inversion(probs, gens) for _ in range(reps)])  # (reps, 8)
    counts = torch.bincount(draws.flatten(), minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0
    expected = p[p > 0].double() * rows * reps
    chi2 = ((counts[p > 0] - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, (counts.tolist(), chi2)
    # the same generator state gives the same token whatever the other rows hold
    a = _sample_by_inversion(probs[:1], [torch.Generator().manual_seed(7)])
    b = _sample_by_inversion(probs.flip(0)[:3], [torch.Generator().manual_seed(s) for s in (1, 2, 7)][::-1])
    assert a.item() == b[0].item()
