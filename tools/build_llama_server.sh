#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the sources vendored in the llama-cpp-python sdist on the
# package index (no other downloads), and caches the binary by version in the user's cache folder.
#
#   tools/build_llama_server.sh            # prints the path of the cached binary (builds if needed)
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 tools/build_llama_server.sh
#
# Idempotent: a cached binary that runs is reused; concurrent calls wait on one lock. CPU only
# (no GPU backends), no web-UI download or npm build, no libcurl; a static binary so the cache holds one file.
# About 5 minutes on 2 cores. Progress goes to stderr; stdout is only the path.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/wattmeter"
BIN="$CACHE_DIR/llama-server-$VERSION"
JOBS="${LLAMA_BUILD_JOBS:-2}"

usable() { [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; }

mkdir -p "$CACHE_DIR"
if usable; then echo "$BIN"; exit 0; fi

exec 9>"$CACHE_DIR/.llama-server-$VERSION.lock"
flock 9                                   # another build of this version may be running
if usable; then echo "$BIN"; exit 0; fi   # ... and may have just finished

for tool in cmake c++ python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build_llama_server: $tool not found; install it (Debian: cmake g++)" >&2; exit 2; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "build_llama_server: downloading the llama-cpp-python $VERSION sdist" >&2
# Only this package from source; its build backend comes as a wheel (":all:" would build
# scikit-build-core and its own dependencies from source too, just for the metadata step).
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
  "llama-cpp-python==$VERSION" -d "$WORK" >&2
SDIST="$(ls "$WORK"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || ls "$WORK"/*.tar.gz | head -n1)"
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "build_llama_server: no vendored llama.cpp in $SDIST" >&2; exit 1; }

echo "build_llama_server: configuring (CPU only)" >&2
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
cmake -S "$SRC" -B "$WORK/build" "${GEN[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DGGML_NATIVE=OFF \
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF -DGGML_OPENCL=OFF \
  >"$WORK/configure.log" 2>&1 || { tail -n 40 "$WORK/configure.log" >&2; exit 1; }

echo "build_llama_server: building target llama-server with -j$JOBS" >&2
cmake --build "$WORK/build" --target llama-server -j "$JOBS" >"$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log" >&2; exit 1; }

install -m 0755 "$WORK/build/bin/llama-server" "$BIN.tmp.$$"
mv -f "$BIN.tmp.$$" "$BIN"                # atomic: a reader never sees half a binary
usable || { echo "build_llama_server: built $BIN but it does not run" >&2; exit 1; }
echo "$BIN"
