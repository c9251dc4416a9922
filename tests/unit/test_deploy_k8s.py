"""k8s/, offline: each overlay renders with kustomize, every object is valid against the Kubernetes
schema (strict: no unknown fields), every Baton container runs a real `baton` command and is given only
settings that command reads, and the deployment keeps its promises: probes, GPUs, drain time, /dev/shm,
security context, network policy, disruption budgets and autoscalers, and (gpu-tls) gRPC over mutual
TLS on every hop."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_checks import command_problem, environment_problems

from baton.services import settings_table
from baton.services.cli import build_parser

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ["cpu-demo", "gpu", "gpu-tls"]
GPU_OVERLAYS = {"gpu", "gpu-tls"}
TLS_OVERLAYS = {"gpu-tls"}  # overlays with components/grpc-tls
TLS_DIR = "/etc/baton/grpc-tls"
KUBERNETES_VERSION = "1.31.0"  # the schema validated against (native gRPC probes need >= 1.27)
BATON_UID = 10001
SERVICES = {"gateway", "router", "prefill", "decode"}
WORKERS = {"prefill", "decode"}
GRPC_PORTS = {"router": 50051, "prefill": 50061, "decode": 50071}
INTERNAL_PORTS = {"redis": [6379], "router": [50051], "prefill": [50061], "decode": [50071, 50081]}
FROM_BATON = [  # a rule admitting every Baton pod, and only those
    {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "baton"}}}
]
DRAIN_TIMEOUT_DEFAULTS = next(
    s.defaults for s in settings_table.settings(build_parser()) if s.variable == "BATON_DRAIN_TIMEOUT_S"
)  # per command (`baton settings`)

Obj = dict[str, Any]


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    """The objects `kubectl kustomize k8s/overlays/<overlay>` prints."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: it renders the kustomize overlays")
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(overlay: str) -> tuple[Obj, ...]:
    return render(overlay)


@dataclass(frozen=True)
class Container:
    """A container of a Deployment or StatefulSet, seen with the pod it runs in."""

    workload: Obj
    spec: Obj

    @property
    def pod(self) -> Obj:
        return self.workload["spec"]["template"]["spec"]

    @property
    def pod_labels(self) -> dict[str, str]:
        return self.workload["spec"]["template"]["metadata"]["labels"]

    @property
    def component(self) -> str:
        return self.pod_labels["app.kubernetes.io/component"]

    @property
    def argv(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]

    @property
    def is_baton(self) -> bool:
        """Runs the Baton image (any registry, any tag or digest)."""
        image = self.spec["image"].split("@")[0]
        name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        return name.rsplit("/", 1)[-1] == "baton"

    def mount(self, path: str) -> tuple[Obj, Obj] | None:
        """(volumeMount, volume) of what is mounted at `path`, if anything."""
        for mount in self.spec.get("volumeMounts", []):
            if mount["mountPath"] == path:
                return mount, next(v for v in self.pod.get("volumes", []) if v["name"] == mount["name"])
        return None


def containers(objects: tuple[Obj, ...]) -> Iterator[Container]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for spec in obj["spec"]["template"]["spec"]["containers"]:
                yield Container(obj, spec)


def baton_containers(objects: tuple[Obj, ...]) -> dict[str, Container]:
    """Baton's containers by component: gateway, router, prefill, decode."""
    found = [c for c in containers(objects) if c.is_baton]
    by_component = {c.component: c for c in found}
    assert len(by_component) == len(found), "two Baton containers share a component label"
    return by_component


def find(objects: tuple[Obj, ...], kind: str, name: str) -> Obj | None:
    return next((o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None)


def environment(container: Container, objects: tuple[Obj, ...]) -> dict[str, str | None]:
    """Every variable the container gets: `env` (None where it comes from a reference) plus each key of
    the ConfigMaps and Secrets it loads with `envFrom` (those must be in the render)."""
    values: dict[str, str | None] = {}
    for source in container.spec.get("envFrom", []):
        ref_kind, ref = (
            ("ConfigMap", source["configMapRef"])
            if "configMapRef" in source
            else ("Secret", source["secretRef"])
        )
        loaded = find(objects, ref_kind, ref["name"])
        assert loaded is not None, f"{container.component}: envFrom {ref_kind} {ref['name']} is not rendered"
        data = {**loaded.get("data", {}), **loaded.get("stringData", {})}
        values.update({source.get("prefix", "") + key: value for key, value in data.items()})
    for var in container.spec.get("env", []):
        values[var["name"]] = var.get("value")
    return values


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) matches `labels`."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


# -- the render is valid Kubernetes --------------------------------------------------------------------


def test_every_object_is_valid_against_the_kubernetes_schema(objects: tuple[Obj, ...]) -> None:
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        problem = None
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problem = exc.message  # only the message: the exception would print the whole schema
        assert problem is None, f"{where}: {problem}"
        assert "namespace" not in obj["metadata"], f"{where} names a namespace"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "baton", where


def test_references_to_generated_objects_resolve(overlay: str, objects: tuple[Obj, ...]) -> None:
    """Secrets are the user's in gpu (none rendered) and generated in cpu-demo; either way the Redis
    password every container reads is the one Redis requires, and the prefill and decode workers
    read one KV transfer secret, which nothing optional leaves unset."""
    secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    password_refs, kv_secret_refs = set(), {}
    for container in containers(objects):
        for var in container.spec.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None and var["name"] in ("BATON_REDIS_PASSWORD", "REDIS_PASSWORD"):
                password_refs.add((ref["name"], ref["key"]))
            if var["name"] == "BATON_KV_TRANSFER_SECRET":
                assert ref is not None and not ref.get("optional", False), container.component
                kv_secret_refs[container.component] = (ref["name"], ref["key"])
    assert len(password_refs) == 1, password_refs
    ((secret_name, _key),) = password_refs
    assert set(kv_secret_refs) == WORKERS and len(set(kv_secret_refs.values())) == 1, kv_secret_refs
    ((kv_secret_name, _kv_key),) = set(kv_secret_refs.values())
    if overlay in GPU_OVERLAYS:
        assert secrets == set() and (secret_name, kv_secret_name) == ("baton-redis", "baton-kv-transfer")
    else:
        assert {secret_name, kv_secret_name} <= secrets


# -- Baton's containers run real commands with their own settings ---------------------------------------


def test_every_service_runs_its_baton_command_with_only_its_settings(objects: tuple[Obj, ...]) -> None:
    batons = baton_containers(objects)
    assert set(batons) == SERVICES
    for component, container in batons.items():
        assert container.argv[:2] == ["baton", component]
        assert command_problem(container.argv) is None
        assert environment_problems(container.argv, set(environment(container, objects))) == []
        # Service links would add BATON_<SERVICE>_PORT & co., which no check above sees.
        assert container.pod["enableServiceLinks"] is False, component


def test_services_find_each_other_by_name_in_their_own_namespace(objects: tuple[Obj, ...]) -> None:
    batons = baton_containers(objects)
    gateway_env = environment(batons["gateway"], objects)
    # every router replica by its stable name, as many as the StatefulSet runs
    routers = find(objects, "StatefulSet", "baton-router")
    assert routers is not None
    pods = routers["spec"]["serviceName"]
    replicas = [f"baton-router-{i}.{pods}:50051" for i in range(routers["spec"]["replicas"])]
    assert gateway_env["BATON_ROUTER"].split(",") == replicas and len(replicas) >= 2
    headless = find(objects, "Service", pods)
    assert headless is not None and headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # names resolve before readiness
    assert find(objects, "Service", "baton-router") is not None  # for gRPC clients: any replica
    for component in ("router", *WORKERS):
        env = environment(batons[component], objects)
        assert env["BATON_REDIS_URL"] == "redis://baton-redis:6379/0", component
        assert env["BATON_PORT"] == str(GRPC_PORTS[component]), component
        assert "BATON_REDIS_PASSWORD" in env, component
    redis = find(objects, "Service", "baton-redis")
    assert redis is not None and redis["spec"]["clusterIP"] == "None"
    for component in WORKERS:
        advertise = next(v for v in batons[component].spec["env"] if v["name"] == "BATON_ADVERTISE_HOST")
        assert advertise["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert environment(batons["decode"], objects)["BATON_TRANSFER_PORT"] == "50081"


# -- probes, drain, /dev/shm, resources, security --------------------------------------------------------


def test_every_container_has_startup_readiness_and_liveness_probes(objects: tuple[Obj, ...]) -> None:
    """gRPC services: the kubelet's grpc.health.v1 probe on their port, or, where they serve TLS (which
    that probe cannot speak), `baton probe` on it with the TLS settings in its environment."""
    for container in containers(objects):
        component = container.component
        probes: dict[str, Obj] = {
            kind: container.spec.get(f"{kind}Probe") or {} for kind in ("startup", "readiness", "liveness")
        }
        assert all(probes.values()), f"{component}: {probes}"
        if component == "redis":
            continue
        if component == "gateway":
            assert probes["startup"]["httpGet"]["path"] == "/health"
            assert probes["liveness"]["httpGet"]["path"] == "/health"
            assert probes["readiness"]["httpGet"]["path"] == "/ready"
        else:  # grpc.health.v1 on the port the service listens on
            tls = "BATON_GRPC_TLS_CA" in environment(container, objects)
            for probe in probes.values():
                if not tls:
                    assert probe["grpc"]["port"] == GRPC_PORTS[component], component
                    continue
                argv = probe["exec"]["command"]
                assert "grpc" not in probe and command_problem(argv) is None, component
                assert argv == ["baton", "probe", f"127.0.0.1:{GRPC_PORTS[component]}"], component


def test_workers_have_time_to_load_and_every_service_to_drain(objects: tuple[Obj, ...]) -> None:
    containers = baton_containers(objects)
    for component in WORKERS:
        startup = containers[component].spec["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, component
    for component, container in containers.items():
        drain = environment(container, objects).get("BATON_DRAIN_TIMEOUT_S")
        drain_s = float(drain) if drain is not None else DRAIN_TIMEOUT_DEFAULTS[component]
        pre_stop = container.spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert container.pod["terminationGracePeriodSeconds"] > pause_s + drain_s, component


def test_workers_mount_memory_backed_dev_shm(objects: tuple[Obj, ...]) -> None:
    for component in WORKERS:
        found = baton_containers(objects)[component].mount("/dev/shm")
        assert found is not None, component
        _mount, volume = found
        assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"], component


def test_containers_are_unprivileged_and_bounded(objects: tuple[Obj, ...]) -> None:
    for container in containers(objects):
        where = f"{container.workload['metadata']['name']}/{container.spec['name']}"
        context = {**container.pod.get("securityContext", {}), **container.spec["securityContext"]}
        assert context["runAsNonRoot"] is True, where
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["capabilities"]["drop"] == ["ALL"], where
        assert context["readOnlyRootFilesystem"] is True, where
        if container.is_baton:
            assert (context["runAsUser"], context["runAsGroup"]) == (BATON_UID, BATON_UID), where
            tmp = container.mount("/tmp")
            assert tmp is not None and "emptyDir" in tmp[1], f"{where}: /tmp is not writable"
        resources = container.spec["resources"]
        for name in ("cpu", "memory"):
            assert name in resources["requests"] and name in resources["limits"], f"{where}: {name}"


def test_gpu_workers_get_one_gpu_and_the_model_volume(overlay: str, objects: tuple[Obj, ...]) -> None:
    batons = baton_containers(objects)
    for component, container in batons.items():
        resources = container.spec["resources"]
        gpus = (resources["requests"].get("nvidia.com/gpu"), resources["limits"].get("nvidia.com/gpu"))
        env = environment(container, objects)
        if overlay in GPU_OVERLAYS and component in WORKERS:
            assert gpus == (1, 1), component
            assert env["BATON_DEVICE"] == "cuda" and env["BATON_DTYPE"] in ("bfloat16", "auto")
        else:
            assert gpus == (None, None), component
        if overlay in GPU_OVERLAYS:  # every service reads the model (tokenizer or weights) from the claim
            found = container.mount("/models")
            assert found is not None, component
            mount, volume = found
            assert mount["readOnly"] is True, component
            assert volume["persistentVolumeClaim"] == {"claimName": "baton-models", "readOnly": True}
            assert (env["BATON_MODEL"] or "").startswith("/models/"), component
        else:  # cpu-demo: the demo model baked into the image
            assert "BATON_MODEL" not in env, component
            if component != "gateway":
                assert env["BATON_DEVICE"] == "cpu", component


# -- network policy, disruption budgets, autoscalers ------------------------------------------------------


def ingress_rules(objects: tuple[Obj, ...], labels: dict[str, str]) -> list[Obj]:
    """The ingress rules of every NetworkPolicy that selects pods labelled `labels`."""
    return [
        rule
        for policy in objects
        if policy["kind"] == "NetworkPolicy" and selects(policy["spec"]["podSelector"], labels)
        for rule in policy["spec"].get("ingress", [])
    ]


def test_only_baton_pods_reach_redis_the_router_and_the_workers(objects: tuple[Obj, ...]) -> None:
    pods = {c.component: c.pod_labels for c in containers(objects)}
    for component, ports in INTERNAL_PORTS.items():
        rules = ingress_rules(objects, pods[component])
        admitted = {p["port"] for rule in rules if rule.get("from") == FROM_BATON for p in rule["ports"]}
        assert set(ports) <= admitted, f"{component}: {sorted(set(ports) - admitted)} not admitted"
        for rule in rules:  # every rule for this pod names Baton's pods as its only sources
            assert rule.get("from"), f"{component}: a rule admits any source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{component}: {peer}"
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/part-of"] == "baton"
    open_to_clients = [{"protocol": "TCP", "port": 8000}]
    rules = ingress_rules(objects, pods["gateway"])
    assert any("from" not in rule and rule["ports"] == open_to_clients for rule in rules)


def test_disruption_budgets_and_autoscalers_cover_the_services(objects: tuple[Obj, ...]) -> None:
    pods = {c.component: c.pod_labels for c in baton_containers(objects).values()}
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for component, labels in pods.items():
        assert any(selects(b["spec"]["selector"], labels) for b in budgets), f"{component}: no PDB"
    scaled = {
        o["spec"]["scaleTargetRef"]["name"]
        for o in objects
        if o["kind"] == "HorizontalPodAutoscaler" and o["apiVersion"] == "autoscaling/v2"
    }
    workloads = {c.component: c.workload["metadata"]["name"] for c in baton_containers(objects).values()}
    assert {workloads[component] for component in WORKERS} <= scaled


def test_cpu_demo_runs_one_of_each() -> None:
    """...but two routers: the gateway's settings name both."""
    objects = render("cpu-demo")
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            want = 2 if obj["metadata"]["name"] == "baton-router" else 1
            assert obj["spec"].get("replicas", 1) == want, obj["metadata"]["name"]
        if obj["kind"] == "HorizontalPodAutoscaler":
            assert obj["spec"]["minReplicas"] == 1, obj["metadata"]["name"]


def test_grpc_tls_runs_every_hop_on_the_secret_you_create(overlay: str, objects: tuple[Obj, ...]) -> None:
    """gpu-tls: all four services get the files of the Secret `baton-grpc-tls` (cert-manager's keys,
    none rendered: it is yours) and the one server name; the servers require client certificates."""
    batons = baton_containers(objects)
    if overlay not in TLS_OVERLAYS:
        for container in batons.values():
            assert not any(v.startswith("BATON_GRPC_TLS_") for v in environment(container, objects))
        return
    assert find(objects, "Secret", "baton-grpc-tls") is None
    for component, container in batons.items():
        env = environment(container, objects)
        found = container.mount(TLS_DIR)
        assert found is not None, component
        mount, volume = found
        assert mount["readOnly"] is True and volume["secret"]["secretName"] == "baton-grpc-tls", component
        assert env["BATON_GRPC_TLS_CERT"] == f"{TLS_DIR}/tls.crt", component
        assert env["BATON_GRPC_TLS_KEY"] == f"{TLS_DIR}/tls.key", component
        assert env["BATON_GRPC_TLS_CA"] == f"{TLS_DIR}/ca.crt", component
        assert env["BATON_GRPC_TLS_SERVER_NAME"] == "baton-grpc", component
        assert env.get("BATON_GRPC_TLS_CLIENT_AUTH") == (None if component == "gateway" else "true")
