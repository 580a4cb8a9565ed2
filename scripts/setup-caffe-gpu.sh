#!/usr/bin/env bash
# Build Caffe 1.0 for NVIDIA GPUs into a private prefix, WITHOUT touching the
# machine's own packages (the GPU twin of scripts/setup-caffe.sh).
#
#   sources   Debian 11's source package `caffe` (1.0.0+git20180821, with
#             Debian's own patches) plus this project's patches/caffe-gpu/*.patch
#   deps      the bullseye -dev closure (boost, glog, gflags, protobuf, hdf5,
#             lmdb, openblas, snappy), resolved in a private apt configuration
#             and unpacked with dpkg-deb -x, as for the CPU prefix
#   toolkit   CUDA 13 from PyPI (pip --target into the prefix) by default, or
#             the user's own toolkit with CUDA_HOME=/usr/local/cuda-12.4 (any
#             11.8 or newer; use it when the driver is older than R580)
#   arches    GPU_ARCHS (default "80 90": A100, H100; sm_80 code also runs on
#             sm_86/89 cards) and GPU_PTX (default "90": PTX that the driver
#             JIT-compiles for newer GPUs such as sm_100/120)
#   cuDNN     off (USE_CUDNN=OFF): MetaQNN's nets are small and cuDNN would
#             tie the build to one cuDNN major version
#
# The result: PREFIX/bin/caffe (a wrapper that puts the prefix's libraries and
# the CUDA runtime libraries on LD_LIBRARY_PATH), PREFIX/build-info (what was
# built: toolkit, CUDA version, arches, build time) and PREFIX/.complete.
# Idempotent: a finished prefix built with the same settings exits at once.
#
# Usage: scripts/setup-caffe-gpu.sh [PREFIX]
#   (default: $METAQNN_CAFFE_GPU_PREFIX or .deps/caffe-gpu)
# Environment: CUDA_HOME, GPU_ARCHS, GPU_PTX, JOBS (parallel compile jobs),
#   CUDA_HOST_CXX (host compiler for nvcc; default g++-12 or g++), PYTHON (for pip).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-${METAQNN_CAFFE_GPU_PREFIX:-$here/.deps/caffe-gpu}}
mirror=${METAQNN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=${METAQNN_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
python=${PYTHON:-python3}
# CUDA 13 wheels that work together (checked 2026-11): one tree, nvidia/cu13.
cuda_wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
             nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
             nvidia-curand==10.4.0.35)
patches=("$here"/patches/caffe-gpu/*.patch)

say() { echo "setup-caffe-gpu: $*"; }
die() { echo "setup-caffe-gpu: error: $*" >&2; exit 1; }

# --- every value and precondition is checked here, before anything is deleted or fetched --------
# A variable that is set but blank is refused (it would silently mean the default).
blank() { [ -n "${!1+set}" ] && [ -z "$(echo "${!1}" | tr -d '[:space:]')" ]; }
blank GPU_ARCHS && die "GPU_ARCHS is blank: give compute capabilities like \"80 90\", or unset it for the default"
blank GPU_PTX && die "GPU_PTX is blank: give compute capabilities like \"90\", GPU_PTX=none for no PTX, or unset it for the default"
blank JOBS && die "JOBS is blank: give a positive number of parallel compile jobs, or unset it for one per core"
blank CUDA_HOME && die "CUDA_HOME is blank: point it at a CUDA toolkit (11.8 or newer), or unset it for CUDA 13 from PyPI"
words() { local -a w; read -ra w <<<"$(printf '%s' "$1" | tr ',;\n\t' '    ')"; echo "${w[*]}"; }
archs=$(words "${GPU_ARCHS:-80 90}")
ptx=$(words "${GPU_PTX:-90}")
[ -n "$archs" ] || die "GPU_ARCHS is blank: give compute capabilities like \"80 90\", or unset it for the default"
[ -n "$ptx" ] || die "GPU_PTX is blank: give compute capabilities like \"90\", GPU_PTX=none for no PTX, or unset it for the default"
if [ "$ptx" = none ]; then ptx=""; fi
for a in $archs $ptx; do
  [[ $a =~ ^[1-9][0-9]{1,2}$ ]] \
    || die "GPU_ARCHS/GPU_PTX must be compute capabilities without dots, like \"80 90\" (got '$a')"
done
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}
[[ $jobs =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive integer (got '$jobs')"
cuda_home=${CUDA_HOME:-}
if [ -z "$cuda_home" ]; then  # CUDA 13 from PyPI: known before anything is fetched
  for a in $archs $ptx; do
    [ "$a" -ge 75 ] || die "CUDA 13 (the default, from PyPI) cannot build for compute capability $a (it supports 75 and newer): drop it from GPU_ARCHS/GPU_PTX or use CUDA_HOME with CUDA 12"
  done
fi
patch_sum=$(cat "${patches[@]}" | sha256sum | cut -c1-12)
stamp_text="caffe-1.0 gpu bullseye toolkit=${cuda_home:-pypi-cuda13.0} archs=$archs ptx=$ptx patches=$patch_sum v1"

if [ -f "$prefix/.complete" ] && [ "$(cat "$prefix/.complete")" = "$stamp_text" ] \
   && "$prefix/bin/caffe" --version >/dev/null 2>&1; then
  say "already built, nothing to do: $prefix ($(grep -E '^(cuda|archs|ptx)=' "$prefix/build-info" | tr '\n' ' '))"
  exit 0
fi
start=$(date +%s)

# The prefix and its work folder PREFIX.partial must be creatable and writable.
work="$prefix.partial"
parent=$(dirname "$prefix")
while [ ! -e "$parent" ]; do parent=$(dirname "$parent"); done
[ -d "$parent" ] && [ -w "$parent" ] || die "cannot create $prefix: $parent is not a writable folder (set METAQNN_CAFFE_GPU_PREFIX or give another PREFIX)"
for d in "$prefix" "$work"; do
  [ ! -e "$d" ] || { [ -d "$d" ] && [ -w "$d" ]; } || die "$d exists and is not a writable folder"
done

[ "$(uname -s)" = Linux ] || die "unsupported OS $(uname -s): the GPU build needs Debian/Ubuntu on Linux x86-64"
[ "$(uname -m)" = x86_64 ] || die "unsupported architecture $(uname -m): the GPU build is x86-64 only"
for tool in apt-get dpkg-deb dpkg-source patch cmake make; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install dpkg-dev patch cmake make"
done
[ -r "$keyring" ] || die "Debian archive keyring $keyring not readable (apt-get install debian-archive-keyring, or set METAQNN_DEBIAN_KEYRING)"
host_cxx=${CUDA_HOST_CXX:-$(command -v g++-12 || command -v g++ || true)}
[ -n "$host_cxx" ] && command -v "$host_cxx" >/dev/null \
  || die "no C++ compiler: apt-get install g++ (or set CUDA_HOST_CXX=/path/to/g++)"
host_cc=${CUDA_HOST_CC:-${host_cxx%++}cc}
command -v "$host_cc" >/dev/null || host_cc=${host_cxx/g++/gcc}
command -v "$host_cc" >/dev/null || die "no C compiler next to $host_cxx: apt-get install gcc (or set CUDA_HOST_CC)"
cxx_major=$("$host_cxx" -dumpversion | cut -d. -f1)

# The toolkit: the user's (its nvcc says which CUDA), or CUDA 13.0 from PyPI (needs pip).
if [ -n "$cuda_home" ]; then
  [ -x "$cuda_home/bin/nvcc" ] || die "CUDA_HOME=$cuda_home has no bin/nvcc: point it at a CUDA toolkit (11.8 or newer)"
  cuda_version=$("$cuda_home/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')
  [ -n "$cuda_version" ] || die "cannot read the CUDA version from $cuda_home/bin/nvcc --version"
else
  command -v "$python" >/dev/null || die "$python not found: pip is needed to fetch CUDA 13 from PyPI (or set CUDA_HOME)"
  "$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip: apt-get install python3-pip (or set CUDA_HOME)"
  cuda_version=13.0
fi
cuda_major=${cuda_version%%.*}
cuda_minor=${cuda_version#*.}
if [ "$cuda_major" -lt 11 ] || { [ "$cuda_major" -eq 11 ] && [ "${cuda_minor%%.*}" -lt 8 ]; }; then
  die "unsupported CUDA toolkit $cuda_version at $cuda_home: need 11.8 or newer (sm_80/sm_90)"
fi
if [ "$cuda_major" -ge 13 ]; then
  for a in $archs $ptx; do
    [ "$a" -ge 75 ] || die "CUDA $cuda_version cannot build for compute capability $a (13.x supports 75 and newer): drop it from GPU_ARCHS/GPU_PTX or use CUDA_HOME with CUDA 12"
  done
fi
if [ "$cuda_major" -eq 11 ] && [ "$cxx_major" -gt 11 ]; then
  die "CUDA $cuda_version needs g++ 11 or older as host compiler ($host_cxx is $cxx_major): apt-get install g++-11 and set CUDA_HOST_CXX=g++-11"
fi

# --- toolkit -------------------------------------------------------------------
# An interrupted or failed build with the same settings resumes in its folder (make is incremental);
# one with other settings is removed (only now, after every check above has passed).
resume=0
if [ -f "$work/.stamp" ] && [ "$(cat "$work/.stamp")" = "$stamp_text" ] && [ -f "$work/build/CMakeCache.txt" ] \
   && [ -f "$work/.sources-ready" ]; then
  resume=1
  say "resuming the unfinished build in $work"
elif [ -e "$work" ]; then
  say "removing the unfinished build in $work (other settings: $(cat "$work/.stamp" 2>/dev/null || echo unknown))"
  rm -rf "$work"
fi
mkdir -p "$work/bin" "$work/lib" "$work/libexec" "$work/root"
echo "$stamp_text" > "$work/.stamp"
if [ -n "$cuda_home" ]; then
  toolkit=$cuda_home
  cuda_libdir=$cuda_home/lib64
  [ -d "$cuda_libdir" ] || cuda_libdir=$cuda_home/lib
else
  [ "$resume" = 1 ] || say "fetching CUDA 13 from PyPI (~1 GB on disk)"
  [ "$resume" = 1 ] || "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$work/cuda" "${cuda_wheels[@]}" \
    >"$work/pip.log" 2>&1 \
    || die "pip could not fetch the CUDA 13 wheels (no network, or no PyPI?): $(grep -m1 -iE 'error' "$work/pip.log" || tail -1 "$work/pip.log")"
  toolkit=$work/cuda/nvidia/cu13
  [ -x "$toolkit/bin/nvcc" ] || die "the CUDA wheels installed no nvidia/cu13/bin/nvcc"
  ln -sfn lib "$toolkit/lib64"
  for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
    [ -e "$toolkit/lib/$l" ] || die "the CUDA wheels installed no $l"
    ln -sfn "$l" "$toolkit/lib/${l%%.so.*}.so"
  done
  cuda_libdir=$toolkit/lib
  cuda_version=$("$toolkit/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')
  [ -n "$cuda_version" ] || die "cannot read the CUDA version from $toolkit/bin/nvcc --version"
fi
say "toolkit: CUDA $cuda_version ($toolkit), arches sm_${archs// /,sm_}${ptx:+ + PTX $ptx}, host $host_cxx"

# --- Debian sources and build dependencies -----------------------------------
if [ "$resume" = 0 ]; then  # (not indented, to keep the steps readable)
mkdir -p "$work/src"
# shellcheck source=scripts/private-apt.sh
. "$here/scripts/private-apt.sh"
private_apt "$work" "$mirror" "$keyring" deb-src
say "resolving Debian 11 (bullseye) caffe sources and build dependencies in a private apt configuration"
apt-get "${apt_opts[@]}" -qq update >/dev/null 2>&1 && compgen -G "$work/apt/state/lists/*_Sources*" >/dev/null \
  || die "apt-get update against $mirror (bullseye) failed: no network or mirror unreachable"
(cd "$work/src" && apt-get "${apt_opts[@]}" -qq source --download-only caffe >/dev/null 2>&1) \
  || die "downloading the caffe source package failed (network?)"
dsc=$(ls "$work"/src/caffe_*.dsc)
dpkg-source -x "$dsc" "$work/src/caffe" >/dev/null 2>&1 || die "could not unpack $(basename "$dsc")"
for p in "${patches[@]}"; do
  patch -s -p1 -d "$work/src/caffe" < "$p" || die "patch $(basename "$p") does not apply to $(basename "$dsc")"
done
say "applied ${#patches[@]} project patches to $(basename "$dsc" .dsc)"

dev_pkgs=(libboost-system-dev libboost-thread-dev libboost-filesystem-dev libgoogle-glog-dev libgflags-dev
          libprotobuf-dev protobuf-compiler libhdf5-dev liblmdb-dev libopenblas-dev libopenblas0-pthread
          libsnappy-dev)
apt-get "${apt_opts[@]}" -qq -y install -d "${dev_pkgs[@]}" >/dev/null 2>&1 \
  || die "downloading the build dependencies failed (network?)"
# The C library, the compiler's runtime and headers, and base tools come from
# the running system; the bullseye libraries and headers go into the prefix.
skip='^(libc6|libc6-dev|libc-dev-bin|linux-libc-dev|libcrypt1|libcrypt-dev|libgcc-s1|libgcc-10-dev|libstdc\+\+6|libstdc\+\+-10-dev|gcc-10-base|libasan6|libatomic1|libgomp1|libitm1|liblsan0|libtsan0|libubsan1|libtirpc-dev|libnsl-dev|coreutils|dpkg|tar|perl-base|debconf)_'
unpack_debs "$work/apt/cache/archives" "$work/root" "$skip"
n=$unpacked
rm -rf "$work/apt/cache/archives"
# Absolute symlinks (libz.so, liblzma.so, ...) would point into the system: make them relative.
while IFS= read -r link; do
  target=$(readlink "$link")
  [ -e "$work/root$target" ] && ln -sfn "$(realpath --relative-to="$(dirname "$link")" "$work/root$target")" "$link"
done < <(find "$work/root" -type l -lname '/*')
say "unpacked $n dependency packages"
touch "$work/.sources-ready"
fi
dsc=$(ls "$work"/src/caffe_*.dsc)

# --- configure and build (libcaffe, the caffe tool and extract_features only) --
deps=$work/root/usr
multi=$deps/lib/x86_64-linux-gnu
build=$work/build
export LD_LIBRARY_PATH="$multi:$work/root/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # protoc
ptx_flag=()
[ -n "$ptx" ] && ptx_flag=(-DCUDA_ARCH_PTX="$ptx")
# CMAKE_POLICY_VERSION_MINIMUM: CMake 4 refuses Caffe's cmake_minimum_required(2.8.7) without it.
cmake -S "$work/src/caffe" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
  -DCMAKE_C_COMPILER="$host_cc" -DCMAKE_CXX_COMPILER="$host_cxx" \
  -DCPU_ONLY=OFF -DUSE_CUDNN=OFF -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=ON -DUSE_NCCL=OFF \
  -DBUILD_python=OFF -DBUILD_python_layer=OFF -DBUILD_matlab=OFF -DBUILD_docs=OFF -DBUILD_SHARED_LIBS=ON \
  -DCUDA_TOOLKIT_ROOT_DIR="$toolkit" -DCUDA_HOST_COMPILER="$host_cxx" \
  -DCUDA_ARCH_NAME=Manual -DCUDA_ARCH_BIN="$archs" "${ptx_flag[@]}" \
  -DCMAKE_PREFIX_PATH="$deps" -DBOOST_ROOT="$deps" -DBoost_NO_SYSTEM_PATHS=ON \
  -DGFLAGS_ROOT_DIR="$deps" -DGLOG_ROOT_DIR="$deps" \
  -DProtobuf_PROTOC_EXECUTABLE="$deps/bin/protoc" -DProtobuf_INCLUDE_DIR="$deps/include" \
  -DProtobuf_LIBRARY="$multi/libprotobuf.so" \
  -DHDF5_ROOT="$multi/hdf5/serial" -DHDF5_C_COMPILER_EXECUTABLE="$work/no-h5cc" \
  -DBLAS=Open -DOpenBLAS_INCLUDE_DIR="$deps/include/x86_64-linux-gnu/openblas-pthread" \
  -DOpenBLAS_LIB="$multi/openblas-pthread/libopenblas.so" \
  >"$work/configure.log" 2>&1 \
  || die "cmake configure failed: $(grep -m1 -A2 'CMake Error' "$work/configure.log" | tr '\n' ' ' | cut -c1-300) (log: $work/configure.log)"
say "compiling caffe with $jobs jobs (about 20 minutes on 2 cores)"
make -C "$build" -j"$jobs" caffe.bin extract_features >"$work/build.log" 2>&1 \
  || die "compile failed: $(grep -E ': error|\*\*\*' "$work/build.log" | head -1 | cut -c1-300) (log: $work/build.log)"

cp "$build/tools/caffe" "$build/tools/extract_features" "$work/libexec/"
cp -P "$build"/lib/libcaffe.so* "$work/lib/"
cp "$work/src/caffe/debian/copyright" "$work/COPYRIGHT.caffe" 2>/dev/null || true
# The schema for Python (metaqnn.caffe.schema): caffe.proto and its caffe_pb2.py, as pycaffe has them.
mkdir -p "$work/include/caffe/proto" "$work/python/caffe/proto"
cp "$work/src/caffe/src/caffe/proto/caffe.proto" "$work/include/caffe/proto/"
"$deps/bin/protoc" --proto_path="$work/src/caffe/src/caffe/proto" --python_out="$work/python/caffe/proto" caffe.proto \
  || die "protoc could not write caffe_pb2.py"

# --- wrapper -------------------------------------------------------------------
# CUDA runtime libraries, first found wins: METAQNN_CUDA_LIBS, CUDA_HOME at run
# time, the CUDA pip packages of an active or the project's venv, then the
# toolkit this was built with.
rel_cuda=""
if [ -z "$cuda_home" ]; then rel_cuda='$prefix/cuda/nvidia/cu13/lib'; else rel_cuda=$cuda_libdir; fi
for tool in caffe extract_features; do
  cat > "$work/bin/$tool" <<EOF
#!/bin/sh
# Generated by scripts/setup-caffe-gpu.sh: $tool of Caffe 1.0 for NVIDIA GPUs (CUDA $cuda_version, sm_${archs// /,sm_}${ptx:+, PTX $ptx}).
prefix="\$(cd "\$(dirname "\$0")/.." && pwd)"
root="\$prefix/root"
cuda=""
for d in \$(echo "\${METAQNN_CUDA_LIBS:-}" | tr : ' ') \${CUDA_HOME:+\$CUDA_HOME/lib64} \${VIRTUAL_ENV:+\$VIRTUAL_ENV/lib/python3*/site-packages/nvidia/cu$cuda_major/lib} \\
         "\$prefix"/../../.venv/lib/python3*/site-packages/nvidia/cu$cuda_major/lib "$rel_cuda"; do
  [ -e "\$d/libcudart.so.$cuda_major" ] && cuda="\${cuda:+\$cuda:}\$d"
done
LD_LIBRARY_PATH="\$prefix/lib:\$root/usr/lib/x86_64-linux-gnu/openblas-pthread:\$root/usr/lib/x86_64-linux-gnu:\$root/lib/x86_64-linux-gnu\${cuda:+:\$cuda}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec "\$prefix/libexec/$tool" "\$@"
EOF
  chmod +x "$work/bin/$tool"
done

# Only the runtime libraries of the toolkit are needed from here on.
if [ -z "$cuda_home" ]; then
  rm -rf "$toolkit/bin" "$toolkit/nvvm" "$toolkit/include" "$work/cuda/bin"
fi
mkdir -p "$work/logs"
mv "$work/configure.log" "$work/build.log" "$work/logs/"
rm -rf "$build" "$work/src" "$work/apt" "$work/pip.log"
rm -rf "$work/root/usr/include" "$work/root/usr/share/doc" "$work/root/usr/share/man"
# What the runtime never loads: static archives and libnvvm (about 64 MB).
find "$work" \( -name '*.a' -o -name 'libnvvm*' \) \( -type f -o -type l \) -delete

"$work/bin/caffe" --version >/dev/null 2>&1 || die "the built caffe does not run: $("$work/bin/caffe" --version 2>&1 | tail -1)"
missing=$(LD_LIBRARY_PATH="$work/lib:$multi/openblas-pthread:$multi:$work/root/lib/x86_64-linux-gnu:$cuda_libdir" \
          ldd "$work/libexec/caffe" | grep 'not found' | grep -v libcuda.so || true)
[ -z "$missing" ] || die "unresolved libraries: $missing"

seconds=$(( $(date +%s) - start ))
cat > "$work/build-info" <<EOF
# Written by scripts/setup-caffe-gpu.sh; read by \`python -m metaqnn caffe-info\`.
build=gpu
cuda=$cuda_version
toolkit=${cuda_home:-pypi}
archs=$archs
ptx=$ptx
cudnn=off
host_compiler=$host_cxx $("$host_cxx" -dumpversion)
source=$(basename "$dsc" .dsc)
patches=$(for p in "${patches[@]}"; do basename "$p"; done | tr '\n' ' ' | xargs)
jobs=$jobs
build_seconds=$seconds
resumed=$resume
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
echo "$stamp_text" > "$work/.complete"
rm -f "$work/.stamp" "$work/.sources-ready"
rm -rf "$prefix"
mv "$work" "$prefix"
say "done in $((seconds / 60)) min $((seconds % 60)) s: $("$prefix/bin/caffe" --version 2>&1) for CUDA $cuda_version at $prefix/bin/caffe (no system package touched)"
