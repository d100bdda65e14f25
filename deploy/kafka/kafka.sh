#!/usr/bin/env bash
# Apache Kafka (KRaft) on loopback, from jars that Maven resolves: a single node by default,
# or one node of a cluster whose nodes are all brokers and controllers.
#
#   kafka.sh fetch  [--version V]        resolve a pinned broker's jars (deploy/kafka/pom.xml)
#   kafka.sh start  [--version V] [--port P] [--controller-port C] [--data-dir D] [--timeout S]
#                   [--extra-config F] [--format-arg A]...
#                   [--node-id N --voters ID@HOST:PORT,... --cluster-id ID]
#   kafka.sh stop   [--data-dir D]
#   kafka.sh status [--data-dir D]
#   kafka.sh versions                    the versions the project tests (the first: default)
#
# --version: a Kafka release (3.9.1 unless KAFKA_VERSION says otherwise); its jars go to
# target/<version>/libs. `start` formats KRaft storage on first use, launches the broker in
# the background, and returns only once the broker accepts connections and has logged that
# it started. The pid, server.properties and broker log live in the data dir, so several
# brokers (one per test session, say) can run side by side with different dirs and ports.
# --extra-config appends a properties file to the generated configuration (a later key
# overrides an earlier one: e.g. more listeners); --format-arg passes an argument to the
# storage format on first start (e.g. --add-scram for SCRAM users). A cluster's nodes are
# started side by side (each returns once the quorum has formed and it has started), with
# their own --node-id and ports, the same --voters (every node's controller) and the same
# --cluster-id.
# Environment: KAFKA_HEAP (max heap, 512m), KAFKA_JVM_OPTS (more JVM options, e.g.
# "-Xlog:gc,safepoint:file=/tmp/gc.log:uptimemillis" to see the broker's pauses).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSIONS="3.9.1 4.4.0"
VERSION="${KAFKA_VERSION:-${VERSIONS%% *}}"
NODE_ID=1
VOTERS=""
CLUSTER_ID=""
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
    --version) VERSION="$2"; shift 2;;
    --node-id) NODE_ID="$2"; shift 2;;
    --voters) VOTERS="$2"; shift 2;;
    --cluster-id) CLUSTER_ID="$2"; shift 2;;
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

case "$VERSION" in
  [0-9].*|[0-9][0-9].*) ;;
  *) log "not a Kafka version: $VERSION"; exit 2;;
esac
LIBS="$HERE/target/$VERSION/libs"
MAJOR="${VERSION%%.*}"
VOTERS="${VOTERS:-$NODE_ID@127.0.0.1:$CPORT}"

fetch() {
  if [ -f "$LIBS/.complete" ]; then return 0; fi
  log "resolving Apache Kafka $VERSION jars with Maven (once)"
  # Kafka 4 logs through Log4j 2 (the distribution's backend); 3.x through reload4j.
  local profile=log4j1
  if [ "$MAJOR" -ge 4 ]; then profile=log4j2; fi
  mvn -q -B -f "$HERE/pom.xml" -P "$profile" -Dkafka.version="$VERSION" \
      dependency:copy-dependencies -DoutputDirectory="$LIBS" -DincludeScope=runtime
  touch "$LIBS/.complete"
}

java_cmd() {
  # $1: log4j config; rest: main class and args
  local log4j="$1"; shift
  # shellcheck disable=SC2086  # KAFKA_JVM_OPTS is a list of options
  exec java -Xms128m -Xmx"$HEAP" -XX:+UseG1GC -Djava.awt.headless=true ${KAFKA_JVM_OPTS:-} \
       -Dlog4j.configuration="file:$log4j" -Dlog4j2.configurationFile="$log4j" \
       -Dkafka.logs.dir="$DATA/logs" -cp "$LIBS/*" "$@"
}

is_running() {
  [ -f "$DATA/broker.pid" ] && kill -0 "$(cat "$DATA/broker.pid")" 2>/dev/null
}

write_config() {
  mkdir -p "$DATA/logs" "$DATA/kraft"
  cat > "$DATA/server.properties" <<PROPS
process.roles=broker,controller
node.id=$NODE_ID
controller.quorum.voters=$VOTERS
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
  # The broker log: warnings, start-up, and the version and features that run (Kafka 3.x
  # says "Kafka version: V"; both say the metadata.version and transaction.version).
  if [ "$MAJOR" -ge 4 ]; then
    cat > "$DATA/log4j.properties" <<PROPS
status=warn
appender.file.type=File
appender.file.name=file
appender.file.fileName=$DATA/logs/broker.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=WARN
rootLogger.appenderRef.file.ref=file
logger.started.name=kafka.server.BrokerServer
logger.started.level=INFO
logger.main.name=kafka.Kafka\$
logger.main.level=INFO
logger.version.name=org.apache.kafka.common.utils.AppInfoParser
logger.version.level=INFO
logger.features.name=org.apache.kafka.controller.FeatureControlManager
logger.features.level=INFO
PROPS
  else
    cat > "$DATA/log4j.properties" <<PROPS
log4j.rootLogger=WARN, file
log4j.logger.kafka.server.KafkaServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.Kafka\$=INFO
log4j.logger.org.apache.kafka.common.utils.AppInfoParser=INFO
log4j.logger.org.apache.kafka.controller.FeatureControlManager=INFO
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=$DATA/logs/broker.log
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
PROPS
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  fetch
  if is_running; then log "already running (pid $(cat "$DATA/broker.pid"))"; return 0; fi
  write_config
  if [ ! -f "$DATA/kraft/meta.properties" ]; then
    local cluster="$CLUSTER_ID"
    if [ -z "$cluster" ]; then
      cluster="$(java_cmd "$DATA/log4j.properties" kafka.tools.StorageTool random-uuid)"
    fi
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
  log "Kafka $VERSION ready on 127.0.0.1:$PORT (node $NODE_ID, pid $(cat "$DATA/broker.pid"), data $DATA)"
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
  versions) echo "$VERSIONS";;
  status) if is_running; then echo "running pid $(cat "$DATA/broker.pid")"; else echo "stopped"; exit 1; fi;;
  *) sed -n '2,11p' "$0" >&2; exit 2;;
esac
