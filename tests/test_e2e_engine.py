"""End to end engine behaviour on CPU: n samples, seeds, sampling filters, stop conditions,
infeasible requests and the generate() contract. HF fp32 logits are the oracle for every
returned logprob."""

from __future__ import annotations

import io
import json
import shutil
import sys
import threading

import pytest
import torch
from transformers import AutoTokenizer

from rollout import LLM, SamplingParams
from rollout.errors import InvalidRequestError
from tests.helpers.hf_oracle import processed_logprobs, random_prompt

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics


def _llm(path, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 128)  # the CPU default would allocate up to 2 GiB
    return LLM(str(path), dtype="float32", **kwargs)


def _within(seconds: float, fn, *args):
    """Run ``fn`` in a daemon thread; fail instead of hanging the suite."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"generate did not finish within {seconds}s"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return _llm(llama_dir)


@pytest.fixture(scope="module")
def oracle(hf_oracles):
    return hf_oracles["llama"]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


# ---- n samples -------------------------------------------------------------------------
def test_n_samples_share_one_prefill(llm):
    prompt = random_prompt(40, seed=1)
    llm.reset_prefix_cache()
    before = llm.stats().prefix_cache_hit_blocks
    sp = SamplingParams(n=8, temperature=1.0, seed=5, max_tokens=6, logprobs=0, ignore_eos=True)
    (out,) = llm.generate([prompt], sp)
    assert len(out.outputs) == 8
    assert [c.index for c in out.outputs] == list(range(8))
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # The first sample prefills; the other 7 read its full blocks from the prefix cache
    # in the same step (the last, partial block and the last token are recomputed).
    assert llm.stats().prefix_cache_hit_blocks - before == 7 * ((len(prompt) - 1) // 16)
    assert out.num_cached_tokens == 0
    # Sample i is the request with seed + i.
    for i in (0, 3, 7):
        single = llm.generate([prompt], SamplingParams(temperature=1.0, seed=5 + i, max_tokens=6, logprobs=0, ignore_eos=True))
        assert single[0].outputs[0].token_ids == out.outputs[i].token_ids
        assert single[0].outputs[0].token_logprobs == pytest.approx(out.outputs[i].token_logprobs, abs=1e-5)


def test_n_greedy_samples_equal_hf(llm, oracle):
    prompt = random_prompt(37, seed=2)
    sp = SamplingParams(n=4, temperature=0, max_tokens=8, ignore_eos=True)
    (out,) = llm.generate([prompt], sp)
    expected = oracle.greedy(prompt, 8)
    assert [c.token_ids for c in out.outputs] == [expected] * 4


# ---- seeds -----------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(llm, llama_dir):
    prompt = random_prompt(20, seed=3)
    others = [random_prompt(20, seed=4), random_prompt(35, seed=5)]
    sp = SamplingParams(temperature=1.0, seed=42, max_tokens=12, logprobs=0, ignore_eos=True)
    ref = llm.generate([prompt], sp)[0].outputs[0]

    # Another instance, another engine seed, a small token budget and no prefix cache:
    # alone the prompt is one chunk, behind another prompt it is split in two (a discarded
    # chunk sample must not consume the request's generator).
    other_llm = _llm(llama_dir, seed=1234, max_num_batched_tokens=24, enable_prefix_caching=False)
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    seeded_other = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    batches = [
        ([prompt], [sp]),
        ([others[0], prompt, others[1]], [unseeded, sp, unseeded]),
        ([others[1], others[0], prompt], [seeded_other, unseeded, sp]),
        ([prompt, others[0]], [sp, unseeded]),
        ([prompt, prompt], [sp, sp]),  # each request has its own generator
    ]
    for prompts, params in batches:
        for engine in (llm, other_llm):
            outs = engine.generate(prompts, params)
            for out, params_i in zip(outs, params):
                if params_i is sp:
                    got = out.outputs[0]
                    assert got.token_ids == ref.token_ids
                    assert got.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-5)

    # Preempted mid-decode and recomputed in chunks: the same tokens still.
    tight = _llm(llama_dir, block_size=4, num_kv_blocks=14, max_num_batched_tokens=16, enable_prefix_caching=False)
    outs = tight.generate([others[1], others[0], prompt], [unseeded, unseeded, sp])
    assert tight.stats().num_preemptions > 0
    assert outs[2].outputs[0].token_ids == ref.token_ids
    assert outs[2].outputs[0].token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-5)

    diff = llm.generate([prompt], SamplingParams(temperature=1.0, seed=43, max_tokens=12, ignore_eos=True))
    assert diff[0].outputs[0].token_ids != ref.token_ids


def test_generate_leaves_global_rng_alone(llm):
    state = torch.get_rng_state()
    prompts = [random_prompt(9, seed=6), random_prompt(30, seed=7)]
    params = [
        SamplingParams(temperature=1.0, max_tokens=5),
        SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=5),
    ]
    llm.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), state)


# ---- sampling filters --------------------------------------------------------------------
FILTERS = [
    dict(temperature=0.8, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.7, min_p=0.05, top_k=20, top_p=0.9),
    dict(temperature=2.0, top_k=50, top_p=0.5),
    dict(temperature=0, top_k=3, top_p=0.9),  # greedy: untempered, after the same filters
]


def test_sampling_filters_logprobs_match_hf(llm, oracle):
    prompts = [random_prompt(n, seed=100 + n) for n in (5, 20, 33)]
    batch, params = [], []
    for i, kw in enumerate(FILTERS):
        for j, prompt in enumerate(prompts):
            batch.append(prompt)
            params.append(SamplingParams(**kw, seed=10 * i + j, max_tokens=8, logprobs=5, ignore_eos=True))
    outs = llm.generate(batch, params)  # every filter mix in one batch: per-row parameters
    num_checked = num_steps = 0
    for prompt, sp, out in zip(batch, params, outs):
        (comp,) = out.outputs
        assert len(comp.token_ids) == 8
        logits = oracle.logits(prompt + comp.token_ids)[len(prompt) - 1 : -1]  # [8, vocab]
        for tok, lp, step, row in zip(comp.token_ids, comp.token_logprobs, comp.logprobs, logits):
            ref, ambiguous = processed_logprobs(row, sp.temperature, sp.min_p, sp.top_k, sp.top_p)
            num_steps += 1
            if ambiguous:
                continue
            num_checked += 1
            assert ref[tok] > float("-inf"), f"sampled {tok} outside the allowed set for {sp}"
            assert lp == pytest.approx(float(ref[tok]), abs=1e-4), sp
            if sp.temperature == 0:
                assert tok == int(row.argmax())
            for tid, entry in step.items():  # top entries: allowed tokens only (top_k=3 < 5)
                assert ref[tid] > float("-inf") and entry.logprob == pytest.approx(float(ref[tid]), abs=1e-4)
    assert num_checked >= 0.9 * num_steps


# ---- stop conditions ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def greedy_run(llm, tok):
    """A prompt, its greedy continuation (24 tokens, ignore_eos) and that text."""
    prompt = tok("Once upon a time").input_ids
    ids = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].token_ids
    return prompt, ids, tok.decode(ids, skip_special_tokens=True)


def _stop_string(tok, ids: list[int]) -> str:
    """A printable ASCII string spanning two tokens of ``ids``, after the first few tokens."""
    for k in range(3, len(ids) - 1):
        pieces = [tok.decode([t]) for t in ids[k : k + 2]]
        if all(p.isascii() and p.isprintable() and p.strip() for p in pieces):
            return pieces[0][-1] + pieces[1]
    pytest.fail(f"no printable pair of tokens in {ids}")


def test_stop_string(llm, tok, greedy_run):
    prompt, ids, full_text = greedy_run
    stop = _stop_string(tok, ids)
    cut = full_text.index(stop)
    num_tokens = next(m for m in range(1, len(ids) + 1) if stop in tok.decode(ids[:m]))
    for include in (False, True):
        sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=["\x00never", stop],
                            include_stop_str_in_output=include)
        (comp,) = llm.generate([prompt], sp)[0].outputs
        assert comp.finish_reason == "stop"
        assert comp.stop_reason == stop
        assert comp.token_ids == ids[:num_tokens]
        assert comp.text == full_text[: cut + (len(stop) if include else 0)]


def test_stop_token_ids_and_min_tokens(llm, greedy_run):
    prompt, ids, _ = greedy_run
    k = next(k for k in range(3, len(ids)) if ids[k] not in ids[:k])
    stop_id = ids[k]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id])
    (comp,) = llm.generate([prompt], sp)[0].outputs
    assert (comp.token_ids, comp.finish_reason, comp.stop_reason) == (ids[: k + 1], "stop", stop_id)

    # min_tokens bans the stop token until that many tokens exist.
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=k + 2)
    (comp,) = llm.generate([prompt], sp)[0].outputs
    assert comp.token_ids[:k] == ids[:k]
    assert len(comp.token_ids) >= k + 2
    assert stop_id not in comp.token_ids[: k + 2]
    if comp.finish_reason == "stop":
        assert comp.token_ids[-1] == stop_id and comp.stop_reason == stop_id
    else:
        assert (comp.finish_reason, len(comp.token_ids)) == ("length", 24)


def test_eos_from_generation_config(llama_dir, tmp_path, llm, greedy_run):
    prompt, ids, _ = greedy_run
    k = next(k for k in range(3, len(ids)) if ids[k] not in ids[:k])
    # A copy of the model whose generation config names a token it emits greedily as EOS.
    model_dir = tmp_path / "eos_model"
    shutil.copytree(llama_dir, model_dir)
    gen_path = model_dir / "generation_config.json"
    gen_config = json.loads(gen_path.read_text())
    gen_config["eos_token_id"] = ids[k]
    gen_path.write_text(json.dumps(gen_config))
    eos_llm = _llm(model_dir, num_kv_blocks=16)

    def run(**kw):
        return eos_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, **kw))[0].outputs[0]

    comp = run()
    assert (comp.token_ids, comp.finish_reason, comp.stop_reason) == (ids[: k + 1], "stop", None)
    comp = run(ignore_eos=True)
    assert (comp.token_ids, comp.finish_reason) == (ids, "length")
    comp = run(min_tokens=k + 2)
    assert comp.token_ids[:k] == ids[:k] and ids[k] not in comp.token_ids[: k + 2]
    assert len(comp.token_ids) >= k + 2


def test_max_tokens_is_length(llm):
    (comp,) = llm.generate([random_prompt(5, seed=8)], SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True))[0].outputs
    assert (len(comp.token_ids), comp.finish_reason, comp.stop_reason) == (3, "length", None)


# ---- infeasible requests -----------------------------------------------------------------
def test_infeasible_requests_never_hang(llama_dir):
    small = _llm(llama_dir, num_kv_blocks=4)  # 64 tokens of KV in all
    capacity = 64
    sp = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    (out,) = _within(60, small.generate, [random_prompt(10, seed=9)], sp)
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == capacity

    # Several sequences that each grow to the whole cache: served one after another.
    prompts = [random_prompt(n, seed=10 + n) for n in (30, 20, 40)]
    outs = _within(60, small.generate, prompts, SamplingParams(temperature=1.0, max_tokens=None, ignore_eos=True))
    assert small.stats().num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].finish_reason == "length"
        assert len(prompt) + len(out.outputs[0].token_ids) == capacity

    # A prompt that fills the cache exactly still gets its one token; one more does not fit.
    (out,) = _within(60, small.generate, [random_prompt(capacity, seed=11)], sp)
    assert (len(out.outputs[0].token_ids), out.outputs[0].finish_reason) == (1, "length")
    with pytest.raises(InvalidRequestError):
        small.generate([random_prompt(5, seed=12), random_prompt(capacity + 1, seed=13)], sp)
    assert not small.has_unfinished_requests()  # validated before anything was queued

    (out,) = _within(60, small.generate, [random_prompt(7, seed=14)], SamplingParams(max_tokens=4))
    assert len(out.outputs[0].token_ids) <= 4 and out.finished
    small.worker.check_invariants()


def test_full_batches_again_and_again_free_their_rows(llama_dir):
    """Steps overlap, so the last step of a batch schedules nothing (its last tokens are in
    flight): the rows of the requests that ended must still reach the runner, or a later
    full batch finds no free row."""
    small = _llm(llama_dir, max_num_seqs=4)
    # Requests ending one step apart: the one that ends first is removed while the others'
    # last tokens are in flight, right before a step that schedules nothing.
    sps = [SamplingParams(temperature=1.0, max_tokens=2 + i % 2, ignore_eos=True) for i in range(4)]
    for rnd in range(4):
        outs = _within(60, small.generate, [random_prompt(6 + i, seed=100 + 10 * rnd + i) for i in range(4)], sps)
        assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3, 2, 3]
        assert len(small.worker.runner.batch.rows) <= 4
    small.worker.check_invariants()


def test_max_model_len_ends_with_length(llama_dir):
    short = _llm(llama_dir, max_model_len=40, num_kv_blocks=16)
    sp = SamplingParams(temperature=1.0, max_tokens=None, ignore_eos=True)
    outs = _within(60, short.generate, [random_prompt(n, seed=15 + n) for n in (1, 20, 39)], sp)
    for out in outs:
        assert out.outputs[0].finish_reason == "length"
        assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 40
    with pytest.raises(InvalidRequestError):
        short.generate([random_prompt(40, seed=16)], sp)


# ---- the generate() contract ---------------------------------------------------------------
def test_outputs_in_prompt_order_with_tqdm(llm):
    prompts = [random_prompt(n, seed=20 + n) for n in (3, 30, 12)]
    max_tokens = [9, 5, 1]  # the last prompt finishes first
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=True)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == max_tokens
    assert all(o.finished for o in outs)
    again = llm.generate(prompts, params, use_tqdm=True)
    ids = [o.request_id for o in outs + again]
    assert len(set(ids)) == len(ids)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_by_default_only_on_a_terminal(llm, monkeypatch, terminal):
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2))
    assert ("Generating" in err.getvalue()) == terminal
    err.truncate(0)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert "Generating" not in err.getvalue()


def test_chunked_prefill_off_gives_the_same_tokens(llama_dir, llm):
    prompts = [random_prompt(60, seed=3), random_prompt(7, seed=4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    whole = _llm(llama_dir, enable_chunked_prefill=False)
    assert whole.config.scheduler.max_num_batched_tokens >= whole.max_model_len
    chunked = _llm(llama_dir, max_num_batched_tokens=16)
    got = [o.outputs[0].token_ids for o in whole.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in chunked.generate(prompts, params)]
    with pytest.raises(InvalidRequestError, match="enable_chunked_prefill"):
        _llm(llama_dir, enable_chunked_prefill="no")
    with pytest.raises(InvalidRequestError, match="when chunked prefill is off"):
        _llm(llama_dir, enable_chunked_prefill=False, max_num_batched_tokens=16)


def test_stop_token_text_left_out_unless_asked(model_dirs):
    """A stop token id ends the text without its own text (vLLM's behaviour), unless
    include_stop_str_in_output."""
    llm = LLM(str(model_dirs["llama"]), dtype="float32", num_kv_blocks=64)
    base = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    stop_id = base.token_ids[3]
    tok = llm.get_tokenizer()
    for include in (False, True):
        sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=[stop_id],
                            include_stop_str_in_output=include)
        out = llm.generate([[5, 6, 7]], sp)[0].outputs[0]
        first = base.token_ids.index(stop_id)
        assert out.token_ids == base.token_ids[: first + 1] and out.stop_reason == stop_id
        shown = out.token_ids if include else out.token_ids[:-1]
        assert out.text == tok.decode(shown, skip_special_tokens=True)
