#!/usr/bin/env bash
# The MLOps loop on the default data, end to end, for a newcomer to watch (`make loop`):
# build if needed, serve the champion, replay traffic whose inputs drift from the fourth
# batch, monitor, retrain if a trigger fires (the gate decides), and reload the server.
set -euo pipefail
cd "$(dirname "$0")/.."
nbs=.venv/bin/nbs
mkdir -p .nbs/logs
[ -f products/data/train.parquet ] || "$nbs" run
out=.nbs/logs/loop-serve.out
setsid "$nbs" serve --port 0 >"$out" 2>&1 &
server=$!
trap 'kill -TERM -- -"$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  url=$(grep -o 'http://127.0.0.1:[0-9]*' "$out" || true)
  [ -n "$url" ] && curl -sf "$url/ready" >/dev/null && break
  sleep 0.2
done
[ -n "$url" ] && curl -sf "$url/ready" >/dev/null || { cat "$out"; echo "loop: nbs serve did not get ready" >&2; exit 1; }
echo "== serving at $url"
"$nbs" simulate --url "$url" --drift shift --drift-from 3 --batches 6
echo "== monitoring the last hour"
"$nbs" monitor --since 1h --window 10min
echo "== retraining if a trigger fires"
"$nbs" retrain --if-needed
echo "== the server loads what is champion now"
curl -s -XPOST "$url/reload"; echo
"$nbs" models
echo "== alerts so far"
cat alerts.jsonl 2>/dev/null || echo "(none)"
