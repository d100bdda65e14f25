#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft) on loopback, from jars that Maven resolves.
#
#   kafka.sh fetch                       resolve the pinned broker jars (deploy/kafka/pom.xml)
#   kafka.sh start  [--port P] [--controller-port C] [--data-dir D] [--timeout S]
#                   [--extra-config F] [--format-arg A]...
#   kafka.sh stop   [--data-dir D]
#   kafka.sh status [--data-dir D]
#
# `start` formats KRaft storage on first use, launches the broker in the background,
# and returns only once the broker accepts connections and has logged that it started.
# The pid, server.properties and broker log live in the data dir, so several brokers
# (one per test session, say) can run side by side with different dirs and ports.
# --extra-config appends a properties file to the generated configuration (a later key
# overrides an earlier one: e.g. more listeners); --format-arg passes an argument to the
# storage format on first start (e.g. --add-scram for SCRAM users).
# Environment: KAFKA_HEAP (max heap, 512m), KAFKA_JVM_OPTS (more JVM options, e.g.
# "-Xlog:gc,safepoint:file=/tmp/gc.log:uptimemillis" to see the broker's pauses).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIBS="$HERE/target/libs"
PORT="${KAFKA_PORT:-19092}"
CPORT="${KAFKA_CONTROLLER_PORT:-19093}"
DATA="${KAFKA_DATA_DIR:-$HERE/../../.local/kafka}"
TIMEOUT="${KAFKA_START_TIMEOUT:-120}"
EXTRA=""
FORMAT_ARGS=()
HEAP="${KAFKA_HEAP:-512m}"

cmd="${1:-}"; shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="$2"; shift 2;;
    --controller-port) CPORT="$2"; shift 2;;
    --data-dir) DATA="$2"; shift 2;;
    --timeout) TIMEOUT="$2"; shift 2;;
    --extra-config) EXTRA="$2"; shift 2;;
    --format-arg) FORMAT_ARGS+=("$2"); shift 2;;
    *) echo "kafka.sh: unknown option $1" >&2; exit 2;;
  esac
done

log() { echo "kafka.sh: $*" >&2; }

fetch() {
  if [ -f "$LIBS/.complete" ]; then return 0; fi
  log "resolving Apache Kafka jars with Maven (once)"
  mvn -q -B -f "$HERE/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$LIBS" -DincludeScope=runtime
  touch "$LIBS/.complete"
}

java_cmd() {
  # $1: log4j config; rest: main class and args
  local log4j="$1"; shift
  # shellcheck disable=SC2086  # KAFKA_JVM_OPTS is a list of options
  exec java -Xms128m -Xmx"$HEAP" -XX:+UseG1GC -Djava.awt.headless=true ${KAFKA_JVM_OPTS:-} \
       -Dlog4j.configuration="file:$log4j" -Dkafka.logs.dir="$DATA/logs" \
       -cp "$LIBS/*" "$@"
}

is_running() {
  [ -f "$DATA/broker.pid" ] && kill -0 "$(cat "$DATA/broker.pid")" 2>/dev/null
}

write_config() {
  mkdir -p "$DATA/logs" "$DATA/kraft"
  cat > "$DATA/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA/kraft
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
message.max.bytes=4194304
replica.fetch.max.bytes=4194304
num.network.threads=2
num.io.threads=2
log.retention.hours=24
PROPS
  if [ -n "$EXTRA" ]; then cat "$EXTRA" >> "$DATA/server.properties"; fi
  cat > "$DATA/log4j.properties" <<PROPS
log4j.rootLogger=WARN, file
log4j.logger.kafka.server.KafkaServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.Kafka\$=INFO
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=$DATA/logs/broker.log
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
PROPS
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  fetch
  if is_running; then log "already running (pid $(cat "$DATA/broker.pid"))"; return 0; fi
  write_config
  if [ ! -f "$DATA/kraft/meta.properties" ]; then
    local cluster; cluster="$(java_cmd "$DATA/log4j.properties" kafka.tools.StorageTool random-uuid)"
    (java_cmd "$DATA/log4j.properties" kafka.tools.StorageTool format \
        -t "$cluster" -c "$DATA/server.properties" --ignore-formatted \
        ${FORMAT_ARGS[@]+"${FORMAT_ARGS[@]}"} >/dev/null)
  fi
  : > "$DATA/logs/broker.log"
  java_cmd "$DATA/log4j.properties" kafka.Kafka "$DATA/server.properties" \
      > "$DATA/logs/stdout.log" 2>&1 < /dev/null &
  echo $! > "$DATA/broker.pid"
  local waited=0
  until port_open "$PORT" && grep -q "to STARTED" "$DATA/logs/broker.log" 2>/dev/null; do
    if ! is_running; then
      log "broker exited during start-up; last lines of its logs:"
      tail -n 30 "$DATA/logs/stdout.log" "$DATA/logs/broker.log" >&2 || true
      exit 1
    fi
    if [ "$waited" -ge $((TIMEOUT * 10)) ]; then
      log "broker not ready after ${TIMEOUT}s"; stop; exit 1
    fi
    sleep 0.1; waited=$((waited + 1))
  done
  log "broker ready on 127.0.0.1:$PORT (pid $(cat "$DATA/broker.pid"), data $DATA)"
}

stop() {
  if ! is_running; then rm -f "$DATA/broker.pid"; return 0; fi
  local pid; pid="$(cat "$DATA/broker.pid")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "broker ignored SIGTERM for 30s; killing"; kill -KILL "$pid" || true; fi
  rm -f "$DATA/broker.pid"
  log "broker stopped"
}

case "$cmd" in
  fetch) fetch;;
  start) start;;
  stop) stop;;
  status) if is_running; then echo "running pid $(cat "$DATA/broker.pid")"; else echo "stopped"; exit 1; fi;;
  *) sed -n '2,12p' "$0" >&2; exit 2;;
esac
