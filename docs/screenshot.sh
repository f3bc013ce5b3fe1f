#!/usr/bin/env bash
# Reproduce docs/dashboard.png and docs/tab.png: train the demo briefly, serve its logs with
# TensorBoard on 127.0.0.1, and photograph the GradGuard Custom Scalars page and the GradGuard tab
# (run `exploding`) with headless Chromium.
# Not part of `make test`. Installs Debian's `chromium` package if it is missing (needs root/sudo).
#
#   bash docs/screenshot.sh [LOGDIR]       # default: a fresh 200-step demo run under /tmp
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOGDIR=${1:-}
if [ -z "$LOGDIR" ]; then
  LOGDIR=$(mktemp -d /tmp/gradguard-shot.XXXXXX)
  "$PY" examples/vanishing_gradients.py --steps 200 --logdir "$LOGDIR" >/dev/null
fi
if ! command -v chromium >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium
fi
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$PY" -m tensorboard.main --logdir "$LOGDIR" --host 127.0.0.1 --port "$PORT" --load_fast false \
  >/dev/null 2>&1 &
TB=$!
trap 'kill $TB 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/data/plugin/scalars/tags" | grep -q gradguard/total_norm && break
  sleep 0.5
done
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,1100 \
  --virtual-time-budget=15000 --screenshot="$PWD/docs/dashboard.png" \
  "http://127.0.0.1:$PORT/?darkMode=false#custom_scalars" 2>/dev/null
CHROME=(chromium --headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run
        --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars)
"${CHROME[@]}" --window-size=1400,1500 --virtual-time-budget=15000 --screenshot="$PWD/docs/tab.png" \
  "http://127.0.0.1:$PORT/?darkMode=false#gradguard" 2>/dev/null
echo "wrote docs/dashboard.png and docs/tab.png (logs: $LOGDIR)"
