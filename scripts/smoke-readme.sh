#!/usr/bin/env bash
# The README's run command, as a new user types it on a fresh host:
#   sudo ./install.sh && sudo kya run
# Installs, starts `kya run` on its embedded defaults, checks it is up and
# answering, stops it with SIGTERM and checks it left nothing pinned.
# Run by .ci/run (it installs into /usr/local and /etc/kya, so it is not part
# of the developer test command).
set -euo pipefail
cd "$(dirname "$0")/.."
./install.sh
log=$(mktemp)
kya run >"$log" 2>&1 &
pid=$!
up=""
for _ in $(seq 1 150); do
  if grep -q "kya is running" "$log"; then up=1; break; fi
  if ! kill -0 "$pid" 2>/dev/null; then break; fi
  sleep 0.2
done
if [ -z "$up" ]; then
  echo "smoke-readme: kya run did not come up:" >&2
  cat "$log" >&2
  kill -KILL "$pid" 2>/dev/null || true
  exit 1
fi
status=$(kya status --json)
echo "$status" | grep -q '"listen_port": 1021' || { echo "smoke-readme: unexpected status: $status" >&2; exit 1; }
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "smoke-readme: kya run exited $rc after SIGTERM:" >&2
  cat "$log" >&2
  exit 1
fi
if [ -e /sys/fs/bpf/kya ]; then
  echo "smoke-readme: a clean exit left /sys/fs/bpf/kya behind" >&2
  exit 1
fi
echo "smoke-readme: ok (installed, ran on the embedded defaults, stopped cleanly)"
