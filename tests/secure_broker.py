"""The session broker's SASL_SSL listener, for the TLS/SASL tests.

The session's one broker (tests/conftest.py) has, beside its PLAINTEXT listener, a SASL_SSL
listener that requires a client certificate signed by the test CA (mutual TLS) and a SASL
login: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, one user for all three. It is advertised as
``localhost``, the name in the broker's certificate, so the clients verify the host name.
The controller and the PLAINTEXT clients keep their own listeners.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.tls_material import TlsFiles, write_tls_material

USER = "cancel-worker"
PASSWORD = "sasl-password-of-the-test-broker"
KEY_PASSWORD = "client-key-password-never-shown"  # the client key's, in the TLS material
# Storage-format arguments that create the SCRAM user (KRaft keeps it in the metadata log).
FORMAT_ARGS = tuple(
    arg
    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
    for arg in ("--add-scram", f"{mechanism}=[name={USER},password={PASSWORD}]")
)


@dataclass(frozen=True)
class SecureBroker:
    port: int  # SASL_SSL, advertised as localhost
    tls: TlsFiles
    user: str
    password: str

    @property
    def bootstrap(self) -> str:
        return f"localhost:{self.port}"


def secure_listener(
    data: Path, *, port: int, secure_port: int, controller_port: int
) -> tuple[Path, TlsFiles]:
    """Write the TLS material and the listener properties (appended to the broker's own
    configuration by ``kafka.sh --extra-config``) into ``data``; returns both."""
    data.mkdir(parents=True, exist_ok=True)
    tls = write_tls_material(data / "tls", password=KEY_PASSWORD)
    keystore = data / "broker-keystore.pem"  # PEM keystore: the key, then the certificate
    keystore.write_bytes(tls.server_key.read_bytes() + tls.server_cert.read_bytes())

    def jaas(module: str, users: str = "") -> str:
        return (
            f"org.apache.kafka.common.security.{module} required "
            f'username="{USER}" password="{PASSWORD}"{users};'
        )

    properties = data / "secure-listener.properties"
    properties.write_text(
        "\n".join(
            [
                f"listeners=PLAINTEXT://127.0.0.1:{port},SASL_SSL://localhost:{secure_port},"
                f"CONTROLLER://127.0.0.1:{controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port},"
                f"SASL_SSL://localhost:{secure_port}",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
                "SASL_SSL:SASL_SSL",
                "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
                "listener.name.sasl_ssl.plain.sasl.jaas.config="
                + jaas("plain.PlainLoginModule", f' user_{USER}="{PASSWORD}"'),
                "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config="
                + jaas("scram.ScramLoginModule"),
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
                + jaas("scram.ScramLoginModule"),
                "ssl.keystore.type=PEM",
                f"ssl.keystore.location={keystore}",
                "ssl.truststore.type=PEM",
                f"ssl.truststore.location={tls.ca}",
                # SASL_SSL listeners ignore a client-auth setting without their prefix.
                "listener.name.sasl_ssl.ssl.client.auth=required",
                "",
            ]
        )
    )
    return properties, tls
