#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-quantize from the source distribution of llama-cpp-python
# (which vendors llama.cpp and its convert_hf_to_gguf.py) into a cache outside the repository.
#
#   benchmarks/build_llamacpp.sh [VERSION] [CACHE_DIR]
#
# VERSION defaults to 0.3.36 (llama.cpp commit 0c1e570), CACHE_DIR to ~/.cache/dsv3-llamacpp. The build is
# keyed by version: a second call with the same version only prints the paths. Prints, last, one line
#   LLAMA_CPP_DIR=<vendored llama.cpp source> LLAMA_BIN_DIR=<directory holding llama-bench, llama-quantize>
# Building takes tens of minutes with -j2; set JOBS to change the parallelism, CMAKE_EXTRA for more flags.
set -euo pipefail
VERSION="${1:-0.3.36}"
CACHE="${2:-$HOME/.cache/dsv3-llamacpp}/$VERSION"
JOBS="${JOBS:-2}"
PY="${PYTHON:-python}"
mkdir -p "$CACHE"
SRC="$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$CACHE/build"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  if [ ! -f "$CACHE/llama_cpp_python-$VERSION.tar.gz" ]; then
    "$PY" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$CACHE"
  fi
  tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
if [ ! -x "$BUILD/bin/llama-bench" ] || [ ! -x "$BUILD/bin/llama-quantize" ]; then
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF ${CMAKE_EXTRA:-}
  cmake --build "$BUILD" --target llama-bench llama-quantize -j "$JOBS"
fi
echo "LLAMA_CPP_DIR=$SRC LLAMA_BIN_DIR=$BUILD/bin"
