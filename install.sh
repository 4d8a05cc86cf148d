#!/usr/bin/env bash
# Install kya on this Debian/Ubuntu host: build dependencies, the `kya` binary
# (/usr/local/bin/kya), the example configuration and policies (/etc/kya, kept
# if present), and a systemd unit enabled to start kya early at boot.
# Run as root:   sudo ./install.sh && sudo kya run
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo ./install.sh)" >&2
  exit 1
fi
./scripts/install-deps.sh
cargo build --release --locked -p kya-agent
install -m 0755 target/release/kya /usr/local/bin/kya
# kya.service runs the daemon as this system user, with only the capabilities it needs.
id -u kya >/dev/null 2>&1 \
  || useradd --system --no-create-home --home-dir /var/lib/kya --shell /usr/sbin/nologin kya
install -d -m 0755 /etc/kya
[ -e /etc/kya/kya.toml ] || install -m 0644 packaging/kya.toml /etc/kya/kya.toml
# Example policies, for reference; the daemon uses the embedded example policy
# until policy.paths in /etc/kya/kya.toml names your own.
install -d -m 0755 /usr/local/share/doc/kya/policies
cp -r policies/. /usr/local/share/doc/kya/policies/
install -m 0644 README.md /usr/local/share/doc/kya/README.md
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  install -m 0644 packaging/kya.service /etc/systemd/system/kya.service
  systemctl daemon-reload
  systemctl enable kya.service >/dev/null
  echo "install.sh: kya.service enabled (starts at boot; 'systemctl start kya' to start it now)"
fi
echo "install.sh: installed /usr/local/bin/kya; run it in the foreground with: sudo kya run"
