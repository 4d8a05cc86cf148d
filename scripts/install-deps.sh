#!/usr/bin/env bash
# Install the system packages kya needs to build and test on Debian/Ubuntu:
# clang (the BPF programs are C), bpftool (inspection and tests), iproute2,
# util-linux (setpriv, unshare), systemd (systemd-analyze rates the unit) and libseccomp-dev
# (the tests apply the unit's system call filters), openssl and ca-certificates, Python and Node
# for the real MCP test peers (tests/peers/setup.sh installs the peers themselves).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
command -v clang-19 >/dev/null 2>&1 || command -v clang >/dev/null 2>&1 || need+=(clang-19)
command -v bpftool >/dev/null 2>&1 || need+=(bpftool)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# libseccomp: the test tool that applies the unit's system call filters links it.
[ -e /usr/include/seccomp.h ] || need+=(libseccomp-dev)
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

# The kernel matrix (`cargo xtask kernel-matrix`): Debian 12's 6.1 kernel and
# Debian's 6.12 kernel (bookworm-backports), booted in QEMU by virtme-ng with
# the host's filesystem. The kernel packages are extracted, not installed, under
# $KYA_KERNELS (the host's own boot setup is not touched); virtme-ng lives in
# a venv at $KYA_VNG_VENV. Both paths are the ones xtask looks in.
KYA_KERNELS="${KYA_KERNELS:-/var/cache/kya-kernels}"
KYA_VNG_VENV="${KYA_VNG_VENV:-/opt/kya-vng}"
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ]; then
  echo "install-deps: not Debian 12 (bookworm): the kernel matrix's Debian kernels are not installed"
  exit 0
fi
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # The same Debian mirror the machine already uses for bookworm.
  mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
    | grep -E '/debian/?$' | head -n1)
  if [ -z "$mirror" ]; then
    mirror=$(grep -hsE '^deb .* bookworm ' /etc/apt/sources.list | awk '{print $2}' | head -n1)
  fi
  if [ -z "$mirror" ]; then
    echo "install-deps: no Debian mirror found in /etc/apt to add bookworm-backports from" >&2
    exit 1
  fi
  echo "install-deps: adding bookworm-backports from $mirror"
  cat > /etc/apt/sources.list.d/kya-bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq
fi
# QEMU from backports: it must match a backports qemu-utils if one is installed.
# `-t` (not `pkg/suite`) so that its dependencies come from backports too.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "install-deps: installing qemu-system-x86 from bookworm-backports"
  apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
fi
need=()
command -v depmod >/dev/null 2>&1 || need+=(kmod)
command -v busybox >/dev/null 2>&1 || need+=(busybox-static)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ ! -x "$KYA_VNG_VENV/bin/vng" ]; then
  echo "install-deps: installing virtme-ng into $KYA_VNG_VENV"
  python3 -m venv "$KYA_VNG_VENV"
  "$KYA_VNG_VENV/bin/pip" install --quiet virtme-ng
fi
# linux-image-amd64 names the current ABI package of each suite.
kernel_pkg() {
  apt-cache depends "$@" linux-image-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
mkdir -p "$KYA_KERNELS"
for pkg in "$(kernel_pkg)" "$(kernel_pkg -t bookworm-backports)"; do
  if [ -z "$pkg" ]; then
    echo "install-deps: linux-image-amd64 not found (apt-get update?)" >&2
    exit 1
  fi
  ver="${pkg#linux-image-}"
  if [ ! -e "$KYA_KERNELS/$ver/boot/vmlinuz-$ver" ]; then
    echo "install-deps: extracting $pkg into $KYA_KERNELS/$ver"
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true   # apt downloads as _apt
    (cd "$tmp" && apt-get download -qq "$pkg")
    rm -rf "$KYA_KERNELS/$ver.part"
    mkdir -p "$KYA_KERNELS/$ver.part"
    dpkg-deb -x "$tmp"/*.deb "$KYA_KERNELS/$ver.part"
    rm -rf "$tmp"
    mv "$KYA_KERNELS/$ver.part" "$KYA_KERNELS/$ver"
  fi
done
