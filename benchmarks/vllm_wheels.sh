#!/usr/bin/env bash
# vLLM 0.22.0 for the GPU machine, which has no network: its wheels are downloaded here and
# carried there in pieces, one piece a device call (a call carries at most 64 MiB, the working
# tree included). For `rollout-bench peer --peer-engine vllm` (rollout/bench/vllm_peer.py).
#
#   here:    bash benchmarks/vllm_wheels.sh download      # .whl/vllm-wheels.tar.NN, prints the calls
#   device:  bash benchmarks/vllm_wheels.sh stash         # each call: keep the carried piece(s) in /tmp
#   device:  bash benchmarks/vllm_wheels.sh install SHA256 NUM_PIECES   # last call: reassemble, install
#            then: export PYTHONPATH=/tmp/vllm-site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0
#
# What is brought: vLLM 0.22.0 (--no-deps) and exactly the packages it imports that the GPU
# image lacks. The image (KINDS.md) has torch 2.11.0, torchaudio, torchvision (vLLM pins those
# three to the image's versions), triton, transformers 5.17, tokenizers, safetensors,
# huggingface-hub, numpy, aiohttp, anyio, httpx, pillow, psutil, pyyaml, regex, requests,
# sentencepiece, tiktoken, cloudpickle, prometheus-client, opencv-python-headless, einops,
# ninja, numba, uvloop, xxhash, cuda-bindings, nvidia-ml-py. Found by importing, over vLLM's
# own wheel, every module an offline LLM of Qwen2/Qwen3/Llama runs (front end, engine core,
# GPU worker and model runner, FlashAttention and Triton attention backends, sampler, dummy
# loader, torch.compile backend) and adding what failed until nothing did:
#   pydantic (+ pydantic-core, annotated-types, typing-inspection)  vllm.config
#   msgspec, pyzmq, cbor2, pybase64, cachetools                      engine core IPC, hashing
#   openai (+ jiter, distro, sniffio), openai-harmony               vllm.reasoning, entrypoints
#   fastapi (+ starlette), opentelemetry-api, partial-json-parser   LLM's pooling/tracing imports
#   gguf                                                            vllm.transformers_utils.config
#   llguidance, xgrammar (+ apache-tvm-ffi)                         vllm.v1.request (structured output)
# Versions: within vLLM 0.22.0's requirements and whose own requirements the image meets
# (openai < 3: later ones need httpx2, which the image lacks; pydantic 2.12: typing-extensions
# >= 4.14.1, as openai already needs).
# Not brought, with why: flashinfer-python/-cubin (hundreds of MB; with no top-k/top-p vLLM's
# sampler runs its PyTorch path anyway (TopKTopPSampler.forward_cuda), and
# VLLM_USE_FLASHINFER_SAMPLER=0 keeps it from importing FlashInfer's attention backend to check
# the GPU; the default Hopper attention is the FlashAttention bundled in the vLLM wheel);
# tilelang, nvidia-cutlass-dsl, quack-kernels, tokenspeed-mla, humming-kernels,
# nvidia-cudnn-frontend (MLA, FP4/FP8, Mamba kernels: imported only there); fastsafetensors,
# compressed-tensors, mistral-common, lm-format-enforcer, outlines-core, lark, diskcache
# (other loaders, quantization formats, tokenizers and grammar backends); depyf (compile debug
# dumps), setproctitle and blake3 (optional imports: process titles, multimodal hashing);
# anthropic, mcp, opentelemetry-sdk/exporter, prometheus-fastapi-instrumentator, watchfiles,
# ijson, python-json-logger, model-hosting-container-standards (the server).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

WHL=.whl
TAR=vllm-wheels.tar
PIECE_MIB=${PIECE_MIB:-60}
STASH=/tmp/vllm-pieces
SITE=/tmp/vllm-site
PINS=(
  vllm==0.22.0
  pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2
  msgspec==0.23.0 pyzmq==27.3.0 cbor2==6.3.0 pybase64==1.5.1 cachetools==8.0.3
  openai==2.54.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 openai-harmony==0.0.8
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.3 partial-json-parser==0.2.1.1.post7
  gguf==0.19.0
  llguidance==1.7.6 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
)

mib() { echo $(( ($1 + 1048575) / 1048576 )); }

download() {
  grep -qxF "/$WHL/" .git/info/exclude 2>/dev/null || echo "/$WHL/" >> .git/info/exclude
  rm -rf "$WHL/vllm-wheels" "$WHL/$TAR" "$WHL/$TAR".*
  mkdir -p "$WHL/vllm-wheels"
  local plat=()
  for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 \
           manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    plat+=(--platform "${p}_x86_64")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$WHL/vllm-wheels" "${PINS[@]}"
  local n_wheels
  n_wheels=$(ls "$WHL/vllm-wheels"/*.whl | wc -l)
  if [ "$n_wheels" -ne "${#PINS[@]}" ]; then
    echo "expected ${#PINS[@]} wheels, got $n_wheels" >&2; exit 1
  fi
  local vllm_size
  vllm_size=$(stat -c %s "$WHL"/vllm-wheels/vllm-*.whl)
  # Deterministic: the same wheels give the same sha256 whenever downloaded.
  tar -cf "$WHL/$TAR" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$WHL" vllm-wheels
  local sha total
  sha=$(sha256sum "$WHL/$TAR" | cut -d' ' -f1)
  total=$(stat -c %s "$WHL/$TAR")
  split -b "${PIECE_MIB}M" -d -a 2 "$WHL/$TAR" "$WHL/$TAR."
  rm -f "$WHL/$TAR"
  rm -rf "$WHL/vllm-wheels"
  local pieces=("$WHL/$TAR".*)
  local n=${#pieces[@]}
  # What travels besides a piece: tracked files and untracked ones git does not ignore.
  local tree
  tree=$( { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null \
          | awk '{s += $1} END {print s + 0}')
  echo "$n_wheels wheels, $(mib "$total") MiB in all ($total bytes; the vllm wheel $(mib "$vllm_size") MiB)"
  echo "pieces of at most $PIECE_MIB MiB: $n ($(ls -l "${pieces[@]}" | awk '{printf "%s %d MiB; ", $NF, ($5 + 1048575) / 1048576}'))"
  echo "working tree that travels with each: $(mib "$tree") MiB (a call carries at most 64 MiB)"
  if [ $(( PIECE_MIB * 1048576 + tree )) -gt $(( 64 * 1048576 )) ]; then
    echo "a piece and the tree exceed 64 MiB: rerun with a smaller PIECE_MIB" >&2; exit 1
  fi
  echo "sha256 of the whole: $sha"
  echo
  echo "$n device calls bring them, back to back (a machine left idle goes back, and /tmp with it):"
  local i=0
  for p in "${pieces[@]}"; do
    i=$((i + 1))
    if [ "$i" -lt "$n" ]; then
      echo "  call $i: carry [\"$p\"], command: bash benchmarks/vllm_wheels.sh stash"
    else
      echo "  call $i: carry [\"$p\"], command: bash benchmarks/vllm_wheels.sh stash && bash benchmarks/vllm_wheels.sh install $sha $n && export PYTHONPATH=$SITE:\$PWD VLLM_USE_FLASHINFER_SAMPLER=0 && timeout 280 python3 -m rollout.bench.cli peer --peer-engine vllm --peer-workload nano-bench --out \$OUT/peer-vllm-nano.json; timeout 280 python3 -m rollout.bench.cli peer --peer-engine vllm --peer-workload decode-step --out \$OUT/peer-vllm-decode.json"
    fi
  done
}

stash() {  # device side: keep what this call carried outside the working tree
  mkdir -p "$STASH"
  local found=0
  for p in "$WHL/$TAR".*; do
    [ -f "$p" ] || continue
    cp "$p" "$STASH/"
    found=1
  done
  [ "$found" = 1 ] || { echo "no $WHL/$TAR.NN carried in this call" >&2; exit 1; }
  ls -l "$STASH"
}

install() {  # device side: reassemble the pieces stashed by earlier calls, check, install
  local sha=${1:?usage: install SHA256 NUM_PIECES} n=${2:?usage: install SHA256 NUM_PIECES}
  local have
  have=$(ls "$STASH/$TAR".* 2>/dev/null | wc -l)
  if [ "$have" -ne "$n" ]; then
    echo "$have of $n pieces in $STASH: the machine was given back between calls, or a call was missed;" \
         "carry the missing ones again" >&2
    ls -l "$STASH" >&2 || true
    exit 1
  fi
  local got
  got=$(cat "$STASH/$TAR".* | sha256sum | cut -d' ' -f1)
  [ "$got" = "$sha" ] || { echo "sha256 $got != $sha: a piece is damaged or from another download" >&2; exit 1; }
  rm -rf /tmp/vllm-wheels && cat "$STASH/$TAR".* | tar -x -C /tmp
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    /tmp/vllm-wheels/*.whl
  # The modules an offline LLM runs (as vllm_wheels.sh's list was found), imported where CUDA is.
  PYTHONPATH=$SITE python3 -c "
import importlib, importlib.metadata as md, vllm
for m in ('vllm.entrypoints.llm', 'vllm.v1.engine.core', 'vllm.v1.worker.gpu_model_runner',
          'vllm.v1.attention.backends.flash_attn', 'vllm.model_executor.models.qwen3', 'vllm.compilation.backends'):
    importlib.import_module(m)
print('vllm', vllm.__version__, 'in', vllm.__file__, '| typing_extensions', md.version('typing_extensions'),
      '| pydantic', md.version('pydantic'))"
}

case "${1:-download}" in
  download) download ;;
  stash) stash ;;
  install) shift; install "$@" ;;
  *) echo "usage: $0 [download | stash | install SHA256 NUM_PIECES]" >&2; exit 2 ;;
esac
