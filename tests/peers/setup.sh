#!/bin/sh
# Install the real MCP peers the tests use, idempotently: a Python venv at
# tests/peers/.venv (PyPI mcp, hypercorn, httpx[http2]) and node_modules (npm
# @modelcontextprotocol/sdk and server-everything, and oidc-provider for CIBA), and the MCP
# conformance suite (conformance/setup.sh). Re-running is cheap: each part is skipped when its
# stamp is newer than its manifest.
set -eu
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ ! -f .venv/.stamp ] || [ requirements.txt -nt .venv/.stamp ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements.txt
    touch .venv/.stamp
fi
if [ ! -f node_modules/.stamp ] || [ package.json -nt node_modules/.stamp ]; then
    npm install --no-audit --no-fund --silent
    touch node_modules/.stamp
fi
.venv/bin/python -c 'import importlib.metadata as m; print("mcp", m.version("mcp"))'
node -e 'console.log("sdk", require("./node_modules/@modelcontextprotocol/sdk/package.json").version)'
node -e 'console.log("oidc-provider", require("./node_modules/oidc-provider/package.json").version)'
# The MCP conformance suite (its runner needs Node 22, installed privately there).
sh conformance/setup.sh
