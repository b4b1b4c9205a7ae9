#!/usr/bin/env bash
# `make demo`: start the fake upstream and manaproxy, stream one answer with curl, then stop both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PORT=${DEMO_PORT:-3026}
log=$(mktemp "${TMPDIR:-/tmp}/demo-manaproxy.XXXXXX")  # outside the checkout: nothing to commit by mistake

"$BIN/python" bench/upstream.py --port 3100 --gap-ms 60 &
upstream=$!
"$BIN/manaproxy" serve --config docs/demo.yaml --port "$PORT" 2>"$log" &
proxy=$!
trap 'kill $upstream $proxy 2>/dev/null; wait 2>/dev/null; rm -f "$log"' EXIT

for _ in $(seq 50); do
    curl -fs "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    sleep 0.1
done

echo "== POST /v1/chat/completions (model mana/demo, stream) — note X-Mana-LLM-Resolved and each chunk's model"
curl -sN -i "http://127.0.0.1:$PORT/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -d '{"model": "mana/demo", "stream": true, "messages": [{"role": "user", "content": "Say hello"}]}'
echo
echo "== GET /v1/aliases — the first entry was tried, failed (connect) and is now skipped"
curl -s "http://127.0.0.1:$PORT/v1/aliases"
echo
echo "== manaproxy's log"
cat "$log"
