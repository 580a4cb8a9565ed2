#!/usr/bin/env bash
# Screenshots of the TensorBoard viewer on an experiment, taken by a real browser (headless Chromium):
#
#   scripts/tensorboard-screens.sh EXP OUT_DIR      (make tensorboard-screens EXP=digits OUT=docs/img)
#
# Writes the experiment's event files if they are missing (`metaqnn tensorboard`), starts the viewer
# of .deps/tensorboard-venv on a free local port, opens its Scalars and HParams views and writes
# OUT_DIR/tensorboard-{search,models,hparams}.png; the viewer is stopped afterwards.
# Needs Debian's chromium (`apt-get install chromium`); not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
exp=${1:?usage: $0 EXP OUT_DIR}
out=${2:?usage: $0 EXP OUT_DIR}
py=${PY:-.venv/bin/python}
tb_venv=${TB_VENV:-.deps/tensorboard-venv}
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$browser" ]; then
  echo "tensorboard-screens: no chromium found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)" >&2
  exit 2
fi
mkdir -p "$out"
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
log="$work/viewer.log"
"$py" -m metaqnn tensorboard --exp "$exp" --serve --viewer "$tb_venv/bin/tensorboard" --port "$port" >"$log" 2>&1 &
viewer=$!
cleanup() {
  kill "$viewer" 2>/dev/null || true
  wait "$viewer" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 1 120); do
  if "$py" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url/data/runs" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$viewer" 2>/dev/null; then
    echo "tensorboard-screens: the viewer stopped:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.5
done
shot() {  # name, fragment
  local profile
  profile=$(mktemp -d -p "$work")
  "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --no-default-browser-check \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$profile" --window-size="${WINDOW:-1400,900}" --virtual-time-budget="${BUDGET_MS:-20000}" \
    --screenshot="$out/tensorboard-$1.png" "$url/$2" >"$work/chromium-$1.log" 2>&1 || {
    echo "tensorboard-screens: chromium failed on $url/$2:" >&2
    tail -20 "$work/chromium-$1.log" >&2
    exit 1
  }
  echo "tensorboard-screens: $out/tensorboard-$1.png ($url/$2)"
}
# the search run (Figure 3's rolling mean, epsilon, the best so far); the curves of the first 40 models
# (the Scalars view selects no run of its own accord when there are more); the HParams table
shot search "${SEARCH_FRAGMENT:-#scalars&regexInput=search&tagFilter=search%2F&_smoothingWeight=0}"
shot models "${MODELS_FRAGMENT:-#scalars&regexInput=models%2F000%5B0-3%5D&tagFilter=val%2Faccuracy%7Ctrain%2Floss&_smoothingWeight=0}"
shot hparams "${HPARAMS_FRAGMENT:-#hparams}"
