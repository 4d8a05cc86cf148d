#!/usr/bin/env bash
# Install the system packages kya needs to build and test on Debian/Ubuntu:
# clang (the BPF programs are C), bpftool (inspection and tests), iproute2,
# util-linux (setpriv, unshare), openssl and ca-certificates, Python and Node
# for the real MCP test peers (tests/peers/setup.sh installs the peers themselves).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
command -v clang-19 >/dev/null 2>&1 || command -v clang >/dev/null 2>&1 || need+=(clang-19)
command -v bpftool >/dev/null 2>&1 || need+=(bpftool)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v update-ca-certificates >/dev/null 2>&1 || need+=(ca-certificates)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if [ "${#need[@]}" -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
