"""Bad input gets a typed error before any work, naming the field, the value and what is
allowed; and the engine keeps working: the next generate gives the same output as before."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from rollout.entrypoints.llm import LLM
from rollout.errors import CheckpointError, InvalidRequestError, PlatformError
from rollout.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams
from tests.helpers.models import VOCAB

MAX_MODEL_LEN = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
REF_PROMPTS = ["Hello world", "The quick brown fox"]


@pytest.fixture(scope="module")
def llm(llama_dir):
    # On cpu everywhere: validation does not depend on the device, and the xfail below
    # would be a device-side assert (a poisoned CUDA context) on a GPU.
    return LLM(
        str(llama_dir), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=32, max_num_seqs=8
    )


@pytest.fixture(scope="module")
def reference(llm):
    """Greedy outputs of REF_PROMPTS, computed before any bad input reaches the engine."""
    return [o.outputs[0].token_ids for o in llm.generate(REF_PROMPTS, GREEDY)]


def assert_still_works(llm: LLM, reference: list[list[int]]) -> None:
    assert not llm.has_unfinished_requests()
    assert [o.outputs[0].token_ids for o in llm.generate(REF_PROMPTS, GREEDY)] == reference


def assert_names(err: pytest.ExceptionInfo, field: str, allowed: str) -> None:
    msg = str(err.value)
    assert field in msg, msg
    assert allowed in msg, msg


# --- SamplingParams ----------------------------------------------------------------------

NAN, INF = math.nan, math.inf
BAD_PARAMS = [
    # id, kwargs, field, fragment of what is allowed
    ("n=0", dict(n=0), "n", f"an int in [1, {MAX_N}]"),
    ("n=1.5", dict(n=1.5), "n", f"an int in [1, {MAX_N}]"),
    ("n=True", dict(n=True), "n", f"an int in [1, {MAX_N}]"),
    ("n=10**7", dict(n=10**7), "n", f"an int in [1, {MAX_N}]"),
    ("temperature=-1", dict(temperature=-1), "temperature", "a finite float >= 0"),
    ("temperature=nan", dict(temperature=NAN), "temperature", "a finite float >= 0"),
    ("temperature=inf", dict(temperature=INF), "temperature", "a finite float >= 0"),
    ("temperature=str", dict(temperature="0.5"), "temperature", "a finite float >= 0"),
    ("top_p=0", dict(top_p=0), "top_p", "(0, 1]"),
    ("top_p=1.5", dict(top_p=1.5), "top_p", "(0, 1]"),
    ("top_p=nan", dict(top_p=NAN), "top_p", "(0, 1]"),
    ("top_k=-2", dict(top_k=-2), "top_k", "an int >= 1, or 0 / -1 to disable"),
    ("top_k=1.5", dict(top_k=1.5), "top_k", "an int >= 1, or 0 / -1 to disable"),
    ("top_k=-1.0", dict(top_k=-1.0), "top_k", "an int >= 1, or 0 / -1 to disable"),
    ("min_p=-0.1", dict(min_p=-0.1), "min_p", "[0, 1]"),
    ("min_p=2", dict(min_p=2), "min_p", "[0, 1]"),
    ("seed=str", dict(seed="x"), "seed", "None or a 64-bit int"),
    ("seed=2**64", dict(seed=2**64), "seed", "None or a 64-bit int"),
    ("seed=True", dict(seed=True), "seed", "None or a 64-bit int"),
    ("max_tokens=0", dict(max_tokens=0), "max_tokens", "None or an int >= 1"),
    ("max_tokens=2.0", dict(max_tokens=2.0), "max_tokens", "None or an int >= 1"),
    ("min_tokens=-1", dict(min_tokens=-1), "min_tokens", "an int >= 0"),
    ("min_tokens>max_tokens", dict(min_tokens=5, max_tokens=3), "min_tokens", "an int <= max_tokens=3"),
    ("stop=['']", dict(stop=[""]), "stop", "a non-empty str or a list of non-empty str"),
    ("stop=''", dict(stop=""), "stop", "a non-empty str or a list of non-empty str"),
    ("stop=[1]", dict(stop=[1]), "stop", "a non-empty str or a list of non-empty str"),
    ("stop=1", dict(stop=1), "stop", "a non-empty str or a list of non-empty str"),
    ("stop_token_ids=[-1]", dict(stop_token_ids=[-1]), "stop_token_ids", "ints >= 0"),
    ("stop_token_ids=[1.5]", dict(stop_token_ids=[1.5]), "stop_token_ids", "ints >= 0"),
    ("stop_token_ids=5", dict(stop_token_ids=5), "stop_token_ids", "ints >= 0"),
    ("stop_token_ids=0", dict(stop_token_ids=0), "stop_token_ids", "ints >= 0"),
    ("logprobs=-1", dict(logprobs=-1), "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]"),
    ("logprobs=100", dict(logprobs=100), "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]"),
    ("logprobs=True", dict(logprobs=True), "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]"),
    ("prompt_logprobs=-1", dict(prompt_logprobs=-1), "prompt_logprobs", f"None or an int in [0, {MAX_LOGPROBS}]"),
    ("prompt_logprobs=100", dict(prompt_logprobs=100), "prompt_logprobs", f"None or an int in [0, {MAX_LOGPROBS}]"),
    ("ignore_eos=str", dict(ignore_eos="yes"), "ignore_eos", "a bool"),
    ("ignore_eos=1", dict(ignore_eos=1), "ignore_eos", "a bool"),
    ("skip_special_tokens=None", dict(skip_special_tokens=None), "skip_special_tokens", "a bool"),
    ("detokenize=str", dict(detokenize="no"), "detokenize", "a bool"),
    ("include_stop_str_in_output=0", dict(include_stop_str_in_output=0), "include_stop_str_in_output", "a bool"),
    ("stop+detokenize=False", dict(stop=["x"], detokenize=False), "stop", "empty when detokenize=False"),
]


@pytest.mark.parametrize("kwargs,field,allowed", [c[1:] for c in BAD_PARAMS], ids=[c[0] for c in BAD_PARAMS])
def test_bad_sampling_params(kwargs, field, allowed):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert isinstance(err.value, ValueError)
    assert err.value.field == f"SamplingParams.{field}"
    assert_names(err, f"SamplingParams.{field}=", allowed)


def test_good_sampling_params_edge_values():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    SamplingParams(n=2, temperature=0, top_p=1, min_p=1, seed=-(2**63), max_tokens=None, logprobs=MAX_LOGPROBS)


@pytest.mark.parametrize(
    "field,value,allowed",
    [("temperature", -1.0, "a finite float >= 0"), ("n", 0, f"an int in [1, {MAX_N}]"),
     ("n", 10**7, f"an int in [1, {MAX_N}]"), ("stop", "abc", "list of non-empty str"),
     ("top_k", 10**30, f"an int in [1, {VOCAB}] (the vocabulary), or 0 / -1 to disable")],
    ids=["temperature", "n", "n-huge", "stop-str", "top_k-huge"],
)
def test_params_changed_after_construction_are_checked_on_submission(llm, reference, field, value, allowed):
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    setattr(sp, field, value)
    steps = llm.stats().num_steps
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(REF_PROMPTS, [GREEDY, sp])
    assert_names(err, f"SamplingParams.{field}=", allowed)
    assert llm.stats().num_steps == steps
    assert_still_works(llm, reference)


# --- prompts -----------------------------------------------------------------------------

BAD_PROMPTS = [
    # id, prompts, field, fragment of what is allowed
    ("empty-str", "", "prompts[0]=''", "a non-empty prompt"),
    ("empty-str-in-batch", ["hi", ""], "prompts[1]=''", "a non-empty prompt"),
    ("empty-token-list", [], "prompts=[]", "a non-empty batch"),
    ("empty-token-list-in-batch", [[5, 6], []], "prompts[1]=[]", "a non-empty prompt"),
    ("empty-dict-ids", {"prompt_token_ids": []}, "prompts[0]=", "a non-empty prompt"),
    ("negative-id", [5, -1, 6], "prompts[0]=[-1]", f"token ids in [0, {VOCAB})"),
    ("id=vocab", [5, VOCAB], f"prompts[0]=[{VOCAB}]", f"token ids in [0, {VOCAB})"),
    ("id>vocab-in-batch", [[5, 6], [7, 10**6]], f"prompts[1]=[{10**6}]", f"token ids in [0, {VOCAB})"),
    ("too-long", [5] * MAX_MODEL_LEN, "prompts[0]=", f"at most {MAX_MODEL_LEN - 1} tokens"),
    ("too-long-dict", {"prompt_token_ids": [5] * 100}, "prompts[0]=", f"at most {MAX_MODEL_LEN - 1} tokens"),
    ("None", None, "prompts=None", "a str, a list of str, a list of token ids"),
    ("float", 3.5, "prompts=3.5", "a str, a list of str, a list of token ids"),
    ("float-ids", [1.5, 2], "prompts=[1.5, 2]", "token ids as ints only"),
    ("bool-ids", [True, 2], "prompts=[True, 2]", "token ids as ints only"),
    ("nested-float-ids", [[1, 2], [1.5]], "prompts[1]=[1.5]", "a list of token ids"),
    ("mixed-ids-and-str", [[1, 2], "a"], "prompts=[[1, 2], 'a']", "a batch of one form"),
    ("dict-no-keys", {"foo": 1}, "prompts[0]={'foo': 1}", "a dict with 'prompt_token_ids' or 'prompt'"),
    ("dict-prompt-not-str", {"prompt": 5}, "prompts[0]=5", "a str"),
    ("dict-text-not-str", {"prompt_token_ids": [5], "prompt": 5}, "prompts[0]['prompt']=5", "None or a str"),
    ("dict-ids-not-ints", {"prompt_token_ids": "abc"}, "prompts[0]=", "a list of token ids"),
    ("set", {5, 6}, "prompts={5, 6}", "a str, a list of str"),
    ("tensor", torch.tensor([5, 6]), "prompts=tensor", "a str, a list of str"),
]


@pytest.mark.parametrize("prompts,field,allowed", [c[1:] for c in BAD_PROMPTS], ids=[c[0] for c in BAD_PROMPTS])
def test_bad_prompt(llm, reference, prompts, field, allowed):
    steps = llm.stats().num_steps
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(prompts, GREEDY)
    assert_names(err, field, allowed)
    assert llm.stats().num_steps == steps
    assert_still_works(llm, reference)


def test_longest_prompt_is_accepted(llm, reference):
    out = llm.generate([5] * (MAX_MODEL_LEN - 1), GREEDY)[0]
    assert len(out.outputs[0].token_ids) == 1  # the one slot max_model_len leaves
    assert_still_works(llm, reference)


def test_str_prompt_without_tokenizer(llama_dir, tmp_path):
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(llama_dir / name, tmp_path / name)
    bare = LLM(str(tmp_path), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=8)
    assert bare.get_tokenizer() is None
    for prompts in ("hello", ["hello"], {"prompt": "hello"}):
        with pytest.raises(InvalidRequestError) as err:
            bare.generate(prompts, GREEDY)
        assert_names(err, "prompts[0]='hello'", "token ids: this engine has no tokenizer")
    assert len(bare.generate([5, 6, 7], GREEDY)[0].outputs[0].token_ids) == GREEDY.max_tokens


BAD_SAMPLING_ARGS = [
    ("too-few", [GREEDY], "sampling_params=", "exactly 2 (one per prompt)"),
    ("too-many", [GREEDY] * 3, "sampling_params=", "exactly 2 (one per prompt)"),
    ("empty-list", [], "sampling_params=", "exactly 2 (one per prompt)"),
    ("str", "greedy", "sampling_params='greedy'", "None, a SamplingParams, or a list of them"),
    ("dict", {"temperature": 0}, "sampling_params=", "None, a SamplingParams, or a list of them"),
    ("list-with-str", [GREEDY, "x"], "sampling_params=", "None, a SamplingParams, or a list of them"),
]


@pytest.mark.parametrize("params,field,allowed", [c[1:] for c in BAD_SAMPLING_ARGS], ids=[c[0] for c in BAD_SAMPLING_ARGS])
def test_bad_sampling_params_argument(llm, reference, params, field, allowed):
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(REF_PROMPTS, params)
    assert_names(err, field, allowed)
    assert_still_works(llm, reference)


def test_one_bad_prompt_stops_the_whole_batch(llm, reference):
    steps, tokens = llm.stats().num_steps, llm.stats().num_generated_tokens
    with pytest.raises(InvalidRequestError) as err:
        llm.generate([[5, 6, 7], [8, 9], [10, VOCAB + 3], [11]], GREEDY)
    assert_names(err, f"prompts[2]=[{VOCAB + 3}]", f"[0, {VOCAB})")
    assert not llm.has_unfinished_requests()
    assert (llm.stats().num_steps, llm.stats().num_generated_tokens) == (steps, tokens)
    assert_still_works(llm, reference)


@pytest.mark.parametrize("top_k", [VOCAB + 1, 10**30])
def test_top_k_beyond_the_vocabulary(llm, reference, top_k):
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(REF_PROMPTS, SamplingParams(top_k=top_k, max_tokens=4))
    assert_names(err, f"SamplingParams.top_k={top_k}", f"an int in [1, {VOCAB}]")
    assert_still_works(llm, reference)
    # The whole vocabulary is a valid top-k (it keeps every token).
    assert len(llm.generate([5, 6], SamplingParams(top_k=VOCAB, max_tokens=3, seed=0))[0].outputs[0].token_ids) == 3


def test_stop_token_id_outside_vocab(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=2, stop_token_ids=[VOCAB + 10])
    with pytest.raises(InvalidRequestError) as err:
        llm.generate([5, 6, 7], sp)
    assert_names(err, "stop_token_ids", f"[0, {VOCAB})")


def test_engine_survives_a_mid_step_failure(llm, reference):
    """After the rejected request above, the engine still works."""
    assert_still_works(llm, reference)


# --- LLM constructor -----------------------------------------------------------------------

BAD_LLM_ARGS = [
    # id, kwargs, field, fragment of what is allowed
    ("dtype=float64", dict(dtype="float64"), "dtype='float64'", "one of ['float32', 'bfloat16', 'float16']"),
    ("dtype=fp16", dict(dtype="fp16"), "dtype='fp16'", "one of ['float32', 'bfloat16', 'float16']"),
    ("dtype=torch.int8", dict(dtype=torch.int8), "dtype=torch.int8", "one of ['float32', 'bfloat16', 'float16']"),
    ("dtype=list", dict(dtype=["float32"]), "dtype=['float32']", "one of ['float32', 'bfloat16', 'float16']"),
    ("max_model_len=0", dict(max_model_len=0), "max_model_len=0", "an int in [2, 512]"),
    ("max_model_len>max_pos", dict(max_model_len=513), "max_model_len=513", "an int in [2, 512]"),
    ("max_model_len=float", dict(max_model_len=64.0), "max_model_len=64.0", "an int in [2, 512]"),
    ("block_size=0", dict(block_size=0), "block_size=0", "an int >= 1"),
    ("block_size=-16", dict(block_size=-16), "block_size=-16", "an int >= 1"),
    ("block_size=1.5", dict(block_size=1.5), "block_size=1.5", "an int >= 1"),
    ("block_size=True", dict(block_size=True), "block_size=True", "an int >= 1"),
    ("gpu_memory_utilization=0", dict(gpu_memory_utilization=0), "gpu_memory_utilization=0", "a float in (0, 1]"),
    ("gpu_memory_utilization=1.5", dict(gpu_memory_utilization=1.5), "gpu_memory_utilization=1.5", "(0, 1]"),
    ("gpu_memory_utilization=nan", dict(gpu_memory_utilization=NAN), "gpu_memory_utilization=nan", "(0, 1]"),
    ("gpu_memory_utilization=str", dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization='0.5'", "(0, 1]"),
    ("gpu_memory_utilization=None", dict(gpu_memory_utilization=None), "gpu_memory_utilization=None", "(0, 1]"),
    ("num_kv_blocks=0", dict(num_kv_blocks=0), "num_kv_blocks=0", "None or an int >= 1"),
    ("kv_cache_memory_bytes=0", dict(kv_cache_memory_bytes=0), "kv_cache_memory_bytes=0", "None or an int >= 1"),
    ("kv_cache_memory_bytes=str", dict(kv_cache_memory_bytes="1G"), "kv_cache_memory_bytes='1G'", "an int >= 1"),
    ("seed=str", dict(seed="x"), "seed='x'", "an int"),
    ("tokenizer=missing", dict(tokenizer="/no/such/tokenizer/dir"), "tokenizer='/no/such/tokenizer/dir'", "a tokenizer"),
]


@pytest.mark.parametrize("kwargs,field,allowed", [c[1:] for c in BAD_LLM_ARGS], ids=[c[0] for c in BAD_LLM_ARGS])
def test_bad_llm_argument(llm, reference, llama_dir, kwargs, field, allowed):
    kwargs = {"dtype": "float32", "num_kv_blocks": 8, **kwargs}
    with pytest.raises(InvalidRequestError) as err:
        LLM(str(llama_dir), **kwargs)
    assert_names(err, field, allowed)
    assert_still_works(llm, reference)  # a failed constructor leaves other engines alone


@pytest.mark.parametrize(
    "model,allowed",
    [(123, "a path to an HF model directory"), (None, "a path to an HF model directory"),
     (object(), "a path to an HF model directory"), (torch.nn.Linear(2, 2), "an HF PreTrainedModel (with .config)")],
    ids=["int", "None", "object", "module-without-config"],
)
def test_bad_model_argument(model, allowed):
    with pytest.raises(InvalidRequestError) as err:
        LLM(model)
    assert_names(err, "model=", allowed)


def test_missing_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        LLM(str(tmp_path / "nope"))


def test_unknown_device(llama_dir):
    with pytest.raises(PlatformError) as err:
        LLM(str(llama_dir), device="tpu", num_kv_blocks=8)
    assert_names(err, "'tpu'", "known device types: cpu, cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="expects a machine without CUDA")
def test_cuda_device_without_gpu(llama_dir):
    with pytest.raises(PlatformError) as err:
        LLM(str(llama_dir), device="cuda", num_kv_blocks=8)
    assert_names(err, "'cuda'", "not available")


def test_bad_max_num_seqs(llama_dir):
    with pytest.raises(InvalidRequestError) as err:
        LLM(str(llama_dir), dtype="float32", num_kv_blocks=8, max_num_seqs=0)
    assert_names(err, "max_num_seqs=0", "an int >= 1")


@pytest.mark.parametrize("value", [0, -4, "x"])
def test_bad_max_num_batched_tokens(llama_dir, value):
    with pytest.raises(InvalidRequestError) as err:
        LLM(str(llama_dir), dtype="float32", num_kv_blocks=8, max_num_batched_tokens=value)
    assert_names(err, f"max_num_batched_tokens={value!r}", "an int >= 1")
