#!/usr/bin/env bash
# `make run`: NATS (JetStream) and Redis on loopback with data under
# .herald/, then the five services built in release mode. Writes an
# operator API key to .herald/api-key, prints how to try it, and stops
# everything on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_PORT=${HERALD_NATS_PORT:-4222}
REDIS_PORT=${HERALD_REDIS_PORT:-6379}
ADMIN_PORT=${HERALD_ADMIN_PORT:-8080}
DATA=.herald
BIN=target/release
mkdir -p "$DATA/nats" "$DATA/redis" "$DATA/logs"

for port in "$NATS_PORT" "$REDIS_PORT" "$ADMIN_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; set HERALD_NATS_PORT, HERALD_REDIS_PORT or HERALD_ADMIN_PORT" >&2
    exit 1
  fi
done

# Keys: one operator key for every organization, default organization
# `default`; one secret-encryption key. Both kept across runs.
if [ ! -s "$DATA/api-key" ]; then
  echo "hk_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$DATA/api-key"
fi
API_KEY=$(cat "$DATA/api-key")
KEY_HASH=$(printf '%s' "$API_KEY" | sha256sum | cut -d' ' -f1)
printf '{"keys":[{"name":"dev operator","key_sha256":"%s","organizations":["*"],"default_organization":"default"}]}\n' "$KEY_HASH" > "$DATA/api-keys.json"
if [ ! -s "$DATA/secret-key" ]; then
  echo "k1:$(head -c 32 /dev/urandom | base64)" > "$DATA/secret-key"
fi

# The stack's own servers and keys; every other HERALD_* the caller set
# (HERALD_ALLOW_PRIVATE_TARGETS=false to try the SSRF guard, a retry
# schedule, ...) is honoured, and only defaulted here.
export HERALD_NATS_URL="nats://127.0.0.1:$NATS_PORT"
export HERALD_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export HERALD_ADMIN_ADDR="127.0.0.1:$ADMIN_PORT"
export HERALD_API_KEYS_FILE="${HERALD_API_KEYS_FILE:-$DATA/api-keys.json}"
export HERALD_SECRET_KEY="${HERALD_SECRET_KEY:-$(cat "$DATA/secret-key")}"
# A local receiver is plain http on loopback: allowed unless the caller says not.
export HERALD_ALLOW_HTTP="${HERALD_ALLOW_HTTP:-true}"
export HERALD_ALLOW_PRIVATE_TARGETS="${HERALD_ALLOW_PRIVATE_TARGETS:-true}"
export RUST_LOG=${RUST_LOG:-info}

pids=()       # nats-server, redis-server
services=()   # the five services
stopping=""
cleanup() {
  trap - INT TERM EXIT
  stopping=1
  echo
  echo "stopping..."
  # The services first, while NATS and Redis are still there to drain to.
  for pid in "${services[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${services[@]}"; do wait "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped"
}
trap cleanup INT TERM EXIT

nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$DATA/nats" >"$DATA/logs/nats.log" 2>&1 &
pids+=($!)
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$DATA/redis" --appendonly yes --save "" >"$DATA/logs/redis.log" 2>&1 &
pids+=($!)
for port in "$NATS_PORT" "$REDIS_PORT"; do
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done

for svc in ingest matcher deliverer log-writer admin; do
  "$BIN/herald-$svc" >"$DATA/logs/$svc.log" 2>&1 &
  services+=($!)
done

for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null 2>&1 && break
  sleep 0.2
done

cat <<MSG

Herald is running (logs in $DATA/logs/). Admin API: http://127.0.0.1:$ADMIN_PORT
Console: http://127.0.0.1:$ADMIN_PORT/console (sign in with the operator key)
Operator API key: $DATA/api-key

Create a webhook (point it at any URL; https://webhook.site or a local receiver):

  curl -s -X POST http://127.0.0.1:$ADMIN_PORT/webhooks \\
    -H "Authorization: Bearer \$(cat $DATA/api-key)" -H 'Content-Type: application/json' \\
    -d '{"name":"demo","url":"http://127.0.0.1:9999/hook","event_types":["workflow.completed"],"filters":{"workflow":["invoice-approval"]}}'

Publish an event (JetStream publish, acknowledged):

  $BIN/herald-publish --url $HERALD_NATS_URL herald.events.default.workflow.completed \\
    '{"attributes":{"workflow":"invoice-approval","execution":"ex-42"},"data":{"amount":42}}'

See the attempt:  curl -s http://127.0.0.1:$ADMIN_PORT/webhooks/<id>/logs -H "Authorization: Bearer \$(cat $DATA/api-key)"

Ctrl-C stops everything.
MSG

wait -n "${pids[@]}" "${services[@]}" || true
[ -n "$stopping" ] || echo "a process exited; see $DATA/logs/" >&2
