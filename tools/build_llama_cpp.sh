#!/bin/bash
# Build llama.cpp (as the llama-cpp-python package) from its sdist for `qvl-export bench --peers llama.cpp`,
# and unpack the same sources so the bench can run llama.cpp's own GGUF converter.
#
#   tools/build_llama_cpp.sh [DEST]        # DEST default: ./peers/llama.cpp
#   export QVL_LLAMA_CPP_SRC=DEST/vendor/llama.cpp
#
# The CPU features are named instead of detected (GGML_NATIVE=OFF): some virtual machines advertise
# AMX without enabling it, and a llama.cpp that trusts the flag crashes. AVX-512 / VNNI are kept when
# the CPU has them (read from /proc/cpuinfo).
set -euo pipefail
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
dest="${1:-peers/llama.cpp}"
mkdir -p "$dest"
pip download --no-deps --no-binary :all: -d "$dest" "llama-cpp-python==$version"
tar xzf "$dest/llama_cpp_python-$version.tar.gz" -C "$dest"
src="$dest/llama_cpp_python-$version"
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)"
args+=" -DGGML_BMI2=$(has bmi2) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)"
args+=" -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni)"
args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF"
args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="$args" pip install "$src"
# the converter imports sentencepiece even for a BPE tokenizer; its other requirements (torch, numpy,
# transformers) are the build extra's, not the pins of its requirements file (which pull another torch)
pip install "sentencepiece>=0.1.98,<0.3.0"
echo "export QVL_LLAMA_CPP_SRC=$(cd "$src/vendor/llama.cpp" && pwd)"
