"""The deploy kit agrees with the code (fast: files are parsed, nothing is started).

- Settings: every ``CANCEL_WORKER_*`` name written anywhere in deploy/ is a setting, and each
  place's whole environment (the image's ENV with the compose service's environment; the
  image's ENV, the ConfigMap and the Deployment's env) loads with ``load_settings``, so a
  misspelt name or a bad value fails here as it would fail the worker at start.
- Ports and paths: the Containerfile's EXPOSE, the compose port and healthcheck, the
  container port, probes, Service, ServiceMonitor and scrape annotations all use
  ``worker.ops.DEPLOY_PORT`` (which each place's METRICS_PORT setting equals) and the
  paths of ``worker.ops``.
- Credentials: the accounts file is a key of the mounted Secret (or the compose bind mount),
  readable by the pod's user, and the examples load with the worker's accounts loader.
- Shutdown: terminationGracePeriodSeconds (and compose's stop_grace_period) exceed the
  worker's worst-case drain, computed from worker/app.py's close steps and the settings.
- Scaling: one partition count everywhere (the CLI's default, the compose topics job, the
  KafkaTopics, KEDA's maxReplicaCount); KEDA watches the worker's own group and topic; the
  selectors select the Deployment's pods; every pod may use the exchange's whole IP budget.
- Kustomize: the base and each overlay render with the pinned kustomize and every object
  passes a strict schema validation (tests/k8s_validate.py); the base creates no Secret and
  needs no CRD; the example's Secret can never be the real one; production pins the image
  by digest. The Kubernetes facts above are read from the rendered overlays.
- Container: the base image is pinned by version and digest, and the Python dependencies
  are installed from a lock file with hashes that covers every runtime dependency.
- Metrics: every ``cancel_worker_*`` name in the dashboard's and the alerts' expressions is
  exported (read from prometheus_client's registry), every label matched or grouped by is
  one of that metric's, label values matched with ``=`` are ones the code produces, and
  counters are rated, gauges derived, histograms' buckets fed to histogram_quantile.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from tests import k8s_validate
from worker import metrics
from worker.cli.main import check
from worker.core.errors import FailureReason
from worker.core.events import CANCELED, DUPLICATE, FAILED, SWEPT
from worker.exchange.accounts import load_accounts, parse_accounts
from worker.ops import DEPLOY_PORT, LIVENESS_PATH, METRICS_PATH, READINESS_PATH
from worker.producers import load_producers
from worker.settings import (
    ENV_PREFIX,
    MAX_KAFKA_RECORD_BYTES,
    Settings,
    SettingsError,
    env_name,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
K8S = DEPLOY / "k8s"
LOCK = DEPLOY / "container" / "requirements.lock"
BASE = K8S / "base"
EXAMPLE = K8S / "overlays" / "example"
PRODUCTION = K8S / "overlays" / "production"
DASHBOARD = DEPLOY / "grafana" / "cancel-worker.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
KAFKA_POM = DEPLOY / "kafka" / "pom.xml"

SETTING_NAMES = frozenset(env_name(f.name) for f in fields(Settings))
ENV_TOKEN = re.compile(r"CANCEL_WORKER_[A-Z0-9_]+")
SECRET_NAME = "cancel-worker-accounts"  # the real credentials: no file here creates it
EXAMPLE_SECRET_NAME = "cancel-worker-accounts-example"
PRODUCERS_SECRET_NAME = "cancel-worker-producers"  # who may write commands: not created here
EXAMPLE_PRODUCERS_SECRET_NAME = "cancel-worker-producers-example"
KAFKA_SECRET_NAME = "cancel-worker-kafka"  # Kafka's SASL password and CA: not created here
EXAMPLE_KAFKA_SECRET_NAME = "cancel-worker-kafka-example"
REAL_SECRETS = [SECRET_NAME, PRODUCERS_SECRET_NAME, KAFKA_SECRET_NAME]
EXAMPLE_SECRETS = [EXAMPLE_SECRET_NAME, EXAMPLE_PRODUCERS_SECRET_NAME, EXAMPLE_KAFKA_SECRET_NAME]
EVERYWHERE = "0.0.0.0"  # noqa: S104 - a container's metrics must be reachable from outside it


# -- reading the files ------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d is not None]


@functools.cache
def _rendered(directory: Path) -> tuple[dict[str, Any], ...]:
    """``kustomize build`` of one kustomization (base or overlay), read once per session."""
    return tuple(k8s_validate.render(directory))


def _manifests(overlay: Path = PRODUCTION) -> list[dict[str, Any]]:
    """A rendered overlay's objects (copies: a test may change them)."""
    return copy.deepcopy(list(_rendered(overlay)))


def _k8s(kind: str, name: str = "cancel-worker", overlay: Path = PRODUCTION) -> dict[str, Any]:
    found = [d for d in _manifests(overlay) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in {overlay.name}, found {len(found)}"
    return found[0]


def _pod_spec(overlay: Path = PRODUCTION) -> dict[str, Any]:
    spec: dict[str, Any] = _k8s("Deployment", overlay=overlay)["spec"]["template"]["spec"]
    return spec


def _worker_container(overlay: Path = PRODUCTION) -> dict[str, Any]:
    containers = _pod_spec(overlay)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


@dataclass(frozen=True)
class Image:
    env: dict[str, str]
    exposed: tuple[int, ...]


def _image() -> Image:
    """ENV and EXPOSE of the Containerfile's final stage (what the image carries)."""
    lines = [
        line
        for line in CONTAINERFILE.read_text("utf-8").splitlines()
        if not line.lstrip().startswith("#")
    ]
    logical = re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()
    last_from = max(i for i, line in enumerate(logical) if line.upper().startswith("FROM "))
    env: dict[str, str] = {}
    exposed: list[int] = []
    for line in logical[last_from + 1 :]:
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "ENV":
            for item in shlex.split(rest):
                name, equals, value = item.partition("=")
                assert equals, f"ENV {item!r}: use the NAME=value form"
                env[name] = value
        elif instruction.upper() == "EXPOSE":
            exposed += [int(port.split("/")[0]) for port in rest.split()]
    return Image(env, tuple(exposed))


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text("utf-8"))
    return compose


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = _compose()["services"][name]
    return service


def _environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(str(item).partition("=")[::2] for item in raw)
    return {str(k): str(v) for k, v in raw.items()}


def _compose_env(service: str) -> dict[str, str]:
    """What a compose service's process sees: the image's ENV, then its environment."""
    return {**_image().env, **_environment(_service(service))}


def _k8s_env() -> dict[str, str]:
    """What the worker pod's process sees: the image's ENV, envFrom, then env."""
    configmap = _k8s("ConfigMap")
    env = dict(_image().env)
    container = _worker_container()
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == configmap["metadata"]["name"]
        env.update({str(k): str(v) for k, v in configmap["data"].items()})
    for item in container.get("env", []):
        # A value from a Secret (a Kafka password) is not in the manifest: stand in for it.
        env[item["name"]] = str(item["value"]) if "value" in item else "from-a-secret"
    # The Kafka CA is a file of a mounted Secret, which the settings check opens: stand in
    # with a readable file (test_kafka_is_sasl_ssl_with_the_ca_from_its_secret checks the
    # path is that Secret's key at its mount).
    if env.get(f"{ENV_PREFIX}KAFKA_SSL_CAFILE"):
        env[f"{ENV_PREFIX}KAFKA_SSL_CAFILE"] = str(CONTAINERFILE)
    return env


PLACES: dict[str, Callable[[], dict[str, str]]] = {
    "the image": lambda: _image().env,
    "compose worker": lambda: _compose_env("worker"),
    "compose topics job": lambda: _compose_env("topics"),
    "kubernetes worker": _k8s_env,
}


def _arg(command: list[str], option: str) -> str:
    assert option in command, f"{option} missing from {command}"
    return command[command.index(option) + 1]


def _duration_s(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def _published(port: object) -> tuple[int, int]:
    """(host port, container port) of a compose port entry."""
    if isinstance(port, dict):
        return int(port["published"]), int(port["target"])
    text = str(port).split("/")[0]
    parts = text.split(":")
    return int(parts[-2] if len(parts) > 1 else parts[-1]), int(parts[-1])


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path of a compose service's bind mounts."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def _cli_partitions() -> int:
    """The partition count ``cancel-worker check --create-topics`` uses by default."""
    from worker.cli.main import check  # noqa: PLC0415

    option = next(p for p in check.params if p.name == "partitions")
    return int(option.default)  # type: ignore[arg-type]


# -- settings ---------------------------------------------------------------------------------


def _deploy_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and DEPLOY / "kafka" not in path.parents:
            yield path


def test_every_cancel_worker_name_in_deploy_is_a_setting() -> None:
    seen: dict[str, str] = {}
    for path in _deploy_files():
        for name in ENV_TOKEN.findall(path.read_text("utf-8")):
            seen.setdefault(name, str(path.relative_to(ROOT)))
    unknown = {name: where for name, where in seen.items() if name not in SETTING_NAMES}
    assert not unknown, f"not settings (worker.settings.Settings): {unknown}"
    assert len(seen) >= 10  # the scan still finds them


@pytest.mark.parametrize("place", sorted(PLACES))
def test_each_places_environment_loads_as_the_worker_would_load_it(place: str) -> None:
    env = PLACES[place]()
    names = {name for name in env if name.startswith(ENV_PREFIX)}
    assert names, f"{place}: no CANCEL_WORKER_* variables found"
    # load_settings also accepts Kubernetes' service-link names; nothing here may use them.
    assert names <= SETTING_NAMES, f"{place}: not settings: {sorted(names - SETTING_NAMES)}"
    load_settings(env)  # SettingsError names the variable, the value and what is allowed


def test_the_settings_each_place_sets_are_the_ones_found() -> None:
    # The parsers above still see what the files set (a format change cannot hide a value).
    assert {
        "CANCEL_WORKER_METRICS_PORT",
        "CANCEL_WORKER_METRICS_HOST",
        "CANCEL_WORKER_LOG_FORMAT",
    } <= set(_image().env)
    assert len(_k8s("ConfigMap")["data"]) >= 10
    assert len(_environment(_service("worker"))) >= 10


# -- ports and paths --------------------------------------------------------------------------


def test_the_image_exposes_the_deploy_port_and_serves_there_on_every_interface() -> None:
    image = _image()
    assert image.exposed == (DEPLOY_PORT,)
    settings = load_settings(image.env)
    assert settings.metrics_port == DEPLOY_PORT
    assert settings.metrics_host == EVERYWHERE


def test_compose_publishes_the_metrics_port_and_checks_liveness_on_it() -> None:
    worker = _service("worker")
    settings = load_settings(_compose_env("worker"))
    assert settings.metrics_port == DEPLOY_PORT
    assert settings.metrics_host == EVERYWHERE
    assert (DEPLOY_PORT, DEPLOY_PORT) in [_published(p) for p in worker["ports"]]
    check = " ".join(worker["healthcheck"]["test"])
    assert re.findall(r"https?://[^'\"\s]+", check) == [
        f"http://127.0.0.1:{DEPLOY_PORT}{LIVENESS_PATH}"
    ]


def test_kubernetes_serves_and_probes_the_metrics_port_by_name() -> None:
    settings = load_settings(_k8s_env())
    assert settings.metrics_port == DEPLOY_PORT
    assert settings.metrics_host == EVERYWHERE
    container = _worker_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": DEPLOY_PORT}
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert liveness["httpGet"] == {"path": LIVENESS_PATH, "port": "metrics"}
    assert readiness["httpGet"] == {"path": READINESS_PATH, "port": "metrics"}
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"] == {"path": LIVENESS_PATH, "port": "metrics"}
    for probe in (liveness, readiness):
        assert 0 < probe["timeoutSeconds"] < probe["periodSeconds"]
        assert probe["failureThreshold"] >= 2  # one slow answer never restarts or unreadies
    # A restart costs a rebalance: liveness gives a wedged worker longer than readiness.
    assert (
        liveness["periodSeconds"] * liveness["failureThreshold"]
        > readiness["periodSeconds"] * readiness["failureThreshold"]
    )


def test_the_service_servicemonitor_and_annotations_scrape_the_metrics_port() -> None:
    service = _k8s("Service")
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics"
    assert port["port"] == DEPLOY_PORT
    assert port["targetPort"] in ("metrics", DEPLOY_PORT)
    monitor = _k8s("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == METRICS_PATH
    # Without the Prometheus Operator (the example), the pods carry scrape annotations...
    annotations = _k8s("Deployment", overlay=EXAMPLE)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(DEPLOY_PORT)
    assert annotations["prometheus.io/path"] == METRICS_PATH
    # ... and with its ServiceMonitor (production) they do not: never scraped twice.
    template = _k8s("Deployment")["spec"]["template"]["metadata"]
    assert not any(k.startswith("prometheus.io/") for k in template.get("annotations") or {})


def test_the_service_links_kubernetes_would_inject_are_accepted() -> None:
    # If enableServiceLinks is ever turned back on, the names derived from the Service
    # (cancel-worker → CANCEL_WORKER_SERVICE_HOST, ...) must not stop the worker.
    service = _k8s("Service")
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    (port,) = service["spec"]["ports"]
    number, name = port["port"], port["name"].upper().replace("-", "_")
    links = {
        f"{prefix}_SERVICE_HOST": "10.0.0.1",
        f"{prefix}_SERVICE_PORT": str(number),
        f"{prefix}_SERVICE_PORT_{name}": str(number),
        f"{prefix}_PORT": f"tcp://10.0.0.1:{number}",
        f"{prefix}_PORT_{number}_TCP": f"tcp://10.0.0.1:{number}",
        f"{prefix}_PORT_{number}_TCP_PROTO": "tcp",
        f"{prefix}_PORT_{number}_TCP_PORT": str(number),
        f"{prefix}_PORT_{number}_TCP_ADDR": "10.0.0.1",
    }
    load_settings({**_k8s_env(), **links})


# -- credentials ------------------------------------------------------------------------------


def _secret_files() -> dict[str, str]:
    secret = _k8s("Secret", EXAMPLE_SECRET_NAME, overlay=EXAMPLE)
    assert not secret.get("data"), "the example carries stringData only"
    files: dict[str, str] = secret["stringData"]
    return files


def test_the_accounts_file_is_a_key_of_the_mounted_secret_and_loads(tmp_path: Path) -> None:
    settings = load_settings(_k8s_env())
    assert settings.accounts_file is not None
    accounts_file = PurePosixPath(str(settings.accounts_file))
    # The example overlay mounts its own example Secret where production mounts the real one.
    for overlay, names in (
        (PRODUCTION, REAL_SECRETS),
        (EXAMPLE, EXAMPLE_SECRETS),
    ):
        volumes = {v["name"]: v["secret"] for v in _pod_spec(overlay)["volumes"] if "secret" in v}
        assert [s["secretName"] for s in volumes.values()] == names, overlay.name
    volumes = {v["name"]: v["secret"] for v in _pod_spec(EXAMPLE)["volumes"] if "secret" in v}
    (volume,) = [name for name, s in volumes.items() if s["secretName"] == EXAMPLE_SECRET_NAME]
    (mount,) = [m for m in _worker_container(EXAMPLE)["volumeMounts"] if m["name"] == volume]
    mount_path = PurePosixPath(mount["mountPath"])
    assert mount.get("readOnly") is True
    assert "subPath" not in mount and "items" not in volumes[volume]
    assert accounts_file.parent == mount_path, f"{accounts_file} is not in {mount_path}"
    files = _secret_files()
    assert accounts_file.name in files, f"the Secret has no key {accounts_file.name!r}"
    # Every file the accounts file names is another key of the same Secret...
    entries = tomllib.loads(files[accounts_file.name])["accounts"]
    for alias, entry in entries.items():
        for field, value in entry.items():
            if field.endswith("_file"):
                path = PurePosixPath(value)
                assert path.parent == mount_path, f"{alias}.{field} = {value}: not in the mount"
                assert path.name in files, f"{alias}.{field}: the Secret has no key {path.name!r}"
    # ... and the example, mounted elsewhere, loads with the worker's own loader.
    for key, value in files.items():
        (tmp_path / key).write_text(value)
    text = files[accounts_file.name].replace(f"{mount_path}/", f"{tmp_path}/")
    assert sorted(parse_accounts(tomllib.loads(text), tmp_path)) == sorted(entries)
    for key, value in files.items():
        if key != accounts_file.name:
            assert "REPLACE-ME" in value, f"{key}: the example must hold placeholders only"


def test_the_secret_files_are_readable_by_the_pods_user_and_nobody_else() -> None:
    pod = _pod_spec()
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] != 0
    secrets = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert len(secrets) == 3  # the accounts, the producers and Kafka's
    for volume in secrets:
        mode = volume["defaultMode"]
        # Secret files are owned by root; the kubelet gives them to fsGroup, so the group
        # bits decide whether the worker can read its accounts.
        assert context.get("fsGroup") is not None, "without fsGroup, uid 10001 cannot read 0440"
        assert mode & 0o040, f"defaultMode {mode:o}: the group cannot read"
        assert not (mode & 0o007), f"defaultMode {mode:o}: others can read the credentials"
    container = _worker_container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False


def test_compose_mounts_the_example_accounts_where_the_worker_and_simulator_read_them() -> None:
    hosts: set[Path] = set()
    for name in ("worker", "topics"):
        settings = load_settings(_compose_env(name))
        assert settings.accounts_file is not None
        mounts = _bind_mounts(_service(name))
        assert str(settings.accounts_file) in mounts, f"{name}: accounts file not mounted"
        hosts.add(mounts[str(settings.accounts_file)])
    (host,) = hosts
    sim = _service("sim")
    sim_mounts = _bind_mounts(sim)
    assert sim_mounts[_arg(sim["command"], "--accounts")] == host
    accounts = load_accounts(host)
    assert accounts
    for alias, entry in tomllib.loads(host.read_text("utf-8"))["accounts"].items():
        for field in ("api_key", "secret"):
            assert "fake" in entry[field], f"{alias}.{field}: example keys must be visibly fake"
    seed = json.loads(sim_mounts[_arg(sim["command"], "--seed")].read_text("utf-8"))
    assert seed["orders"]
    assert {order["account"] for order in seed["orders"]} <= set(accounts)


def test_compose_points_the_worker_at_the_broker_and_the_simulator() -> None:
    from worker.tools.sim.app import SimConfig, build_app  # noqa: PLC0415
    from worker.tools.sim.server import state_from_accounts  # noqa: PLC0415

    settings = load_settings(_compose_env("worker"))
    sim = _service("sim")["command"]
    assert sim[0] == "sim"
    assert _arg(sim, "--host") == EVERYWHERE
    papi, clock = urlsplit(settings.papi_url), urlsplit(settings.time_url)
    assert (papi.hostname, papi.port) == ("sim", int(_arg(sim, "--port")))
    assert clock.netloc == papi.netloc
    app = build_app(state_from_accounts({}, SimConfig()))
    assert clock.path in {getattr(route, "path", None) for route in app.routes}
    # The bootstrap servers are the broker's advertised listener for the stack's containers.
    kafka = _environment(_service("kafka"))
    advertised = {
        listener.split("://")[1] for listener in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    }
    assert set(settings.bootstrap_servers.split(",")) <= advertised
    topics = load_settings(_compose_env("topics"))
    for name in ("bootstrap_servers", "commands_topic", "results_topic", "deadletter_topic"):
        assert getattr(topics, name) == getattr(settings, name), name


def test_compose_runs_the_pinned_broker_with_what_exactly_once_needs() -> None:
    kafka = _service("kafka")
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", KAFKA_POM.read_text())
    assert version is not None
    assert kafka["image"] == f"apache/kafka:{version.group(1)}"
    env = _environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= MAX_KAFKA_RECORD_BYTES
    worker = _service("worker")
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["sim"]["condition"] == "service_healthy"
    assert _service("topics")["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("kafka", "sim", "worker"):
        assert _service(name)["healthcheck"]["test"], f"{name} has no healthcheck"
    build = worker["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == CONTAINERFILE


# -- shutdown ---------------------------------------------------------------------------------

# Pipeline.run looks at the stop flag between fetches of at most 100 ms.
FETCH_POLL_S = 0.1


CLOSE_METHODS = ("_closers", "__aenter__")  # where Worker makes and fills its close steps


def _close_steps() -> tuple[int, ast.expr]:
    """How many close steps ``Worker.__aenter__`` registers (with ``Worker._closers``, which
    makes the ``_Closers``), and the bound of each."""
    tree = ast.parse((ROOT / "worker" / "app.py").read_text("utf-8"))
    worker = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Worker")
    methods = [
        n
        for n in worker.body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name in CLOSE_METHODS
    ]
    if len(methods) != len(CLOSE_METHODS):
        pytest.fail("Worker's close steps moved: recompute the drain")
    steps = 0
    assigned: dict[str, ast.expr] = {}
    for node in (n for method in methods for n in ast.walk(method)):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            assigned[node.targets[0].id] = node.value
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "closers"
        ):
            steps += 1
    closers = assigned.get("closers")
    if not (
        isinstance(closers, ast.Call)
        and isinstance(closers.func, ast.Name)
        and closers.func.id == "_Closers"
        and closers.args
        and steps
    ):
        pytest.fail("Worker.__aenter__ no longer registers _Closers steps: recompute the drain")
    bound = closers.args[0]
    if isinstance(bound, ast.Name):
        bound = assigned[bound.id]
    return steps, bound


def _evaluate(node: ast.expr, settings: Settings) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self.settings":
        return float(getattr(settings, node.attr))
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, settings), _evaluate(node.right, settings)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Mult):
            return left * right
    pytest.fail(f"cannot evaluate the close bound {ast.unparse(node)!r}: recompute the drain")


def drain_bound_s(settings: Settings) -> float:
    """The longest a worker takes from SIGTERM to exit (worker/kafka/pipeline.py ``_shutdown``,
    worker/app.py ``Worker.__aexit__``): the fetch loop notices the stop; running commands
    get SHUTDOWN_GRACE_S; the flush under way gets COMMIT_TIMEOUT_S to finish
    (``_stop_flusher``) and the final flush as long again (``_flush_bounded``); then each
    close step runs in turn, each bounded by its own timeout."""
    steps, per_step = _close_steps()
    return (
        FETCH_POLL_S
        + settings.shutdown_grace_s
        + 2 * settings.commit_timeout_s
        + steps * _evaluate(per_step, settings)
    )


def test_pods_get_longer_than_the_workers_worst_case_drain() -> None:
    k8s = load_settings(_k8s_env())
    bound = drain_bound_s(k8s)
    assert bound > k8s.shutdown_grace_s + k8s.commit_timeout_s  # the close steps count too
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    assert grace > bound, f"terminationGracePeriodSeconds {grace} <= drain bound {bound:.1f}s"
    compose = load_settings(_compose_env("worker"))
    stop = _duration_s(_service("worker")["stop_grace_period"])
    assert stop > drain_bound_s(compose), f"stop_grace_period {stop}s <= drain bound"


def test_each_pod_can_have_a_core_of_its_own() -> None:
    """Guaranteed QoS with a whole CPU (requests = limits, for every resource): what the
    kubelet's static CPU manager policy needs to give the pod an exclusive core."""
    resources = _worker_container()["resources"]
    assert resources["requests"] == resources["limits"]
    assert set(resources["limits"]) == {"cpu", "memory"}
    assert str(resources["limits"]["cpu"]) == "1"


# -- scaling ----------------------------------------------------------------------------------


def test_one_partition_count_everywhere() -> None:
    partitions = _cli_partitions()
    command = _service("topics")["command"]
    assert command[:2] == ["check", "--create-topics"]
    # The one-shot job needs Kafka only: the exchange clock may be unreachable from it.
    params = check.make_context("check", list(command[1:])).params
    assert "clock" in params["skip"]
    assert int(_arg(command, "--partitions")) == partitions
    assert _k8s("ScaledObject")["spec"]["maxReplicaCount"] == partitions
    settings = load_settings(_k8s_env())
    topics = {
        d["metadata"]["name"]: d["spec"]
        for d in _manifests()
        if d["kind"] == "KafkaTopic" and d["apiVersion"].startswith("kafka.strimzi.io/")
    }
    assert set(topics) == {
        settings.commands_topic,
        settings.results_topic,
        settings.deadletter_topic,
    }
    # As `check --create-topics` makes them: commands and results alike, one dead-letter.
    assert topics[settings.commands_topic]["partitions"] == partitions
    assert topics[settings.results_topic]["partitions"] == partitions
    assert topics[settings.deadletter_topic]["partitions"] == 1


def test_keda_scales_the_deployment_on_the_workers_own_group_and_topic() -> None:
    settings = load_settings(_k8s_env())
    scaled = _k8s("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    deployment = _k8s("Deployment")
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    # Without KEDA (the base, the example), a fixed count within the same bounds.
    for overlay in (BASE, EXAMPLE):
        replicas = _k8s("Deployment", overlay=overlay)["spec"]["replicas"]
        assert spec["minReplicaCount"] <= replicas <= spec["maxReplicaCount"], overlay.name
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]  # never scaled to zero
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["topic"] == settings.commands_topic
    assert meta["consumerGroup"] == settings.group_id
    assert meta["bootstrapServers"] == settings.bootstrap_servers
    assert int(meta["lagThreshold"]) > 0
    assert str(meta.get("allowIdleConsumers", "false")).lower() == "false"


def test_every_pod_may_use_the_exchanges_whole_weight_budget() -> None:
    # No static split between the pods behind one egress IP: the exchange's used-weight
    # header tells each what the others spent (tests/test_shared_ip_budget.py).
    settings = load_settings(_k8s_env())
    exchange = Settings()  # the defaults are the exchange's limits
    assert settings.rate_weight_window_ms == exchange.rate_weight_window_ms
    assert settings.rate_weight_limit == exchange.rate_weight_limit


def test_the_selectors_select_the_workers_pods() -> None:
    deployment = _k8s("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items()
    pdb = _k8s("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"] == {"matchLabels": selector}
    min_replicas = _k8s("ScaledObject")["spec"]["minReplicaCount"]
    if "maxUnavailable" in pdb["spec"]:
        assert 1 <= pdb["spec"]["maxUnavailable"] < min_replicas
    else:
        assert pdb["spec"]["minAvailable"] < min_replicas  # else no node could be drained
    service = _k8s("Service")
    assert service["spec"]["selector"].items() <= labels.items()


# -- kustomize: what applying the kit does -----------------------------------------------------

KUSTOMIZATIONS = {d.relative_to(K8S).as_posix(): d for d in k8s_validate.KUSTOMIZATIONS}
CORE_API_VERSIONS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"}
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "KafkaTopic"}


def test_the_validator_covers_the_base_and_every_overlay() -> None:
    overlays = {p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml")}
    assert set(k8s_validate.KUSTOMIZATIONS) == {BASE, *overlays}
    assert overlays == {EXAMPLE, PRODUCTION}


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_each_kustomization_renders_and_every_object_passes_strict_validation(name: str) -> None:
    docs = _manifests(KUSTOMIZATIONS[name])
    assert len(docs) >= 4
    problems = [str(p) for doc in docs for p in k8s_validate.problems(doc)]
    assert problems == [], f"{name}:\n" + "\n".join(problems)


def test_the_strict_validation_fails_what_a_cluster_would_refuse_or_drop() -> None:
    def problems_of(doc: dict[str, Any]) -> str:
        return "\n".join(map(str, k8s_validate.problems(doc)))

    deployment = _k8s("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert "'readinessprobe' was unexpected" in problems_of(deployment)
    deployment = _k8s("Deployment")
    deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] = [1]
    assert "maxSurge" in problems_of(deployment)
    deployment = _k8s("Deployment")
    deployment["metadata"]["label"] = {"a": "b"}
    assert "'label' was unexpected" in problems_of(deployment)
    scaled = _k8s("ScaledObject")
    scaled["spec"]["minReplicas"] = 2
    assert "'minReplicas' was unexpected" in problems_of(scaled)
    monitor = _k8s("ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "fifteen seconds"
    assert "interval" in problems_of(monitor)
    topic = _k8s("KafkaTopic", "papi.cancel.commands")
    topic["spec"]["partitions"] = 0
    assert "partitions" in problems_of(topic)
    topic["apiVersion"] = "kafka.strimzi.io/v1beta2"  # not served by current Strimzi
    assert "no schema" in problems_of(topic)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "no schema" in problems_of(unknown)


def test_applying_the_base_alone_creates_no_secret_and_needs_no_crd() -> None:
    docs = _manifests(BASE)
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    assert {d["apiVersion"] for d in docs} <= CORE_API_VERSIONS
    assert all("namespace" not in d["metadata"] for d in docs), "the overlays choose it"
    # It names the real Secret (mounted, never created): a pod waits for it, nothing is
    # overwritten.
    volumes = _pod_spec(BASE)["volumes"]
    assert [v["secret"]["secretName"] for v in volumes if "secret" in v] == REAL_SECRETS


def test_no_overlay_creates_a_secret_named_like_the_real_one() -> None:
    assert not [d for d in _manifests(PRODUCTION) if d["kind"] == "Secret"]
    names = sorted(d["metadata"]["name"] for d in _manifests(EXAMPLE) if d["kind"] == "Secret")
    assert names == sorted(EXAMPLE_SECRETS)
    # Nothing in the kit (files included) creates a Secret under a real name.
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "Secret":
                assert doc["metadata"]["name"] not in REAL_SECRETS, path


def test_the_producers_file_is_a_key_of_the_mounted_producers_secret_and_loads(
    tmp_path: Path,
) -> None:
    """The worker refuses to start without its producers file: the kit mounts it where the
    ConfigMap says, and the example's loads with the worker's own loader."""
    settings = load_settings(_k8s_env())
    assert settings.producers_file is not None and settings.require_signed_commands
    producers_file = PurePosixPath(str(settings.producers_file))
    volumes = {v["name"]: v["secret"] for v in _pod_spec(EXAMPLE)["volumes"] if "secret" in v}
    (volume,) = [n for n, s in volumes.items() if s["secretName"] == EXAMPLE_PRODUCERS_SECRET_NAME]
    (mount,) = [m for m in _worker_container(EXAMPLE)["volumeMounts"] if m["name"] == volume]
    assert mount.get("readOnly") is True and "subPath" not in mount
    assert producers_file.parent == PurePosixPath(mount["mountPath"])
    secret = _k8s("Secret", EXAMPLE_PRODUCERS_SECRET_NAME, overlay=EXAMPLE)
    files: dict[str, str] = secret["stringData"]
    (tmp_path / producers_file.name).write_text(files[producers_file.name])
    producers = load_producers(tmp_path / producers_file.name)
    assert {p.id for p in producers} == {"risk-engine-desk-a", "ops-console"}


@pytest.mark.parametrize(
    ("overlay", "namespace"), [(EXAMPLE, "cancel-worker-example"), (PRODUCTION, "cancel-worker")]
)
def test_each_overlay_puts_every_object_in_its_own_namespace(overlay: Path, namespace: str) -> None:
    docs = _manifests(overlay)
    (created,) = [d for d in docs if d["kind"] == "Namespace"]
    assert created["metadata"]["name"] == namespace
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]


def test_crd_kinds_come_only_from_the_optional_components() -> None:
    assert not {d["kind"] for d in _manifests(EXAMPLE)} & CRD_KINDS
    assert {d["kind"] for d in _manifests(PRODUCTION)} >= CRD_KINDS
    for directory in sorted(p for p in (K8S / "components").iterdir() if p.is_dir()):
        (kustomization,) = _docs(directory / "kustomization.yaml")
        assert kustomization["kind"] == "Component", directory.name
    production = yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text("utf-8"))
    assert production["components"], "production enables the components"
    for directory in (BASE, EXAMPLE, PRODUCTION):
        for path in directory.glob("*.yaml"):
            kinds = {d.get("kind") for d in _docs(path)}
            assert not kinds & CRD_KINDS, f"{path}: a CRD kind outside the components"


DIGEST = re.compile(r"(?P<repo>[a-z0-9.-]+(?::\d+)?/[a-z0-9._/-]+)@sha256:(?P<hex>[0-9a-f]{64})")


def test_production_runs_the_image_by_registry_and_digest() -> None:
    image = _worker_container(PRODUCTION)["image"]
    match = DIGEST.fullmatch(image)
    assert match is not None, f"{image}: not registry/repository@sha256:<digest>"
    assert "." in match["repo"].split("/")[0], "the first part names a registry host"
    # The example runs a local build under the project's version.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    assert _worker_container(EXAMPLE)["image"] == f"cancel-worker:{project['version']}"
    assert _worker_container(BASE)["image"] == "cancel-worker"


def test_kustomize_edit_set_image_sets_the_digest(tmp_path: Path) -> None:
    # docs/operations.md's way to set the real digest, on a copy of the kit.
    kit = tmp_path / "k8s"
    shutil.copytree(K8S, kit)
    digest = "sha256:" + "ab" * 32
    image = f"registry.internal:5000/desk/cancel-worker@{digest}"
    overlay = kit / "overlays" / "production"
    subprocess.run(
        [k8s_validate.kustomize(), "edit", "set", "image", f"cancel-worker={image}"],
        cwd=overlay,
        check=True,
        capture_output=True,
    )
    rendered = k8s_validate.render(overlay)
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image


def test_the_workers_are_spread_over_nodes_and_zones() -> None:
    pod = _pod_spec()
    labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    constraints = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(constraints) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in constraints.values():
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
        # Only the pods of one revision count, so a rollout's surge pod is not held back.
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]
    assert constraints["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"


# -- the container image ----------------------------------------------------------------------


def test_the_base_image_is_pinned_by_version_and_digest() -> None:
    text = CONTAINERFILE.read_text("utf-8")
    (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", default), (
        f"PYTHON_IMAGE={default}: not an exact version with its digest"
    )
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms and all(f == "${PYTHON_IMAGE}" for f in froms)


def _locked() -> dict[str, str]:
    """The lock file's packages (canonical name → version); each one carries hashes."""
    text = re.sub(r"\\\n", " ", LOCK.read_text("utf-8"))
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert match is not None, f"requirements.lock: not a pin with hashes: {line[:80]!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_the_lock_covers_every_runtime_dependency() -> None:
    pins = _locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    for entry in project["dependencies"]:
        requirement = Requirement(entry)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock has {name}=={pins[name]}, pyproject.toml wants {requirement}:"
            " run `make lock`"
        )
    assert len(pins) > len(project["dependencies"])  # the transitive ones too


def test_the_image_installs_exactly_the_lock() -> None:
    text = CONTAINERFILE.read_text("utf-8")
    logical = re.sub(r"\\\n", " ", text)
    installs = [
        line for line in logical.splitlines() if re.search(r"\bpip (install|wheel)\b", line)
    ]
    assert installs
    for line in installs:
        for command in re.split(r"&&", line):
            if "pip install" in command and "requirements.lock" in command:
                assert "--require-hashes" in command
            elif re.search(r"\bpip (install|wheel)\b", command):
                # The project's own wheel: nothing else comes in with it.
                assert "--no-deps" in command, command
    assert f"COPY {LOCK.relative_to(ROOT).as_posix()} " in text
    ignore = (CONTAINERFILE.parent / "Containerfile.dockerignore").read_text("utf-8")
    assert f"!{LOCK.relative_to(ROOT).as_posix()}" in ignore.splitlines()


# -- metrics in the dashboard and the alerts --------------------------------------------------


@dataclass(frozen=True)
class Exported:
    family: str
    kind: str
    labels: frozenset[str]


SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
TARGET_LABELS = frozenset({"instance", "job"})  # added by Prometheus to every scraped series


def _wrappers() -> dict[str, MetricWrapperBase]:
    """worker.metrics' metrics by their attribute name (RESULTS, ...)."""
    return {k: v for k, v in vars(metrics).items() if isinstance(v, MetricWrapperBase)}


def _exported() -> dict[str, Exported]:
    """Every sample name the worker exports, from the registry after importing
    worker.metrics, with the family's type and label names."""
    labelnames = {w._name: frozenset(w._labelnames) for w in _wrappers().values()}
    out: dict[str, Exported] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("cancel_worker_"):
            continue
        assert family.name in labelnames, f"{family.name} is not defined in worker.metrics"
        for suffix in SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            labels = labelnames[family.name] | extra
            out[family.name + suffix] = Exported(family.name, family.type, labels)
        for sample in family.samples:
            labels = labelnames[family.name] | set(sample.labels)
            out.setdefault(sample.name, Exported(family.name, family.type, labels))
    return out


EXPORTED = _exported()


def _sample(wrapper: MetricWrapperBase) -> str:
    """The main sample name of one of worker.metrics' metrics."""
    return next(
        name
        for name, e in EXPORTED.items()
        if e.family == wrapper._name and name.endswith(("_total", "_bucket")) == (e.kind != "gauge")
    )


def _code_label_values() -> dict[tuple[str, str], frozenset[str]]:
    """(family, label) → every value the code gives that label, where the code gives it
    only literal values (``metrics.GOVERNOR_STOPS.labels("ban")``), plus the label sets the
    code builds from its own enumerations."""
    wrappers = _wrappers()
    values: dict[tuple[str, str], set[str]] = {}
    computed: set[tuple[str, str]] = set()
    for path in sorted((ROOT / "worker").rglob("*.py")):
        if "tools" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "labels"
                and isinstance(node.func.value, ast.Attribute)
                and isinstance(node.func.value.value, ast.Name)
                and node.func.value.value.id == "metrics"
                and node.func.value.attr in wrappers
            ):
                continue
            wrapper = wrappers[node.func.value.attr]
            given = list(zip(wrapper._labelnames, node.args, strict=False))
            given += [(kw.arg, kw.value) for kw in node.keywords if kw.arg is not None]
            for label, arg in given:
                key = (wrapper._name, label)
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    values.setdefault(key, set()).add(arg.value)
                else:
                    computed.add(key)
    closed = {key: frozenset(v) for key, v in values.items() if key not in computed}
    results = metrics.RESULTS._name  # labels("type", "reason") from the event built
    closed[(results, "type")] = frozenset({CANCELED, SWEPT, FAILED, DUPLICATE})
    closed[(results, "reason")] = frozenset({r.value for r in FailureReason} | {""})
    return closed


LABEL_VALUES = _code_label_values()

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
METRIC = re.compile(r"(?<![A-Za-z0-9_:])cancel_worker_[a-z0-9_]+")
SELECTOR = re.compile(r"(cancel_worker_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
RATED = re.compile(r"\b(rate|irate|increase|resets)\s*\(\s*(cancel_worker_[a-z0-9_]+)")
DERIVED = re.compile(r"\b(deriv|delta|idelta|predict_linear)\s*\(\s*(cancel_worker_[a-z0-9_]+)")
QUANTILE = re.compile(r"\bhistogram_quantile\s*\(")
LABEL_QUERY = re.compile(r"\blabel_values\s*\(\s*(cancel_worker_[a-z0-9_]+)\s*,\s*(\w+)\s*\)")
LITERALS = re.compile(r"[\w.:-]*(?:\|[\w.:-]*)*")


def _close(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def _open(text: str, end: int) -> int:
    """Index of the parenthesis opening the one closing at ``end``."""
    depth = 0
    for i in range(end, -1, -1):
        depth += {")": 1, "(": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def _aggregated(masked: str, start: int, end: int) -> str:
    """The expression a ``by (...)`` clause at [start, end) aggregates: the parenthesised
    group after it (``sum by (x) (...)``) or before it (``sum(...) by (x)``)."""
    after = len(masked[end:]) - len(masked[end:].lstrip())
    if masked[end + after : end + after + 1] == "(":
        return masked[end + after : _close(masked, end + after) + 1]
    before = masked[:start].rstrip()
    assert before.endswith(")"), f"no aggregated expression around {masked[start:end]!r}"
    return before[_open(before, len(before) - 1) :]


def promql_problems(expr: str) -> list[str]:
    """What in one PromQL expression does not agree with the exported metrics."""
    masked = STRING.sub(lambda m: '"' + "x" * (len(m.group()) - 2) + '"', expr)
    names = METRIC.findall(masked)
    problems = [] if names else ["references no cancel_worker_* metric"]
    problems += [f"{n} is not exported" for n in dict.fromkeys(names) if n not in EXPORTED]
    if problems:
        return problems

    def labels_of(part: str) -> frozenset[str]:
        found = [EXPORTED[n].labels for n in METRIC.findall(part)]
        return frozenset.intersection(*found) | TARGET_LABELS if found else TARGET_LABELS

    for match in SELECTOR.finditer(masked):
        name = match.group(1)
        exported = EXPORTED[name]
        body = expr[match.start(2) : match.end(2)]
        for matcher in filter(str.strip, re.split(r",(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", body)):
            parsed = MATCHER.fullmatch(matcher)
            if parsed is None:
                problems.append(f"{name}: cannot read the matcher {matcher!r}")
                continue
            label, op, value = parsed.groups()
            if label not in exported.labels | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r} (it has {sorted(exported.labels)})")
                continue
            known = LABEL_VALUES.get((exported.family, label))
            if known is None or "$" in value or op not in ("=", "=~"):
                continue
            if op == "=~" and not LITERALS.fullmatch(value):
                continue
            for alternative in value.split("|") if op == "=~" else [value]:
                if alternative not in known:
                    problems.append(
                        f"{name}{{{label}{op}{value!r}}}: the code never sets {label}="
                        f"{alternative!r} (it sets {sorted(known)})"
                    )
    for match in GROUPING.finditer(masked):
        keyword, listed = match.groups()
        wanted = {label.strip() for label in listed.split(",") if label.strip()}
        scope = (
            _aggregated(masked, match.start(), match.end())
            if keyword in ("by", "without")
            else masked
        )
        allowed = labels_of(scope)
        if wanted - allowed:
            problems.append(f"{keyword} ({listed}): {sorted(wanted - allowed)} not on {scope!r}")
    for match in RATED.finditer(masked):
        function, name = match.groups()
        if EXPORTED[name].kind == "gauge":
            problems.append(f"{function}() of the gauge {name}")
    for match in DERIVED.finditer(masked):
        function, name = match.groups()
        if EXPORTED[name].kind != "gauge":
            problems.append(f"{function}() of the {EXPORTED[name].kind} {name}")
    for match in QUANTILE.finditer(masked):
        argument = masked[match.end() - 1 : _close(masked, match.end() - 1) + 1]
        if not all(n.endswith("_bucket") for n in METRIC.findall(argument)):
            problems.append(f"histogram_quantile() over {argument!r}: not only _bucket series")
    for match in LABEL_QUERY.finditer(masked):
        name, label = match.groups()
        if label not in EXPORTED[name].labels | TARGET_LABELS:
            problems.append(f"label_values({name}, {label}): no such label")
    return problems


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text("utf-8"))
    return dashboard


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _alert_rules() -> list[dict[str, Any]]:
    (doc,) = _docs(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _expressions() -> Iterator[tuple[str, str]]:
    dashboard = _dashboard()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield f"dashboard {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            yield f"dashboard variable ${variable['name']}", text
    for rule in _alert_rules():
        yield f"alert {rule['alert']}", rule["expr"]


EXPRESSIONS = list(_expressions())


def test_the_registry_yields_the_worker_metrics() -> None:
    # The exported set is read from the registry, not restated here: a rename in
    # worker/metrics.py changes it, and the expressions below must follow.
    assert len(EXPORTED) >= 40
    for wrapper in _wrappers().values():
        assert _sample(wrapper) in EXPORTED
    assert len(LABEL_VALUES) >= 4  # the code's literal label values are still found
    assert len(EXPRESSIONS) >= 40


@pytest.mark.parametrize(("where", "expr"), EXPRESSIONS, ids=[w for w, _ in EXPRESSIONS])
def test_every_expression_uses_exported_metrics_and_labels(where: str, expr: str) -> None:
    assert promql_problems(expr) == [], f"{where}: {expr}"


def test_the_promql_check_catches_what_it_should() -> None:
    results = _sample(metrics.RESULTS)
    bad = {
        "cancel_worker_no_such_metric_total": "not exported",
        f"sum by (nope) (rate({results}[5m]))": "not on",
        f'rate({results}{{reason="no_such_reason"}}[5m])': "never sets",
        f'rate({results}{{nope="x"}}[5m])': "no label",
        f"rate({_sample(metrics.IN_FLIGHT)}[5m])": "of the gauge",
        f"deriv({results}[5m])": "of the counter",
        f"histogram_quantile(0.9, rate({metrics.COMMAND_SECONDS._name}_sum[5m]))": "bucket",
        "up == 0": "references no",
    }
    for expr, fragment in bad.items():
        problems = promql_problems(expr)
        assert any(fragment in p for p in problems), (expr, problems)
    good = f'sum by (le, route) (rate({_sample(metrics.EXCHANGE_SECONDS)}{{route="x"}}[5m]))'
    assert promql_problems(f"histogram_quantile(0.99, {good})") == []


def test_the_dashboard_covers_the_on_call_questions_from_a_datasource_variable() -> None:
    dashboard = _dashboard()
    variables = dashboard["templating"]["list"]
    (source,) = [v for v in variables if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    reference = "${" + source["name"] + "}"
    boxes: list[tuple[int, int, int, int]] = []
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == reference, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == reference, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        box = (grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"])
        for other in boxes:
            overlap = box[0] < other[2] and other[0] < box[2] and box[1] < other[3]
            assert not (overlap and other[1] < box[3]), f"{panel['title']} overlaps a panel"
        boxes.append(box)
    used = {
        name
        for where, expr in EXPRESSIONS
        if where.startswith("dashboard")
        for name in METRIC.findall(expr)
    }
    wanted = [
        metrics.RESULTS,
        metrics.EXCHANGE_SECONDS,
        metrics.CONSUMER_LAG,
        metrics.OLDEST_IN_FLIGHT,
        metrics.GOVERNOR_WEIGHT_USED,
        metrics.GOVERNOR_WEIGHT_LIMIT,
        metrics.GOVERNOR_WAITS,
        metrics.GOVERNOR_STOPS,
        metrics.BANNED_UNTIL,
        metrics.PAUSED_UNTIL,
        metrics.CLOCK_OFFSET,
        metrics.KAFKA_REACHABLE,
        metrics.EXCHANGE_REACHABLE,
        metrics.TRANSACTIONS,
        metrics.READY,
        metrics.HEALTHY,
    ]
    missing = [w._name for w in wanted if _sample(w) not in used]
    assert not missing, f"the dashboard does not show {missing}"


def test_the_oldest_in_flight_line_and_alert_sit_at_the_command_deadline() -> None:
    deadline_s = load_settings(_k8s_env()).default_deadline_ms / 1000
    oldest = _sample(metrics.OLDEST_IN_FLIGHT)
    (rule,) = [r for r in _alert_rules() if oldest in r["expr"]]
    threshold = re.search(rf"{oldest}\b[^>]*>\s*([0-9.]+)", rule["expr"])
    assert threshold is not None
    assert float(threshold.group(1)) == deadline_s
    panels = [
        p for p in _panels(_dashboard()) if any(oldest in t["expr"] for t in p.get("targets", []))
    ]
    steps = [
        s["value"] for p in panels for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]
    ]
    assert deadline_s in steps


REQUIRED_ALERTS = {
    "CancelWorkerDown",
    "CancelWorkerNotReady",
    "CancelWorkerKafkaUnreachable",
    "CancelWorkerConsumerLagGrowing",
    "CancelWorkerOldestInFlightOverDeadline",
    "CancelWorkerIpBanned",
    "CancelWorkerAuthFailures",
    "CancelWorkerOutcomeUnknown",
}


def test_every_alert_waits_names_its_severity_and_says_what_to_do() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    for rule in rules:
        where = rule["alert"]
        assert re.fullmatch(r"\d+[smhdwy]", str(rule["for"])), f"{where}: for {rule['for']!r}"
        assert rule["labels"]["severity"] in ("critical", "warning"), where
        for annotation in ("summary", "description", "runbook"):
            assert str(rule["annotations"].get(annotation, "")).strip(), f"{where}: {annotation}"
    auth = next(r for r in rules if r["alert"] == "CancelWorkerAuthFailures")["expr"]
    assert f'reason="{FailureReason.AUTH.value}"' in auth
    unknown = next(r for r in rules if r["alert"] == "CancelWorkerOutcomeUnknown")["expr"]
    assert f'reason="{FailureReason.OUTCOME_UNKNOWN.value}"' in unknown


def test_compose_publishes_every_port_on_loopback_only() -> None:
    """The stack's Kafka takes plain, unauthenticated clients and its operations endpoint
    needs no credentials: every published port is bound to 127.0.0.1."""
    published = [
        (name, str(port))
        for name, service in _compose()["services"].items()
        for port in service.get("ports", [])
    ]
    assert len(published) >= 3
    for name, port in published:
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_compose_reaches_its_simulator_over_http_only_as_allowed() -> None:
    settings = load_settings(_compose_env("worker"))
    assert settings.papi_url.startswith("http://sim:")
    assert settings.allow_insecure_exchange is True
    env = {k: v for k, v in _compose_env("worker").items() if not k.endswith("INSECURE_EXCHANGE")}
    with pytest.raises(SettingsError, match="PAPI_URL must be https"):
        load_settings(env)


def test_kafka_is_sasl_ssl_with_the_ca_from_its_secret() -> None:
    """The kit talks to Kafka over TLS with SCRAM: the password from the Kafka Secret as an
    environment variable (never in the ConfigMap), its CA certificate a file of the same
    Secret, mounted read-only where the ConfigMap's KAFKA_SSL_CAFILE points."""
    data = _k8s("ConfigMap")["data"]
    assert data[f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert data[f"{ENV_PREFIX}KAFKA_SASL_MECHANISM"].startswith("SCRAM-")
    assert f"{ENV_PREFIX}KAFKA_SASL_PASSWORD" not in data
    (password,) = [
        e for e in _worker_container()["env"] if e["name"] == f"{ENV_PREFIX}KAFKA_SASL_PASSWORD"
    ]
    assert password["valueFrom"]["secretKeyRef"]["name"] == KAFKA_SECRET_NAME
    cafile = PurePosixPath(data[f"{ENV_PREFIX}KAFKA_SSL_CAFILE"])
    volumes = {v["name"]: v["secret"] for v in _pod_spec()["volumes"] if "secret" in v}
    (name,) = [n for n, s in volumes.items() if s["secretName"] == KAFKA_SECRET_NAME]
    assert [i["path"] for i in volumes[name]["items"]] == [
        cafile.name
    ]  # the password is not a file
    (mount,) = [m for m in _worker_container()["volumeMounts"] if m["name"] == name]
    assert mount.get("readOnly") is True and PurePosixPath(mount["mountPath"]) == cafile.parent
    example = _k8s("Secret", EXAMPLE_KAFKA_SECRET_NAME, overlay=EXAMPLE)["stringData"]
    assert set(example) == {"password", cafile.name}
    assert all("REPLACE-ME" in v for v in example.values())
    trigger = _k8s_component_trigger()
    assert trigger["authenticationRef"]["name"] == KAFKA_SECRET_NAME


def _k8s_component_trigger() -> dict[str, Any]:
    docs = _docs(K8S / "components" / "keda" / "scaledobject.yaml")
    (scaled,) = [d for d in docs if d.get("kind") == "ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    return dict(trigger)


def test_only_the_metrics_scraper_may_reach_the_pods() -> None:
    """A NetworkPolicy selects the worker pods and lets in one thing: the monitoring
    namespace's Prometheus, on the metrics port (by the container port's name)."""
    (policy,) = [d for d in _manifests() if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == _pod_spec_labels_selector()
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"namespaceSelector", "podSelector"}  # both: one peer, not two
    (port,) = rule["ports"]
    names = [p["name"] for p in _worker_container()["ports"]]
    assert port["port"] in names and port["port"] == "metrics"


def _pod_spec_labels_selector() -> dict[str, str]:
    selector: dict[str, str] = _k8s("Deployment")["spec"]["selector"]["matchLabels"]
    return selector
