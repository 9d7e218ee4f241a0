#!/usr/bin/env bash
# Waits until the core listens, then submits the sample job and prints its output (used by `make run`).
set -euo pipefail
cd "$(dirname "$0")/.."
home=${SKYPORT_HOME:-$HOME/.skyport}
for _ in $(seq 1 300); do
  [ -f "$home/run/server.json" ] && break
  sleep 0.1
done
if [ ! -f "$home/run/server.json" ]; then
  echo "demo: the core did not start; see its output above" >&2
  exit 1
fi
url=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['url'])" "$home/run/server.json")
echo
echo "── Submitting examples/hello.sh to $url ──"
SKYPORT_URL=$url .venv/bin/skyport submit --wait examples/hello.sh --input examples/greeting.txt
echo "── The core keeps serving; try: .venv/bin/skyport jobs   (Ctrl-C stops the core) ──"
