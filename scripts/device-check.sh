#!/usr/bin/env bash
# The GPU check of issue 14, prepared to run once on a GPU machine that has no network and no
# project venv: only its own Python (any of 3.10-3.13 with numpy and h5py; there 3.12 with torch
# cu130 and the CUDA 13 pip libraries), an NVIDIA driver (R580+ for the CUDA 13 build), and this
# working tree with the bundle of `make device-bundle` (build/device-check, <= 60 MiB) carried
# along.  Under 8 minutes it prints:
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
#      (PyTorch's figures alone when step 4 measured nothing)
#
# On a machine without a GPU it runs step 0 and stops with one "no GPU" line: exit 0 when step 0
# passed, 1 when it failed (DEVICE_CHECK_REQUIRE_GPU=1 makes "no GPU" itself exit 3).
# What comes back from a lent machine is a few files at most two folders down, so everything is in
# $OUT/device-check, one level deep, rewritten after every step (a run cut off keeps what it did):
#   summary.txt   each step's status and key figures (a few dozen lines)
#   logs.tar.gz   the step logs, the training logs and the JSONs
#   parity-cpu.json parity-gpu.json speed.json torch.json   the figures (speed.json after each K)
# The model folders and LMDBs go to a scratch folder (DEVICE_CHECK_WORK, default under /tmp).
# Usage: scripts/device-check.sh   (environment: OUT, PYTHON, DEVICE_BUNDLE, DEVICE_CHECK_BUDGET_S,
#   DEVICE_CHECK_WORK, DEVICE_CHECK_REQUIRE_GPU, SPEED_SECONDS)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bundle=${DEVICE_BUNDLE:-$here/build/device-check}
budget=${DEVICE_CHECK_BUDGET_S:-450}
out_root=${OUT:-$(mktemp -d /tmp/device-check.XXXXXX)}
out=$out_root/device-check
start=$SECONDS
failures=0
steps=0

say() { echo "device-check: $*"; }
note() { [ ! -d "$out" ] || echo "$*" >>"$out/summary.txt"; }  # a line of summary.txt
pack() {  # the logs (and the JSONs) as one small tar.gz in $out; at most ~12 MiB
  [ -d "${work:-}/logs" ] || return 0
  cp "$out"/*.json "$work/logs/" 2>/dev/null || true
  (cd "$work" && find logs parity-* speed search-* -maxdepth 3 -type f \( -name '*.log' -o -name '*.json' \
      -o -name '*.err' -o -name '*.prototxt' \) 2>/dev/null | sort | tar -czf "$out/logs.tar.gz.tmp" -T - 2>/dev/null) || true
  if [ -f "$out/logs.tar.gz.tmp" ] && [ "$(du -k "$out/logs.tar.gz.tmp" | cut -f1)" -gt 12288 ]; then
    tar -czf "$out/logs.tar.gz.tmp" -C "$work" logs 2>/dev/null || true
  fi
  mv -f "$out/logs.tar.gz.tmp" "$out/logs.tar.gz" 2>/dev/null || true
}
die() {
  echo "device-check: error: $*" >&2
  note "ERROR: $*"
  pack
  exit 1
}
left() { echo $((budget - (SECONDS - start))); }
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $work/logs/NAME.log, show its output
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  steps=$((steps + 1))
  if [ "$(left)" -lt 20 ]; then
    say "$name: skipped (time budget of $budget s spent)"
    note "step $name: SKIPPED (time budget of $budget s spent)"
    return 0
  fi
  [ "$limit" -le "$(left)" ] || limit=$(left)
  { timeout --kill-after=10 "$limit" "$@" 2>"$work/logs/$name.err" | tee "$work/logs/$name.log"; } || rc=$?
  if [ "$rc" -ne 0 ]; then
    local why
    why=$(grep -v '^\s*$' "$work/logs/$name.err" | tail -1 | cut -c1-300 || true)
    [ -n "$why" ] || why=$(grep -v '^\s*$' "$work/logs/$name.log" | tail -1 | cut -c1-300 || true)
    say "$name: FAILED (exit $rc after at most $limit s): $why"
    note "step $name: FAILED (exit $rc, $((SECONDS - t0)) s, limit $limit s): $why"
    failures=$((failures + 1))
  else
    note "step $name: ok ($((SECONDS - t0)) s)"
  fi
  grep -v '^\s*$' "$work/logs/$name.log" | tail -n 8 | cut -c1-240 | sed 's/^/  /' >>"$out/summary.txt" || true
  pack
  return 0
}

# Anything that fails outside a step is one line too (and in summary.txt), never a silent exit.
trap 'rc=$?; echo "device-check: error: line $LINENO of $0 failed (exit $rc)" >&2; note "ERROR: line $LINENO failed (exit $rc)"; pack' ERR

# --- step 0: everything that needs no GPU -------------------------------------------------------
[ -x "$bundle/caffe/bin/caffe" ] || die "no bundle at $bundle: run \`make device-bundle\` on the build machine and carry build/device-check"
mkdir -p "$out"
rm -f "$out/summary.txt" "$out"/*.json "$out/logs.tar.gz"
work=${DEVICE_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/device-check-work.XXXXXX")}
mkdir -p "$work/logs" "$work/pylib"
note "device-check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n)): scripts/device-check.sh, budget $budget s"

# The Python: PYTHON, else the first of these with numpy, h5py and lmdb (its own, or the bundle's
# wheel for its version), 3.10-3.13; else the first 3.10-3.13 one (its preflight says what it lacks).
pick='import importlib.util as u, os, sys
v = sys.version_info[:2]
ok = (3, 10) <= v <= (3, 13)
if len(sys.argv) > 2:
    ok = ok and all(u.find_spec(m) for m in ("numpy", "h5py"))
    ok = ok and bool(u.find_spec("lmdb") or os.path.isdir(os.path.join(sys.argv[1], "pylib-cp%d%d" % v, "lmdb")))
sys.exit(0 if ok else 1)'
python=${PYTHON:-}
if [ -z "$python" ]; then
  cands=(python3 python3.12 python3.13 python3.11 python3.10 "$here/.venv/bin/python")
  for strict in 1 ""; do
    for cand in "${cands[@]}"; do
      if "$cand" -c "$pick" "$bundle" $strict >/dev/null 2>&1; then python=$cand; break 2; fi
    done
  done
  [ -n "$python" ] || die "no Python 3.10-3.13 found (tried ${cands[*]}): set PYTHON"
fi
command -v "$python" >/dev/null || die "$python not found (set PYTHON)"
pyver=$("$python" -c 'import sys; print(sys.version.split()[0])')
pytag=$("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
say "bundle $bundle ($(du -sh "$bundle" | cut -f1)), python $pyver ($python), output $out"
note "bundle: $bundle ($(du -sh "$bundle" | cut -f1)); python $pyver ($python); scratch $work"

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
# The bundle's Python packages, only where this Python lacks them: pylib/ for all versions,
# pylib-cpXY/ (lmdb) for this one (a bundle made before those existed: pylib/lmdb, for 3.12).
for spec in jinja2:jinja2 markupsafe:markupsafe google.protobuf:google tomli:tomli lmdb:lmdb; do
  mod=${spec%%:*} dir=${spec#*:}
  "$python" -c "import $mod" 2>/dev/null && continue
  for src in "$bundle/pylib-$pytag/$dir" "$bundle/pylib/$dir"; do
    if [ -e "$src" ]; then ln -sfn "$src" "$work/pylib/$dir"; break; fi
  done
done
export PYTHONPATH=$here:$work/pylib${PYTHONPATH:+:$PYTHONPATH}
export GLOG_logtostderr=1 PYTHONDONTWRITEBYTECODE=1
missing=$(LD_LIBRARY_PATH="$bundle/caffe/lib:$METAQNN_CUDA_LIBS" ldd "$bundle/caffe/libexec/caffe" | grep 'not found' | grep -v 'libcuda\.so' || true)
[ -z "$missing" ] || die "the bundled caffe cannot load $(echo "$missing" | awk '{print $1}' | tr '\n' ' ')(CUDA libraries looked for in: ${METAQNN_CUDA_LIBS:-nowhere}; pip install nvidia-cublas nvidia-curand nvidia-cuda-runtime for CUDA 13, or set METAQNN_CUDA_LIBS)"
caffe_version=$("$CAFFE_BIN" --version 2>&1) || die "the bundled caffe does not run: $(echo "$caffe_version" | tail -1 | cut -c1-300)"
caffe_version=$(echo "$caffe_version" | tail -1)
say "caffe: $caffe_version, CUDA libraries from ${METAQNN_CUDA_LIBS:-nowhere}"
note "caffe: $caffe_version ($(grep -E '^(build|cuda|archs|ptx)=' "$bundle/caffe/build-info" 2>/dev/null | tr '\n' ' ')); CUDA libraries from ${METAQNN_CUDA_LIBS:-nowhere}"
dc=("$python" "$here/bench/device_check.py" --out "$out" --work "$work" --data "$bundle/data/digits" --published "$bundle/published")
if "${dc[@]}" preflight >"$work/logs/preflight.log" 2>"$work/logs/preflight.err"; then
  say "preflight: $(tail -1 "$work/logs/preflight.log")"
  note "step preflight: ok: $(tail -1 "$work/logs/preflight.log")"
else
  die "the project does not run with $python ($pyver) and the bundle (set PYTHON): $(grep -v '^\s*$' "$work/logs/preflight.err" | tail -1)"
fi
"$python" -m metaqnn caffe-info --gpu >"$work/logs/caffe-info.log" 2>&1 || true
sed 's/^/device-check: /' "$work/logs/caffe-info.log"
sed 's/^/  caffe-info: /' "$work/logs/caffe-info.log" | cut -c1-240 >>"$out/summary.txt"
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
  if [ "$failures" -gt 0 ]; then
    say "no GPU: $why; step 0 FAILED ($failures failed step(s), $((SECONDS - start)) s): see above; logs in $out"
    note "result: step 0 FAILED, no GPU ($why), $((SECONDS - start)) s"
    pack
    exit 1
  fi
  say "no GPU: $why; step 0 passed ($((SECONDS - start)) s), steps 1-5 need a GPU machine"
  note "result: step 0 passed, no GPU ($why), $((SECONDS - start)) s"
  pack
  [ "${DEVICE_CHECK_REQUIRE_GPU:-0}" = 1 ] && exit 3
  exit 0
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 \
    | sed 's/^/device-check: gpu /' | tee -a "$out/summary.txt" || true
fi

say "1. device_query"
step device-query 60 sh -c '"$0" device_query -gpu 0 2>&1 | sed "s/^[IWE][0-9]* [0-9:.]* *[0-9]* [a-z_.]*:[0-9]*\] //"' "$CAFFE_BIN"

say "2. GPU against CPU parity"
step parity-gpu 120 "${dc[@]}" parity --mode gpu
step parity 10 "${dc[@]}" parity --compare

say "3. a short digits search with GPU=0"
sched='schedule.steps=[[1.0, 4], [0.5, 2], [0.1, 2]]'
step search 180 "$python" -m metaqnn search --dataset digits --exp "$work/search-gpu0" --data-dir "$bundle/data/digits" \
  --gpu 0 --set "$sched" --timeout 60

say "4. published SVHN nets: time per epoch with 1, 2, 4 and 8 trainings per GPU"
step synth 60 "${dc[@]}" synth
step speed 200 "${dc[@]}" speed --k 1 2 4 8 --seconds "${SPEED_SECONDS:-12}"

say "5. the same nets in PyTorch (fp32, cuDNN)"
step torch 90 "${dc[@]}" torch --seconds 4

say "3b. (if time is left) the same search with GPUS=0 TRAININGS_PER_GPU=4"
step search-packed 90 "$python" -m metaqnn search --dataset digits --exp "$work/search-packed" --data-dir "$bundle/data/digits" \
  --gpus 0 --trainings-per-gpu 4 --set "$sched" --timeout 60

say "finished in $((SECONDS - start)) s with $failures failed step(s) of $steps; summary and logs in $out"
note "result: $failures failed step(s) of $steps, $((SECONDS - start)) s"
pack
[ "$failures" -eq 0 ]
