"""A broker that authorizes: a single-node KRaft broker of its own, with Kafka's
StandardAuthorizer, for the tests of what a cluster's ACLs refuse.

Beside its PLAINTEXT listener (the inter-broker one) and its controller listener, it has a
SASL_PLAINTEXT listener where the worker logs in with SCRAM-SHA-512 as :data:`USER`. The
principal of the PLAINTEXT and controller listeners (``User:ANONYMOUS``) is the super user:
the broker's own requests (inter-broker, controller) and the test's administration (its
topics, ACL changes, reading the results) go through them. On the SASL listener nothing is
allowed unless an ACL says so (``allow.everyone.if.no.acl.found`` stays false); :func:`grant`
adds ACLs with Kafka's own tool.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.tools.devstack import REPO, Broker, free_port, start_broker

USER = "acl-worker"
PASSWORD = "acl-worker-password-never-shown"
MECHANISM = "SCRAM-SHA-512"
# The storage format creates the SCRAM user (KRaft keeps it in the metadata log).
FORMAT_ARGS = ("--add-scram", f"{MECHANISM}=[name={USER},password={PASSWORD}]")


@dataclass(frozen=True)
class AclBroker:
    broker: Broker  # its PLAINTEXT listener: a super user's
    sasl_port: int

    @property
    def admin_bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def bootstrap(self) -> str:
        """The SASL_PLAINTEXT listener, where the ACLs apply."""
        return f"127.0.0.1:{self.sasl_port}"

    def stop(self) -> None:
        self.broker.stop()


def worker_security() -> dict[str, Any]:
    """The worker's settings for the SASL listener, as :data:`USER`."""
    return {
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": MECHANISM,
        "kafka_sasl_username": USER,
        "kafka_sasl_password": PASSWORD,
    }


def start_acl_broker(data: Path) -> AclBroker:
    port, sasl_port, controller_port = free_port(), free_port(), free_port()
    data.mkdir(parents=True, exist_ok=True)
    properties = data / "acl-listener.properties"
    properties.write_text(
        "\n".join(
            [
                f"listeners=PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_port},"
                f"CONTROLLER://127.0.0.1:{controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port},"
                f"SASL_PLAINTEXT://127.0.0.1:{sasl_port}",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
                "SASL_PLAINTEXT:SASL_PLAINTEXT",
                f"sasl.enabled.mechanisms={MECHANISM}",
                f"listener.name.sasl_plaintext.{MECHANISM.lower()}.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "super.users=User:ANONYMOUS",
                "allow.everyone.if.no.acl.found=false",
                "",
            ]
        )
    )
    broker = start_broker(
        data / "kafka",
        port=port,
        controller_port=controller_port,
        extra_config=properties,
        format_args=FORMAT_ARGS,
    )
    return AclBroker(broker, sasl_port)


def grant(broker: AclBroker, resource: list[str], operations: list[str]) -> None:
    """Allow :data:`USER` ``operations`` on ``resource`` (AclCommand's options, e.g.
    ``["--topic", "t"]`` or ``["--resource-pattern-type", "prefixed",
    "--transactional-id", "grp-"]``), with Kafka's own ACL tool, as the super user."""
    libs = REPO / "deploy" / "kafka" / "target" / broker.broker.version / "libs"  # as kafka.sh
    ops = [item for op in operations for item in ("--operation", op)]
    for tool in ("kafka.admin.AclCommand", "org.apache.kafka.tools.AclCommand"):  # 3.x, 4.x
        argv = ["java", "-cp", f"{libs}/*", tool, "--bootstrap-server", broker.admin_bootstrap]
        argv += ["--add", "--allow-principal", f"User:{USER}", *ops, *resource]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode == 0:
            return
        if "Could not find or load main class" not in done.stderr:
            raise AssertionError(f"{tool} failed: {done.stdout[-1000:]}{done.stderr[-2000:]}")
    raise AssertionError("no AclCommand in Kafka's libraries")
