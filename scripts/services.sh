# Private RabbitMQ and Redis instances for tests and benchmarks. Source this file, then call
# `kiln_services_up`; it installs the Debian packages when missing, starts each server as a
# foreground child on a free port with a temporary data dir, waits until it answers, exports
# KILN_TEST_AMQP_URL / KILN_TEST_REDIS_URL, and registers `kiln_services_down` on EXIT.
# Control helpers for fault tests: `kiln_rabbitmq_stop`, `kiln_rabbitmq_start`.

kiln_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

kiln_install_services() {
  local missing=()
  command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  # Test fixtures of the multimodal tasks: speech synthesised with espeak-ng (run as a program),
  # text rendered with a DejaVu font.
  command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
  [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "services: installing ${missing[*]} with apt-get" >&2
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

kiln_wait_for() { # description, deadline seconds, command...
  local what=$1 secs=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then
      echo "services: $what did not become ready within ${secs}s" >&2
      return 1
    fi
    sleep 0.2
  done
}

kiln_rabbitmq_env() {
  # The Debian wrappers in /usr/sbin switch to the rabbitmq user; run the real scripts directly.
  local sbin
  sbin=$(dirname "$(readlink -f /usr/lib/rabbitmq/bin/rabbitmq-server)")
  env PATH="$sbin:$PATH" HOME="$KILN_SVC_DIR/rabbit-home" ERL_EPMD_PORT="$KILN_EPMD_PORT" \
    RABBITMQ_NODENAME="kiln-test-$$@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$KILN_AMQP_PORT" RABBITMQ_DIST_PORT="$KILN_DIST_PORT" \
    RABBITMQ_MNESIA_BASE="$KILN_SVC_DIR/rabbit-mnesia" RABBITMQ_LOG_BASE="$KILN_SVC_DIR/rabbit-log" \
    RABBITMQ_PID_FILE="$KILN_SVC_DIR/rabbit.pid" RABBITMQ_ENABLED_PLUGINS_FILE="$KILN_SVC_DIR/rabbit-plugins" \
    RABBITMQ_CONFIG_FILE="$KILN_SVC_DIR/rabbitmq" RABBITMQ_ADVANCED_CONFIG_FILE="$KILN_SVC_DIR/advanced.config" \
    "$@"
}

kiln_rabbitmq_start() {
  kiln_rabbitmq_env rabbitmq-server >"$KILN_SVC_DIR/rabbit-log/stdout.log" 2>&1 &
  KILN_RABBIT_PID=$!
  kiln_rabbitmq_env rabbitmqctl -n "kiln-test-$$@localhost" wait "$KILN_SVC_DIR/rabbit.pid" --timeout 120 >/dev/null 2>&1 || {
    echo "services: RabbitMQ failed to start; log tail:" >&2
    tail -20 "$KILN_SVC_DIR/rabbit-log/stdout.log" >&2
    return 1
  }
}

kiln_rabbitmq_stop() {
  [ -n "${KILN_RABBIT_PID:-}" ] || return 0
  kiln_rabbitmq_env rabbitmqctl -n "kiln-test-$$@localhost" stop >/dev/null 2>&1 || kill "$KILN_RABBIT_PID" 2>/dev/null
  wait "$KILN_RABBIT_PID" 2>/dev/null
  KILN_RABBIT_PID=
}

kiln_services_down() {
  kiln_rabbitmq_stop
  [ -n "${KILN_REDIS_PID:-}" ] && kill "$KILN_REDIS_PID" 2>/dev/null && wait "$KILN_REDIS_PID" 2>/dev/null
  [ -n "${KILN_EPMD_PORT:-}" ] && epmd -port "$KILN_EPMD_PORT" -kill >/dev/null 2>&1
  [ -n "${KILN_SVC_DIR:-}" ] && rm -rf "$KILN_SVC_DIR"
  KILN_REDIS_PID=
}

kiln_services_up() {
  kiln_install_services
  KILN_SVC_DIR=$(mktemp -d /tmp/kiln-services.XXXXXX)
  trap kiln_services_down EXIT
  mkdir -p "$KILN_SVC_DIR"/{rabbit-home,rabbit-mnesia,rabbit-log,redis}
  echo '[].' >"$KILN_SVC_DIR/rabbit-plugins"
  # Consumer timeouts are checked every second instead of every minute, so tests can see them.
  echo '[{rabbit, [{channel_tick_interval, 1000}]}].' >"$KILN_SVC_DIR/advanced.config"
  printf 'loopback_users = none\nlog.console = true\nlog.file = false\n' >"$KILN_SVC_DIR/rabbitmq.conf"
  KILN_AMQP_PORT=$(kiln_free_port); KILN_DIST_PORT=$(kiln_free_port)
  KILN_EPMD_PORT=$(kiln_free_port); KILN_REDIS_PORT=$(kiln_free_port)

  redis-server --port "$KILN_REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$KILN_SVC_DIR/redis" >"$KILN_SVC_DIR/redis.log" 2>&1 &
  KILN_REDIS_PID=$!
  kiln_rabbitmq_start || return 1
  kiln_wait_for "Redis" 30 redis-cli -p "$KILN_REDIS_PORT" ping || return 1

  export KILN_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:$KILN_AMQP_PORT/%2f"
  export KILN_TEST_REDIS_URL="redis://127.0.0.1:$KILN_REDIS_PORT/"
  echo "services: RabbitMQ on $KILN_AMQP_PORT, Redis on $KILN_REDIS_PORT" >&2
}
