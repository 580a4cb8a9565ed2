#!/usr/bin/env bash
# The GPU check of issue 14, prepared to run on a GPU machine that has no network and no
# project venv: only its own Python (3.12 with torch cu130 and the CUDA 13 pip libraries),
# an NVIDIA driver (R580+ for the CUDA 13 build), and this working tree with the bundle of
# `make device-bundle` (build/device-check, <= 60 MiB) carried along.  Under 8 minutes it prints:
#
#   0. (no GPU needed) the bundle's caffe runs, the project imports, CPU run of the parity net
#   1. caffe device_query
#   2. GPU-against-CPU parity: one fixed net and seed on digits, loss at iterations 0-4
#      (relative 1e-3) and validation accuracy after one epoch (2 points)
#   3. a short digits search with GPU=0 that trains to the end (at the end, if time is left,
#      the same search with 4 trainings per GPU)
#   4. time per epoch of the published SVHN nets on synthetic 32x32x3 data made here,
#      with 1, 2, 4 and 8 trainings per GPU at once, and models per hour
#   5. the same nets in this machine's PyTorch (fp32, cuDNN): ratio of Caffe's epoch time
#
# On a machine without a GPU it runs step 0 and stops with one "no GPU" line (exit 0;
# DEVICE_CHECK_REQUIRE_GPU=1 makes that exit 3).  Logs and JSON go to $OUT/device-check.
# Usage: scripts/device-check.sh   (environment: OUT, PYTHON, DEVICE_BUNDLE, DEVICE_CHECK_BUDGET_S)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bundle=${DEVICE_BUNDLE:-$here/build/device-check}
python=${PYTHON:-}
if [ -z "$python" ]; then  # the machine's python3 (numpy; 3.12 for the bundle's lmdb), else the project's venv
  for cand in python3 "$here/.venv/bin/python"; do
    if "$cand" -c 'import sys, numpy, importlib.util as u; sys.exit(sys.version_info[:2] != (3, 12) and not u.find_spec("lmdb"))' \
       >/dev/null 2>&1; then python=$cand; break; fi
  done
  python=${python:-python3}
fi
budget=${DEVICE_CHECK_BUDGET_S:-450}
out_root=${OUT:-$(mktemp -d /tmp/device-check.XXXXXX)}
out=$out_root/device-check
start=$SECONDS

say() { echo "device-check: $*"; }
die() { echo "device-check: error: $*" >&2; exit 1; }
left() { echo $((budget - (SECONDS - start))); }
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log, show its output
  local name=$1 limit=$2
  shift 2
  if [ "$(left)" -lt 20 ]; then say "$name: skipped (time budget of $budget s spent)"; return 0; fi
  [ "$limit" -le "$(left)" ] || limit=$(left)
  local rc=0
  { timeout --kill-after=10 "$limit" "$@" 2>"$out/$name.err" | tee "$out/$name.log"; } || rc=$?
  if [ "$rc" -ne 0 ]; then
    say "$name: FAILED (exit $rc after at most $limit s): $(grep -v '^\s*$' "$out/$name.err" | tail -1)"
    failures=$((failures + 1))
  fi
  return 0
}
failures=0

# --- step 0: everything that needs no GPU -------------------------------------------------------
[ -x "$bundle/caffe/bin/caffe" ] || die "no bundle at $bundle: run \`make device-bundle\` on the build machine and carry build/device-check"
command -v "$python" >/dev/null || die "$python not found (set PYTHON)"
mkdir -p "$out"
say "bundle $bundle ($(du -sh "$bundle" | cut -f1)), python $("$python" -c 'import sys; print(sys.version.split()[0])'), output $out"

# CUDA 13 runtime libraries: this Python's nvidia pip packages (torch cu130 brings them),
# CUDA_HOME, /usr/local/cuda, or the build machine's prefix when run there.
cuda_libs=$("$python" - "$here" <<'EOF' 2>/dev/null || true
import glob, os, sys
dirs = []
try:
    import nvidia
    for base in list(nvidia.__path__):
        dirs += sorted(glob.glob(os.path.join(base, "cu13", "lib"))) + sorted(glob.glob(os.path.join(base, "*", "lib")))
except ImportError:
    pass
for d in (os.environ.get("CUDA_HOME", "") + "/lib64", "/usr/local/cuda/lib64", sys.argv[1] + "/.deps/caffe-gpu/cuda/nvidia/cu13/lib"):
    dirs.append(d)
wanted = ("libcudart.so.13", "libcublas.so.13", "libcurand.so.10")
print(":".join(d for d in dict.fromkeys(dirs) if any(os.path.exists(os.path.join(d, w)) for w in wanted)))
EOF
)
export METAQNN_CUDA_LIBS=${METAQNN_CUDA_LIBS:-$cuda_libs}
export CAFFE_BIN=$bundle/caffe/bin/caffe
# The bundle's Python packages (built for CPython 3.12) only where this Python lacks them.
mkdir -p "$out/pylib"
for spec in jinja2:jinja2 markupsafe:markupsafe google.protobuf:google lmdb:lmdb; do
  "$python" -c "import ${spec%%:*}" 2>/dev/null || ln -sfn "$bundle/pylib/${spec#*:}" "$out/pylib/${spec#*:}"
done
export PYTHONPATH=$here:$out/pylib${PYTHONPATH:+:$PYTHONPATH}
export GLOG_logtostderr=1 PYTHONDONTWRITEBYTECODE=1
missing=$(LD_LIBRARY_PATH="$bundle/caffe/lib:$METAQNN_CUDA_LIBS" ldd "$bundle/caffe/libexec/caffe" | grep 'not found' | grep -v 'libcuda\.so' || true)
[ -z "$missing" ] || die "the bundled caffe cannot load $(echo "$missing" | awk '{print $1}' | tr '\n' ' ')(CUDA libraries looked for in: ${METAQNN_CUDA_LIBS:-nowhere}; pip install nvidia-cublas nvidia-curand nvidia-cuda-runtime for CUDA 13, or set METAQNN_CUDA_LIBS)"
say "caffe: $("$CAFFE_BIN" --version 2>&1 | tail -1), CUDA libraries from ${METAQNN_CUDA_LIBS}"
dc=("$python" "$here/bench/device_check.py" --out "$out" --data "$bundle/data/digits" --published "$bundle/published")
"${dc[@]}" preflight 2>"$out/preflight.err" \
  || die "the project does not import with $python and the bundle's pylib (built for CPython 3.12; set PYTHON): $(tail -1 "$out/preflight.err")"
"$python" -m metaqnn caffe-info --gpu 2>&1 | sed 's/^/device-check: /'
step parity-cpu 120 "${dc[@]}" parity --mode cpu

# --- the first GPU call -----------------------------------------------------------------------------
gpu_count=$("$python" - <<'EOF' 2>/dev/null || echo 0
import ctypes
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError:
    print(0)
else:
    n = ctypes.c_int(0)
    print(n.value if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0)
EOF
)
if [ "${gpu_count:-0}" -lt 1 ]; then
  why="no NVIDIA driver (libcuda.so.1 not found)"
  "$python" -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null && why="the NVIDIA driver sees no GPU"
  say "no GPU: $why; step 0 passed ($((SECONDS - start)) s), steps 1-5 need a GPU machine"
  [ "${DEVICE_CHECK_REQUIRE_GPU:-0}" = 1 ] && exit 3
  exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total --format=csv,noheader | sed 's/^/device-check: gpu /'

say "1. device_query"
step device-query 60 sh -c '"$0" device_query -gpu 0 2>&1 | sed "s/^[IWE][0-9]* [0-9:.]* *[0-9]* [a-z_.]*:[0-9]*\] //"' "$CAFFE_BIN"

say "2. GPU against CPU parity"
step parity-gpu 120 "${dc[@]}" parity --mode gpu
step parity 10 "${dc[@]}" parity --compare

say "3. a short digits search with GPU=0"
sched='schedule.steps=[[1.0, 4], [0.5, 2], [0.1, 2]]'
step search 180 "$python" -m metaqnn search --dataset digits --exp "$out/search-gpu0" --data-dir "$bundle/data/digits" \
  --gpu 0 --set "$sched" --timeout 60

say "4. published SVHN nets: time per epoch with 1, 2, 4 and 8 trainings per GPU"
step synth 60 "${dc[@]}" synth
step speed 200 "${dc[@]}" speed --k 1 2 4 8 --seconds "${SPEED_SECONDS:-12}"

say "5. the same nets in PyTorch (fp32, cuDNN)"
step torch 90 "${dc[@]}" torch --seconds 4

say "3b. (if time is left) the same search with GPUS=0 TRAININGS_PER_GPU=4"
step search-packed 90 "$python" -m metaqnn search --dataset digits --exp "$out/search-packed" --data-dir "$bundle/data/digits" \
  --gpus 0 --trainings-per-gpu 4 --set "$sched" --timeout 60

say "finished in $((SECONDS - start)) s with $failures failed step(s); logs in $out"
[ "$failures" -eq 0 ]
