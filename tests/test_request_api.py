"""The request-level API on CPU: add_request/step/abort streaming (cumulative, delta and
final-only outputs), generate_iter, multi-turn prefix reuse of generated tokens, and
pause -> update_weights -> resume with per-token weight versions. fp32 greedy, so token
lists compare exactly."""

from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file

from rollout import LLM, CompletionOutput, RequestOutputKind, SamplingParams
from rollout.errors import EngineStateError, InvalidRequestError
from tests.helpers.engine_state import LOGPROB_TOL
from tests.helpers.hf_oracle import random_prompt
from tests.helpers.models import build_model_dir

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _assert_same_samples(got: list[CompletionOutput], want: list[CompletionOutput]) -> None:
    """Samples of two requests: everything exact but the logprobs, within LOGPROB_TOL."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.index, g.text, g.token_ids, g.finish_reason, g.stop_reason, g.token_weight_versions) == (
            w.index, w.text, w.token_ids, w.finish_reason, w.stop_reason, w.token_weight_versions)
        assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=LOGPROB_TOL)
        assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=LOGPROB_TOL * len(g.token_ids))
        assert len(g.logprobs) == len(w.logprobs)
        for step_g, step_w in zip(g.logprobs, w.logprobs):
            assert step_g.keys() == step_w.keys()
            for tid in step_g:
                assert (step_g[tid].rank, step_g[tid].decoded_token) == (step_w[tid].rank, step_w[tid].decoded_token)
                assert step_g[tid].logprob == pytest.approx(step_w[tid].logprob, abs=LOGPROB_TOL)


def _llm(path, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 256)
    return LLM(str(path), dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return _llm(llama_dir)


@pytest.fixture(scope="module")
def b_dir(tmp_path_factory, tokenizer_dir):
    return build_model_dir("llama", tmp_path_factory.mktemp("llama_b"), tokenizer_dir, seed=1)


def _drain(llm: LLM, max_steps: int = 500) -> list:
    outs = []
    for _ in range(max_steps):
        if not llm.has_unfinished_requests():
            return outs
        outs += llm.step()
    raise AssertionError("requests still unfinished")


def _check_idle(llm: LLM) -> None:
    """No request holds a block and the pool's invariant holds."""
    pool = llm.worker.kv.pool
    pool.check_invariants()
    assert pool.counts()[2] == 0, "blocks still in use"
    assert not llm.has_unfinished_requests()


# ---- add_request / step ----------------------------------------------------------------
def test_step_streams_cumulative_snapshots_then_final(llm):
    prompt = random_prompt(21, seed=1)
    sp = SamplingParams(max_tokens=6, logprobs=0, **GREEDY)
    rid = llm.add_request(prompt, sp)
    outs = _drain(llm)
    assert [o.request_id for o in outs] == [rid] * 6
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3, 4, 5, 6]
    assert [o.finished for o in outs] == [False] * 5 + [True]
    final = outs[-1].outputs[0]
    assert final.finish_reason == "length" and final.token_weight_versions == [0] * 6
    for o in outs[:-1]:  # every snapshot is a prefix of the final output
        c = o.outputs[0]
        assert c.finish_reason is None
        assert c.token_ids == final.token_ids[: len(c.token_ids)]
        assert c.token_logprobs == final.token_logprobs[: len(c.token_ids)]
    (ref,) = llm.generate(prompt, sp)  # generate is built on the same machinery
    assert ref.outputs[0].token_ids == final.token_ids
    # Recomputed after a prefix-cache hit (a shorter prefill): logprobs within tolerance.
    assert ref.outputs[0].token_logprobs == pytest.approx(final.token_logprobs, abs=LOGPROB_TOL)
    _check_idle(llm)


def test_delta_and_final_only_kinds(llm):
    prompt = random_prompt(30, seed=2)
    kinds = {k: SamplingParams(n=2, max_tokens=5, logprobs=1, output_kind=k, **GREEDY) for k in RequestOutputKind}
    ids = {k: llm.add_request(prompt, sp) for k, sp in kinds.items()}
    outs = _drain(llm)
    by_kind = {k: [o for o in outs if o.request_id == rid] for k, rid in ids.items()}
    final = by_kind[RequestOutputKind.CUMULATIVE][-1]
    assert len(by_kind[RequestOutputKind.FINAL_ONLY]) == 1
    # The three kinds are three requests at other rows of the batch: tokens, text and
    # finish reasons exact, logprobs within tolerance.
    _assert_same_samples(by_kind[RequestOutputKind.FINAL_ONLY][0].outputs, final.outputs)
    deltas = by_kind[RequestOutputKind.DELTA]
    assert len(deltas) == 5 and deltas[-1].finished
    joined = [
        CompletionOutput(
            i, "".join(d.outputs[i].text for d in deltas), [t for d in deltas for t in d.outputs[i].token_ids],
            logprobs=[x for d in deltas for x in d.outputs[i].logprobs],
            token_logprobs=[lp for d in deltas for lp in d.outputs[i].token_logprobs],
            finish_reason=deltas[-1].outputs[i].finish_reason, stop_reason=deltas[-1].outputs[i].stop_reason,
            cumulative_logprob=deltas[-1].outputs[i].cumulative_logprob,
            token_weight_versions=[v for d in deltas for v in d.outputs[i].token_weight_versions],
        )
        for i in range(2)
    ]
    _assert_same_samples(joined, final.outputs)
    # The string name works too.
    assert SamplingParams(output_kind="delta").output_kind == RequestOutputKind.DELTA


def test_streamed_text_never_takes_back_a_stop_string(llm):
    prompt = random_prompt(12, seed=3)
    (full,) = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY))
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 4]  # likely spans tokens
    sp = SamplingParams(max_tokens=24, stop=stop, **GREEDY)
    llm.add_request(prompt, sp)
    outs = _drain(llm)
    final = outs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == text[: text.index(stop)]
    for o in outs:
        assert final.text.startswith(o.outputs[0].text)


def test_add_request_forms_and_outputs_of_others_wait_for_step(llm):
    p1, p2 = random_prompt(18, seed=4), random_prompt(9, seed=5)
    sp = SamplingParams(max_tokens=3, output_kind="final_only", **GREEDY)
    rid = llm.add_request({"prompt_token_ids": p1}, sp, request_id="mine")
    assert rid == "mine"
    # generate drives the engine: "mine" advances too, and its output waits for step().
    (other,) = llm.generate([p2], SamplingParams(max_tokens=8, **GREEDY))
    assert other.finished and len(other.outputs[0].token_ids) == 8
    assert llm.has_unfinished_requests()  # its final output is still unclaimed
    (out,) = llm.step()
    assert out.request_id == "mine" and out.finished and len(out.outputs[0].token_ids) == 3
    assert llm.step() == [] and not llm.has_unfinished_requests()
    text_id = llm.add_request("hello world", SamplingParams(max_tokens=2, **GREEDY))
    assert isinstance(text_id, str) and text_id != "mine"
    assert _drain(llm)[-1].prompt == "hello world"


# ---- abort -------------------------------------------------------------------------------
def test_abort_keeps_tokens_and_frees_blocks(llm, caplog):
    prompt = random_prompt(40, seed=6)
    sp = SamplingParams(n=3, max_tokens=50, logprobs=2, temperature=1.0, seed=3, ignore_eos=True)
    rid = llm.add_request(prompt, sp)
    other = llm.add_request(random_prompt(20, seed=7), SamplingParams(max_tokens=8, **GREEDY))
    seen = []
    for _ in range(5):
        seen += [o for o in llm.step() if o.request_id == rid]
    assert llm.stats().num_used_blocks > 0
    (out,) = llm.abort([rid])
    assert out.finished and out.request_id == rid
    for i, c in enumerate(out.outputs):
        assert c.finish_reason == "abort"
        # Exactly what was streamed is kept (a token still in flight is thrown away).
        assert len(c.token_ids) >= 4
        assert len(c.token_ids) == len(c.token_logprobs) == len(c.logprobs) == len(c.token_weight_versions)
        assert c.token_ids == seen[-1].outputs[i].token_ids
        assert c.token_logprobs == seen[-1].outputs[i].token_logprobs
    llm.worker.check_invariants()
    # The other request is untouched and finishes; then nothing holds a block.
    rest = _drain(llm)
    assert rest[-1].request_id == other and rest[-1].outputs[0].finish_reason == "length"
    _check_idle(llm)
    # Unknown and already-finished ids: a no-op that says so.
    with caplog.at_level(logging.WARNING):
        assert llm.abort(["no-such-id", rid]) == []
    assert "no-such-id" in caplog.text and rid in caplog.text
    _check_idle(llm)


def test_abort_waiting_request_and_mid_prefill(llama_dir):
    llm = _llm(llama_dir, max_num_batched_tokens=16, max_num_seqs=1)
    a = llm.add_request(random_prompt(40, seed=8), SamplingParams(max_tokens=4, prompt_logprobs=0, **GREEDY))
    b = llm.add_request(random_prompt(10, seed=9), SamplingParams(max_tokens=4, **GREEDY))
    # a's first prefill chunks (b waits: max_num_seqs=1); the second step reads the first back.
    assert llm.step() == [] and llm.step() == []
    out_a, out_b = llm.abort([a, b])
    assert out_a.outputs[0].token_ids == [] and out_a.outputs[0].finish_reason == "abort"
    # The part read back (the second chunk, still in flight, is thrown away).
    assert out_a.prompt_logprobs is not None and len(out_a.prompt_logprobs) == 1 + 16
    assert out_b.outputs[0].token_ids == [] and out_b.outputs[0].finish_reason == "abort"
    _check_idle(llm)


# ---- request ids -------------------------------------------------------------------------
def test_duplicate_request_ids_are_refused(llm):
    prompt = random_prompt(10, seed=10)
    sp = SamplingParams(max_tokens=2, **GREEDY)
    llm.add_request(prompt, sp, request_id="dup")
    with pytest.raises(InvalidRequestError, match="request_id"):
        llm.add_request(prompt, sp, request_id="dup")
    llm.add_request(prompt, SamplingParams(n=2, max_tokens=2, **GREEDY), request_id="grp")
    with pytest.raises(InvalidRequestError, match="grp-1"):  # a sample's id
        llm.add_request(prompt, sp, request_id="grp-1")
    with pytest.raises(InvalidRequestError, match="request_id"):
        llm.generate_iter([prompt, prompt], sp, request_ids=["x", "x"])
    with pytest.raises(InvalidRequestError, match="request_id"):
        llm.add_request(prompt, sp, request_id=7)
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.add_request([prompt, prompt], sp)  # one prompt only
    _drain(llm)
    llm.add_request(prompt, sp, request_id="dup")  # finished ids can be used again
    _drain(llm)
    _check_idle(llm)


# ---- generate_iter -----------------------------------------------------------------------
def test_generate_iter_yields_groups_as_they_finish(llm):
    prompts = [random_prompt(15 + i, seed=20 + i) for i in range(4)]
    lens = [9, 2, 6, 4]
    params = [SamplingParams(n=2, max_tokens=k, **GREEDY) for k in lens]
    it = llm.generate_iter(prompts, params, request_ids=["a", "b", "c", "d"])
    got = list(it)
    assert [o.request_id for o in got] == ["b", "d", "c", "a"]  # shortest first
    assert all(o.finished and len(o.outputs) == 2 for o in got)
    ref = llm.generate(prompts, params)
    by_id = {o.request_id: o for o in got}
    for rid, r in zip("abcd", ref):
        assert [c.token_ids for c in by_id[rid].outputs] == [c.token_ids for c in r.outputs]
    # Closing early aborts the rest.
    it = llm.generate_iter(prompts, params)
    first = next(it)
    assert first.outputs[0].token_ids == ref[1].outputs[0].token_ids
    it.close()
    _check_idle(llm)


# ---- multi-turn ----------------------------------------------------------------------------
def test_next_turn_reuses_kv_of_generated_tokens(llama_dir):
    llm = _llm(llama_dir, block_size=8)
    prompt = random_prompt(10, seed=30)
    (t1,) = llm.generate(prompt, SamplingParams(max_tokens=30, **GREEDY))
    out = t1.outputs[0].token_ids
    nxt = prompt + out + [5, 6, 7]  # + a tool result: token ids in, nothing re-tokenized
    (t2,) = llm.generate(nxt, SamplingParams(max_tokens=4, **GREEDY))
    # All full blocks of prompt + outputs but the last (never computed) output token.
    assert t2.num_cached_tokens == (len(prompt) + len(out) - 1) // 8 * 8 == 32 > len(prompt)
    fresh = _llm(llama_dir, block_size=8, enable_prefix_caching=False)
    assert fresh.generate(nxt, SamplingParams(max_tokens=4, **GREEDY))[0].outputs[0].token_ids == t2.outputs[0].token_ids


# ---- pause / update / resume ---------------------------------------------------------------
def test_pause_update_resume_versions_every_token(llama_dir, b_dir):
    llm = _llm(llama_dir)
    with pytest.raises(EngineStateError, match="resume"):
        llm.resume()
    prompt = random_prompt(27, seed=40)
    sp = SamplingParams(max_tokens=12, logprobs=0, **GREEDY)
    (ref_a,) = llm.generate(prompt, sp)
    rid = llm.add_request(prompt, sp)
    while True:
        snaps = llm.step()  # the first call only launches the prefill: outputs lag one step
        if snaps and len(snaps[0].outputs[0].token_ids) == 5:
            break
    llm.pause()
    llm.pause()  # a no-op
    assert llm.is_paused and llm.step() == [] and llm.has_unfinished_requests()
    with pytest.raises(EngineStateError, match="paused"):
        llm.generate(prompt, sp)
    with pytest.raises(EngineStateError, match="paused"):
        llm.score([prompt])
    assert llm.update_weights(load_file(b_dir / "model.safetensors")) > 0
    assert llm.weight_version == 1
    llm.resume()
    out = _drain(llm)[-1]
    assert out.request_id == rid and out.weight_version == 0  # version at submission
    c = out.outputs[0]
    # The 5 tokens seen before the pause, plus the one in flight then: sampled under A.
    k = c.token_weight_versions.count(0)
    assert k == 6 and c.token_weight_versions == [0] * k + [1] * (12 - k)
    assert c.token_ids[:k] == ref_a.outputs[0].token_ids[:k]
    # After the update: what B produces from that prefix, as a fresh B engine sees it.
    b = _llm(b_dir)
    (ref_b,) = b.generate(prompt + c.token_ids[:k], SamplingParams(max_tokens=12 - k, logprobs=0, **GREEDY))
    assert c.token_ids[k:] == ref_b.outputs[0].token_ids
    assert c.token_logprobs[k:] == pytest.approx(ref_b.outputs[0].token_logprobs, abs=1e-5)
    _check_idle(llm)
