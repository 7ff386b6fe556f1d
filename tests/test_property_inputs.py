"""Property tests over what a caller can hand the engine: SamplingParams fields, prompt forms
and lengths, and weight-update streams. Every case either runs or raises one of
``rollout.errors``' classes, and afterwards the same engine gives its reference greedy output
(token for token: the same computation as the reference, so also bitwise logprobs).

Derandomized, so CI runs the same cases every time; raise ``max_examples`` locally to search
further."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rollout import LLM, SamplingParams
from rollout.errors import RolloutError
from rollout.sampling_params import LOGPROBS_MODES
from tests.helpers.models import VOCAB

MAX_MODEL_LEN = 48
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
REF_PROMPTS = [[5, 6, 7, 8, 9], [100, 200]]
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# Values a field may be given by mistake, next to plausible ones.
ODD = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-(2**63), -2, -1, 0, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.lists(st.integers(-3, 5), max_size=2),
)
FIELDS = {
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.one_of(st.integers(-1, VOCAB + 2), st.just(10**30)),
    "min_p": st.floats(0, 1),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "max_tokens": st.one_of(st.none(), st.integers(1, 6)),
    "min_tokens": st.integers(0, 4),
    "stop": st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=2), max_size=2)),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(0, VOCAB + 5), max_size=3)),
    "ignore_eos": st.booleans(),
    "logprobs": st.one_of(st.none(), st.integers(0, 21)),
    "prompt_logprobs": st.one_of(st.none(), st.integers(0, 3)),
    "logprobs_mode": st.sampled_from(LOGPROBS_MODES + ("bogus",)),
    "output_kind": st.sampled_from(["cumulative", "delta", "final_only", "other", 7]),
}
# Plausible values for any subset of the fields, and now and then one odd value.
PARAMS = st.tuples(
    st.fixed_dictionaries({}, optional=FIELDS),
    st.one_of(st.none(), st.tuples(st.sampled_from(sorted(FIELDS)), ODD)),
).map(lambda t: t[0] if t[1] is None else {**t[0], t[1][0]: t[1][1]})
TOKEN = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB, 10**6, 1.5, True, None]))
ONE_PROMPT = st.one_of(
    st.text(max_size=40),
    st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=MAX_MODEL_LEN + 2),
    st.lists(TOKEN, max_size=6),
    st.fixed_dictionaries({"prompt_token_ids": st.lists(TOKEN, max_size=6)}),
    st.fixed_dictionaries({}, optional={"prompt": st.one_of(st.text(max_size=8), ODD), "prompt_token_ids": ODD}),
)
VALID_PROMPT = st.one_of(
    st.text(min_size=1, max_size=40),
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=MAX_MODEL_LEN - 1),
    st.fixed_dictionaries({"prompt_token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)}),
)
PROMPTS = st.one_of(VALID_PROMPT, st.lists(VALID_PROMPT, min_size=1, max_size=3), ONE_PROMPT,
                    st.lists(ONE_PROMPT, max_size=3), ODD)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=24, max_num_seqs=4)


@pytest.fixture(scope="module")
def reference(llm):
    return [o.outputs[0].token_ids for o in llm.generate(REF_PROMPTS, GREEDY)]


def _assert_reference(llm: LLM, reference: list[list[int]]) -> None:
    assert not llm.has_unfinished_requests()
    assert [o.outputs[0].token_ids for o in llm.generate(REF_PROMPTS, GREEDY)] == reference


def _check_outputs(outs, sp: SamplingParams) -> None:
    for out in outs:
        assert out.finished and len(out.outputs) == sp.n
        for c in out.outputs:
            assert c.finish_reason in ("stop", "length")
            assert all(0 <= t < VOCAB for t in c.token_ids)
            if sp.max_tokens is not None:
                assert len(c.token_ids) <= sp.max_tokens
            if sp.logprobs is not None:
                assert len(c.token_logprobs) == len(c.token_ids)
                assert all(math.isfinite(lp) and lp <= 0 for lp in c.token_logprobs)


@settings(max_examples=80, **SETTINGS)
@given(kwargs=PARAMS, prompts=PROMPTS)
def test_any_params_and_prompts_run_or_raise_typed(llm, reference, kwargs, prompts):
    try:
        sp = SamplingParams(**kwargs)
    except RolloutError as e:
        event(f"SamplingParams: {type(e).__name__}")
        return
    try:
        outs = llm.generate(prompts, sp)
    except RolloutError as e:
        event(f"generate: {type(e).__name__}")
    else:
        event("generate: ran")
        _check_outputs(outs, sp)
    _assert_reference(llm, reference)


# ---- update streams ----------------------------------------------------------------------
def _bad_tensor(shape: torch.Size, kind: str) -> torch.Tensor:
    if kind == "nan":
        t = torch.zeros(shape)
        t.view(-1)[0] = math.nan
        return t
    if kind == "inf":
        return torch.full(shape, -math.inf)
    if kind == "int":
        return torch.zeros(shape, dtype=torch.int32)
    if kind == "meta":
        return torch.empty(shape, device="meta")
    if kind == "shape":
        return torch.zeros(*shape, 2)
    if kind == "complex":
        return torch.zeros(shape, dtype=torch.complex64)
    return torch.zeros(shape).to_sparse()


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_any_update_stream_lands_whole_or_not_at_all(llm, reference, sd_a, data):
    """Streams of A's own tensors (same weights: the reference still holds after a success)
    mixed with unknown names, duplicates and bad tensors anywhere in the stream."""
    names = sorted(sd_a)
    picks = data.draw(st.lists(st.sampled_from(names), max_size=8))
    stream: list = [(n, sd_a[n]) for n in picks]
    for _ in range(data.draw(st.integers(0, 2))):
        at = data.draw(st.integers(0, len(stream)))
        name = data.draw(st.sampled_from(names))
        bad = data.draw(st.sampled_from(["nan", "inf", "int", "meta", "shape", "complex", "sparse", "name", "pair"]))
        item = {"name": ("model.layers.9.nope.weight", sd_a[name]), "pair": (name,)}.get(bad)
        stream.insert(at, item if item is not None else (name, _bad_tensor(sd_a[name].shape, bad)))
    as_dict = data.draw(st.booleans())
    version = data.draw(st.one_of(st.none(), st.integers(-3, 3)))
    before = llm.weight_version
    try:
        arg = dict(stream) if as_dict and all(isinstance(i, tuple) and len(i) == 2 for i in stream) else iter(stream)
        llm.update_weights(arg, version=version)
        event("update: landed")
    except RolloutError as e:
        event(f"update: {type(e).__name__}")
        assert llm.weight_version == before
    _assert_reference(llm, reference)
