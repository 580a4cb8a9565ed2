#!/usr/bin/env bash
# Bundle what scripts/device-check.sh needs on a GPU machine that has no network and no
# project venv (only its own Python with torch and the CUDA pip libraries) into one ignored
# folder of at most 60 MiB (default build/device-check):
#
#   caffe/      the GPU build's caffe tool and libcaffe (stripped), its build-info, and the
#               small non-CUDA libraries it loads from the prefix (boost, glog, gflags,
#               protobuf, hdf5, lmdb, snappy, gfortran...).  OpenBLAS (35 MiB) is replaced by
#               Debian 11's reference BLAS (libblas3, <1 MiB): only the CPU parity run uses it.
#               cudart/cuBLAS/cuRAND are NOT bundled (~700 MiB): the GPU machine's own pip
#               packages provide them (bin/caffe looks for them, see scripts/device-check.sh).
#   pylib/      the pure-Python packages the project imports (jinja2, markupsafe, protobuf,
#               lmdb) for CPython 3.12 on x86-64, unpacked from their wheels
#   data/digits the digits LMDBs (python -m metaqnn prepare --dataset digits)
#   published/  the published SVHN nets (from ../shared/reference/published-caffe)
#
# Usage: scripts/make-device-bundle.sh [OUT]   (default build/device-check)
# Environment: METAQNN_CAFFE_GPU_PREFIX, PYTHON (the project venv's python, for prepare),
#   BUNDLE_PYTHON_VERSION (default 3.12), METAQNN_PUBLISHED.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/build/device-check}
prefix=${METAQNN_CAFFE_GPU_PREFIX:-$here/.deps/caffe-gpu}
python=${PYTHON:-$here/.venv/bin/python}
pyver=${BUNDLE_PYTHON_VERSION:-3.12}
published=${METAQNN_PUBLISHED:-$here/../shared/reference/published-caffe}
mirror=${METAQNN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=${METAQNN_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
limit_mib=60

say() { echo "device-bundle: $*"; }
die() { echo "device-bundle: error: $*" >&2; exit 1; }

[ -f "$prefix/.complete" ] && [ -x "$prefix/libexec/caffe" ] || die "no GPU build at $prefix: run \`make caffe-gpu\` first"
[ -x "$python" ] || die "$python not found: run \`make venv\` first (or set PYTHON)"
[ -d "$published/prototxt" ] || die "published nets not found at $published (set METAQNN_PUBLISHED)"
command -v strip >/dev/null || die "strip not found: apt-get install binutils"

work="$out.partial"
rm -rf "$work"
mkdir -p "$work/caffe/bin" "$work/caffe/lib" "$work/caffe/libexec" "$work/pylib" "$work/data" "$work/published/prototxt"

# --- the caffe tool, libcaffe and the non-CUDA libraries it loads -----------------------------
cp "$prefix/libexec/caffe" "$work/caffe/libexec/"
cp -P "$prefix"/lib/libcaffe.so* "$work/caffe/lib/"
strip --strip-unneeded "$work/caffe/libexec/caffe" "$work"/caffe/lib/libcaffe.so.*.*
cp "$prefix/build-info" "$work/caffe/"
cp "$prefix/.complete" "$work/caffe/.complete"
root=$prefix/root
cuda_dir=""
for d in "$prefix"/cuda/nvidia/cu*/lib; do [ -d "$d" ] && cuda_dir=$d; done
libpath="$prefix/lib:$root/usr/lib/x86_64-linux-gnu/openblas-pthread:$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu${cuda_dir:+:$cuda_dir}"
n=0
while read -r name path; do
  case $name in
    libcuda.so*|libcudart.so*|libcublas*.so*|libcurand.so*|libcaffe.so*) continue ;;
  esac
  case $path in
    "$root"/*|"$prefix"/*) ;;
    *) continue ;;  # the system's own (glibc, libstdc++, libgcc): the GPU machine has them
  esac
  if [ "$name" = libopenblas.so.0 ]; then continue; fi  # replaced by the reference BLAS below
  cp -L "$path" "$work/caffe/lib/$name"
  n=$((n + 1))
done < <(LD_LIBRARY_PATH=$libpath ldd "$prefix/libexec/caffe" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
say "bundled $n libraries of the prefix"

# Debian 11's reference BLAS (with CBLAS) under OpenBLAS's soname: libcaffe calls only cblas_*.
apt="$work/apt"
mkdir -p "$apt/etc/sources.list.d" "$apt/etc/preferences.d" "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/x"
: > "$apt/state/status"
echo "deb [signed-by=$keyring] $mirror bullseye main" > "$apt/etc/sources.list"
apt_opts=(-o "Dir::Etc=$apt/etc" -o "Dir::Etc::sourcelist=$apt/etc/sources.list"
          -o "Dir::Etc::sourceparts=$apt/etc/sources.list.d" -o "Dir::Etc::preferencesparts=$apt/etc/preferences.d"
          -o "Dir::State=$apt/state" -o "Dir::State::status=$apt/state/status" -o "Dir::Cache=$apt/cache"
          -o "APT::Architecture=amd64" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" -qq update >/dev/null 2>&1 || die "apt-get update against $mirror (bullseye) failed: no network?"
(cd "$apt" && apt-get "${apt_opts[@]}" -qq download libblas3 >/dev/null 2>&1) || die "downloading libblas3 failed (network?)"
dpkg-deb -x "$apt"/libblas3_*.deb "$apt/x"
blas=$(ls "$apt"/x/usr/lib/x86_64-linux-gnu/blas/libblas.so.3.*)
cp "$blas" "$work/caffe/lib/libopenblas.so.0"
for lib in libgfortran.so.5 libquadmath.so.0; do  # what the reference BLAS needs
  [ -e "$work/caffe/lib/$lib" ] || cp -L "$root/usr/lib/x86_64-linux-gnu/$lib" "$work/caffe/lib/" 2>/dev/null || true
done
rm -rf "$apt"

cat > "$work/caffe/bin/caffe" <<'EOF'
#!/bin/sh
# Generated by scripts/make-device-bundle.sh: the GPU build's caffe with the bundled libraries.
# CUDA runtime libraries (cudart 13, cuBLAS, cuRAND): the directories in METAQNN_CUDA_LIBS.
here="$(cd "$(dirname "$0")/.." && pwd)"
LD_LIBRARY_PATH="$here/lib${METAQNN_CUDA_LIBS:+:$METAQNN_CUDA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec "$here/libexec/caffe" "$@"
EOF
chmod +x "$work/caffe/bin/caffe"

# --- pure-Python packages for the GPU machine's Python --------------------------------------
"$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$pyver" --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$work/wheels" 'jinja2>=3' 'markupsafe>=2' 'protobuf>=4.25,<7' 'lmdb>=1.4' >"$work/pip.log" 2>&1 \
  || die "pip could not download the wheels for Python $pyver (network?): $(tail -1 "$work/pip.log")"
for whl in "$work"/wheels/*.whl; do
  "$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$work/pylib"
done
rm -rf "$work/wheels" "$work/pip.log" "$work"/pylib/*.dist-info

# --- data and nets ---------------------------------------------------------------------------
(cd "$here" && "$python" -m metaqnn prepare --dataset digits --data-dir "$work/data/digits" >/dev/null) \
  || die "preparing the digits LMDBs failed"
rm -f "$work"/data/digits/*.lmdb/lock.mdb
cp "$published"/prototxt/svhn_*.prototxt "$work/published/prototxt/"

size_kib=$(du -sk "$work" | cut -f1)
[ "$size_kib" -le $((limit_mib * 1024)) ] || die "the bundle is $((size_kib / 1024)) MiB, over the $limit_mib MiB limit"
rm -rf "$out"
mv "$work" "$out"
say "done: $out, $((size_kib / 1024)).$(( (size_kib % 1024) * 10 / 1024 )) MiB (limit $limit_mib MiB); carry it to the GPU machine with the working tree"
