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
#   pylib/      the packages the project imports that a bare Python may lack (jinja2,
#               markupsafe, protobuf (abi3)), unpacked from their wheels
#   pylib-cp310/ ... pylib-cp313/   lmdb (a C extension) for each of CPython 3.10-3.13 on x86-64,
#               and tomli for 3.10 (numpy and h5py are the GPU machine's own)
#   data/digits the digits LMDBs (python -m metaqnn prepare --dataset digits)
#   published/  the published SVHN nets (from ../shared/reference/published-caffe)
#
# Usage: scripts/make-device-bundle.sh [OUT]   (default build/device-check)
# Environment: METAQNN_CAFFE_GPU_PREFIX, PYTHON (the project venv's python, for prepare),
#   BUNDLE_PYTHON_VERSIONS (default "3.10 3.11 3.12 3.13"), METAQNN_PUBLISHED,
#   DEVICE_BUNDLE_LIMIT_MIB (default 60; only a dry run with a CPU build as the prefix needs more).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/build/device-check}
prefix=${METAQNN_CAFFE_GPU_PREFIX:-$here/.deps/caffe-gpu}
python=${PYTHON:-$here/.venv/bin/python}
pyvers=${BUNDLE_PYTHON_VERSIONS:-3.10 3.11 3.12 3.13}
published=${METAQNN_PUBLISHED:-$here/../shared/reference/published-caffe}
mirror=${METAQNN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=${METAQNN_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
limit_mib=${DEVICE_BUNDLE_LIMIT_MIB:-60}

say() { echo "device-bundle: $*"; }
die() { echo "device-bundle: error: $*" >&2; exit 1; }

[ -f "$prefix/.complete" ] && [ -x "$prefix/libexec/caffe" ] || die "no GPU build at $prefix: run \`make caffe-gpu\` first"
[ -x "$python" ] || die "$python not found: run \`make venv\` first (or set PYTHON)"
[[ $limit_mib =~ ^[1-9][0-9]*$ ]] || die "DEVICE_BUNDLE_LIMIT_MIB must be a positive integer (got '$limit_mib')"
for v in $pyvers; do [[ $v =~ ^3\.[0-9]+$ ]] || die "BUNDLE_PYTHON_VERSIONS must be like \"3.10 3.12\" (got '$v')"; done
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
libpath="$prefix/lib:$root/usr/lib/x86_64-linux-gnu/openblas-pthread:$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu:$root/usr/lib${cuda_dir:+:$cuda_dir}"
closure=$(LD_LIBRARY_PATH=$libpath ldd "$prefix/libexec/caffe" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
# The reference BLAS replaces OpenBLAS only where libopenblas.so.0 is all that is loaded from it (the
# GPU build); a build that also loads OpenBLAS's libblas/liblapack (Debian's CPU caffe as the prefix,
# in a dry run) keeps OpenBLAS.
ref_blas=1
if echo "$closure" | awk '{print $2}' | grep '/openblas-pthread/' | grep -qv '/libopenblas\.so\.0$'; then ref_blas=0; fi
n=0
while read -r name path; do
  case $name in
    libcuda.so*|libcudart.so*|libcublas*.so*|libcurand.so*|libcaffe.so*) continue ;;
  esac
  case $path in
    "$root"/*|"$prefix"/*) ;;
    *) continue ;;  # the system's own (glibc, libstdc++, libgcc): the GPU machine has them
  esac
  if [ "$name" = libopenblas.so.0 ] && [ "$ref_blas" = 1 ]; then continue; fi  # replaced below
  cp -L "$path" "$work/caffe/lib/$name"
  n=$((n + 1))
done <<<"$closure"
say "bundled $n libraries of the prefix"

# Debian 11's reference BLAS (with CBLAS) under OpenBLAS's soname: libcaffe calls only cblas_*.
if [ "$ref_blas" = 1 ]; then
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
else
  say "kept OpenBLAS: this build loads more of it than libopenblas.so.0"
fi

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

# --- Python packages for the GPU machine's Python (3.10 to 3.13) -----------------------------
pipdl=("$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp
       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
unpack_wheels() {  # DIR TARGET: unpack every wheel of DIR into TARGET, without their metadata
  local whl
  for whl in "$1"/*.whl; do
    "$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$2"
  done
  rm -rf "$1" "$2"/*.dist-info
}
# protobuf's wheel is abi3, jinja2 is pure Python; markupsafe's C speedups are for 3.12 (the GPU
# machine's Python), and it falls back to its pure-Python code on the others.
"${pipdl[@]}" --python-version 3.12 -d "$work/wheels" 'jinja2>=3' 'markupsafe>=2' 'protobuf>=4.25,<7' \
  >"$work/pip.log" 2>&1 || die "pip could not download the wheels for Python 3.12 (network?): $(tail -1 "$work/pip.log")"
unpack_wheels "$work/wheels" "$work/pylib"
for v in $pyvers; do
  "${pipdl[@]}" --python-version "$v" -d "$work/wheels" 'lmdb>=1.4' >"$work/pip.log" 2>&1 \
    || die "pip could not download the lmdb wheel for Python $v (network, or none on PyPI for $v?): $(tail -1 "$work/pip.log")"
  if [ "$v" = 3.10 ]; then  # tomllib is new in 3.11; tomli's wheels may be compiled per version
    "${pipdl[@]}" --python-version "$v" -d "$work/wheels" 'tomli>=1.1' >"$work/pip.log" 2>&1 \
      || die "pip could not download tomli for Python $v (network?): $(tail -1 "$work/pip.log")"
  fi
  unpack_wheels "$work/wheels" "$work/pylib-cp${v/./}"
done
rm -f "$work/pip.log"
say "Python packages for CPython $pyvers"

# --- data and nets ---------------------------------------------------------------------------
(cd "$here" && "$python" -m metaqnn prepare --dataset digits --data-dir "$work/data/digits" >/dev/null) \
  || die "preparing the digits LMDBs failed"
rm -f "$work"/data/digits/*.lmdb/lock.mdb
cp "$published"/prototxt/svhn_*.prototxt "$work/published/prototxt/"

# What the runtime never loads (static archives, libnvvm), should anything have brought it along.
find "$work" \( -name '*.a' -o -name 'libnvvm*' \) \( -type f -o -type l \) -delete
size_kib=$(du -sk "$work" | cut -f1)
[ "$size_kib" -le $((limit_mib * 1024)) ] || die "the bundle is $((size_kib / 1024)) MiB, over the $limit_mib MiB limit"
rm -rf "$out"
mv "$work" "$out"
say "done: $out, $((size_kib / 1024)).$(( (size_kib % 1024) * 10 / 1024 )) MiB (limit $limit_mib MiB); carry it to the GPU machine with the working tree"
