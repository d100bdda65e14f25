// A risk engine's side of the cancel worker, in Java 17: build a cancel command, sign it with
// the producer's Ed25519 key, publish it, and read the results topic until its result comes.
//
//   java -cp 'examples/java/target/libs/*' examples/java/CancelExample.java \
//       --bootstrap 127.0.0.1:9092 --producer-id risk-engine-7 --key-file risk-engine-7.key \
//       --account desk-a --market UM --symbol BTCUSDT --strategy-id 3000000123
//
// The order: one of --strategy-id N, --client-strategy-id S, --algo-id N, --client-algo-id S.
// Options: --commands-topic, --results-topic (the worker's defaults); --timeout-s (30).
// The result event is printed on stdout as the worker wrote it; exit 0 when it came (whatever
// its type), 1 when it did not in time, 2 for bad arguments. The contract is
// schemas/asyncapi.yaml.

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.PrivateKey;
import java.security.Signature;
import java.security.spec.PKCS8EncodedKeySpec;
import java.time.Duration;
import java.util.Base64;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class CancelExample {
    static final ObjectMapper JSON = new ObjectMapper();

    public static void main(String[] argv) throws Exception {
        System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        Map<String, String> args = parse(argv);
        String bootstrap = args.getOrDefault("bootstrap", "127.0.0.1:9092");
        String commandsTopic = args.getOrDefault("commands-topic", "papi.cancel.commands");
        String resultsTopic = args.getOrDefault("results-topic", "papi.cancel.results");
        Duration timeout = Duration.ofSeconds(Long.parseLong(args.getOrDefault("timeout-s", "30")));

        // 1. The command (schemas/cancel-command.schema.json). Its id is the idempotency key:
        //    a retry must send the same id and the same bytes.
        Map<String, Object> command = new LinkedHashMap<>();
        String commandId = "java-" + UUID.randomUUID();
        command.put("command_id", commandId);
        command.put("account", required(args, "account"));
        command.put("market", required(args, "market"));
        command.put("symbol", required(args, "symbol"));
        List<String> ids = List.of("strategy-id", "client-strategy-id", "algo-id", "client-algo-id");
        List<String> given = ids.stream().filter(args::containsKey).toList();
        if (given.size() != 1) {
            throw usage("give exactly one of --" + String.join(", --", ids));
        }
        String id = given.get(0);
        // strategy_id and algo_id are numbers, client_strategy_id and client_algo_id strings.
        Object orderId = id.startsWith("client-") ? args.get(id) : Long.valueOf(args.get(id));
        command.put(id.replace('-', '_'), orderId);
        command.put("issued_at", System.currentTimeMillis());
        command.put("source", "java-example");
        byte[] value = JSON.writeValueAsBytes(command);
        // The key, account:symbol: a kill switch and the single cancels of a symbol stay in order.
        byte[] key = (args.get("account") + ":" + args.get("symbol")).getBytes(StandardCharsets.UTF_8);

        // 2. The signature: Ed25519 over the exact value bytes, standard padded base64.
        PrivateKey privateKey = loadKey(Path.of(required(args, "key-file")));
        Signature signer = Signature.getInstance("Ed25519");
        signer.initSign(privateKey);
        signer.update(value);
        byte[] signature = Base64.getEncoder().encode(signer.sign());

        try (KafkaConsumer<byte[], byte[]> results = resultsReader(bootstrap);
             KafkaProducer<byte[], byte[]> producer = commandsWriter(bootstrap)) {
            // 3. Read the results topic from its end as of now, before publishing: the result
            //    cannot come before the command, so nothing is missed.
            List<TopicPartition> partitions = results.partitionsFor(resultsTopic).stream()
                    .map(p -> new TopicPartition(resultsTopic, p.partition()))
                    .toList();
            results.assign(partitions);
            results.seekToEnd(partitions);
            partitions.forEach(results::position); // resolve the end offsets now

            // 4. Publish, with the headers the worker verifies.
            ProducerRecord<byte[], byte[]> record = new ProducerRecord<>(commandsTopic, key, value);
            byte[] producerId = required(args, "producer-id").getBytes(StandardCharsets.UTF_8);
            record.headers().add("x-producer", producerId);
            record.headers().add("x-signature", signature);
            var sent = producer.send(record).get();
            System.err.printf("published %s to %s[%d]@%d%n",
                    commandId, sent.topic(), sent.partition(), sent.offset());

            // 5. Wait for the result that names this command id.
            long deadline = System.nanoTime() + timeout.toNanos();
            while (System.nanoTime() < deadline) {
                for (ConsumerRecord<byte[], byte[]> r : results.poll(Duration.ofMillis(200))) {
                    JsonNode event = readJson(r.value());
                    if (commandId.equals(event.path("command_id").asText(null))) {
                        System.out.println(new String(r.value(), StandardCharsets.UTF_8));
                        System.err.printf("result: %s%s%n", event.path("type").asText(),
                                event.hasNonNull("reason") ? " (" + event.get("reason").asText() + ")" : "");
                        return;
                    }
                }
            }
            System.err.printf("no result for %s within %s%n", commandId, timeout);
            System.exit(1);
        }
    }

    /** A record value as JSON; anything else (not ours to read) as an empty object. */
    static JsonNode readJson(byte[] value) {
        try {
            JsonNode node = value == null ? null : JSON.readTree(value);
            return node == null ? JSON.createObjectNode() : node;
        } catch (java.io.IOException notJson) {
            return JSON.createObjectNode();
        }
    }

    /** An unencrypted PKCS#8 PEM Ed25519 private key, as `cancel-worker keygen` writes it. */
    static PrivateKey loadKey(Path file) throws Exception {
        String pem = Files.readString(file);
        String base64 = pem.replaceAll("-----(BEGIN|END) PRIVATE KEY-----", "").replaceAll("\\s", "");
        byte[] der = Base64.getDecoder().decode(base64);
        return KeyFactory.getInstance("Ed25519").generatePrivate(new PKCS8EncodedKeySpec(der));
    }

    static KafkaProducer<byte[], byte[]> commandsWriter(String bootstrap) {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
        p.put(ProducerConfig.CLIENT_ID_CONFIG, "cancel-example-producer");
        return new KafkaProducer<>(p, new ByteArraySerializer(), new ByteArraySerializer());
    }

    static KafkaConsumer<byte[], byte[]> resultsReader(String bootstrap) {
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        // An exactly-once worker's aborted writes are on the topic too: never read them.
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
        p.put(ConsumerConfig.CLIENT_ID_CONFIG, "cancel-example-results");
        return new KafkaConsumer<>(p, new ByteArrayDeserializer(), new ByteArrayDeserializer());
    }

    static Map<String, String> parse(String[] argv) {
        Map<String, String> args = new HashMap<>();
        for (int i = 0; i < argv.length; i += 2) {
            if (!argv[i].startsWith("--") || i + 1 >= argv.length) {
                throw usage("expected --name value pairs, got " + argv[i]);
            }
            args.put(argv[i].substring(2), argv[i + 1]);
        }
        return args;
    }

    static String required(Map<String, String> args, String name) {
        String value = args.get(name);
        if (value == null) {
            throw usage("--" + name + " is required");
        }
        return value;
    }

    static RuntimeException usage(String problem) {
        System.err.println("usage: CancelExample --producer-id ID --key-file PEM --account A --market UM|CM"
                + " --symbol S (--strategy-id N | --client-strategy-id S | --algo-id N | --client-algo-id S)"
                + " [--bootstrap H:P] [--commands-topic T]"
                + " [--results-topic T] [--timeout-s S]: " + problem);
        System.exit(2);
        return new IllegalStateException(problem);
    }
}
