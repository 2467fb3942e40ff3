"""Deployment files under docker/, checked without Docker or a cluster.

Every YAML file is parsed, and the fields that make a deployment work or fail are
cross-checked against what they deploy: `RERANKD_*` names against the server's `FLAGS`,
build targets against the Dockerfile's stages, probe ports against the ConfigMap and the
container ports, the Service's selector against the pod labels, the HPA's target against
the Deployment, the kustomization against the files that exist, and the Dockerfile's
install step and COPY sources against the repository.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from rerankd.server.config import FLAGS
from rerankd.v1 import reranker_pb2

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# `RERANKD_*` names the deploy files may set beyond the `rerankd serve` flags. Kept small
# and explicit: RERANKD_CACHE is read by the engine (not a flag); RERANKD_HTTP_PORT is the
# HTTP API's flag, allowed even before it lands in FLAGS. A test below checks each is
# really read somewhere in src/rerankd.
EXTRA_ENV = frozenset({"RERANKD_CACHE", "RERANKD_HTTP_PORT"})
RERANKD_ENV = frozenset(f.env for f in FLAGS) | EXTRA_ENV

RERANKER_SERVICE = reranker_pb2.DESCRIPTOR.services_by_name["Reranker"].full_name
GRPC_PORT = 50051
HTTP_PORT = 8080

SIDECAR = "rerankd"
CACHE_INIT = "rerankd-cache-init"
BASES = {"qdrant": "qdrant", "milvus": "milvus", "weaviate": "weaviate"}  # file -> DB service
OVERRIDES = ("gpu", "models")
EFFECTIVE = [(b,) for b in BASES] + [(b, o) for b in BASES for o in OVERRIDES]
EFFECTIVE_IDS = ["+".join(files) for files in EFFECTIVE]

K8S_KINDS = {
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


# ---------------------------------------------------------------- helpers


def _yaml_files() -> list[Path]:
    return sorted(p for p in DOCKER.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.cache
def _load(path: Path) -> tuple[Any, ...]:
    with path.open(encoding="utf-8") as fh:
        return tuple(yaml.load_all(fh, Loader=_Loader))


def _compose_file(name: str) -> dict[str, Any]:
    (doc,) = _load(DOCKER / f"compose.{name}.yaml")
    return doc


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge, as far as these checks need: mappings by key, sequences appended."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            out[key] = _merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(override, list):
        return copy.deepcopy(base) + copy.deepcopy(override)
    return copy.deepcopy(override)


@functools.cache
def _effective(files: tuple[str, ...]) -> dict[str, Any]:
    """`docker compose -f compose.A.yaml -f compose.B.yaml` as one mapping."""
    merged: dict[str, Any] = {}
    for name in files:
        merged = _merge(merged, _compose_file(name))
    return merged


def _expand(value: Any) -> str:
    """A value as compose would interpolate it with nothing set: `${X:-d}` -> d."""
    text = str(value)
    text = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)
    text = re.sub(r"\$\{\w+:?\?[^}]*\}", "SET", text)  # required: compose refuses if unset
    return text.replace("$$", "$")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: _expand(v) for k, v in env.items()}


def _seconds(duration: str) -> float:
    """A compose duration ("1m30s", "300s") in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    return sum(float(n) * units[u] for n, u in parts)


def _one_shot_jobs(cfg: dict[str, Any]) -> set[str]:
    """Services something waits to *finish* (service_completed_successfully)."""
    return {
        target
        for svc in cfg["services"].values()
        for target, cond in (svc.get("depends_on") or {}).items()
        if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"
    }


def _short_port(spec: str) -> tuple[str, str, str]:
    """Split a short port spec, "127.0.0.1:8081:8080/tcp" -> (host_ip, published, target)."""
    parts = spec.split("/", 1)[0].split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return "", parts[0], parts[1]
    return "", "", parts[0]


def _dockerfile_lines() -> list[str]:
    """Logical instructions: comments dropped, backslash continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def _dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions after FROM (unnamed stages get their index)."""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in _dockerfile_lines():
        m = re.match(r"^FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?\s*$", line, re.IGNORECASE)
        if m:
            current = stages.setdefault(m.group(2) or str(len(stages)), [])
        elif current is not None:
            current.append(line)
    return stages


def _instructions(keyword: str) -> list[str]:
    kw = keyword.upper() + " "
    return [line[len(kw) :] for line in _dockerfile_lines() if line.upper().startswith(kw)]


def _copy_sources(args: str) -> list[str] | None:
    """The sources of a `COPY` from the build context; None for `COPY --from=...`."""
    m = re.match(r"^((?:--\S+\s+)*)(.*)$", args.strip())
    assert m is not None
    flags, body = m.group(1).split(), m.group(2)
    if any(flag.startswith("--from") for flag in flags):
        return None
    words = json.loads(body) if body.startswith("[") else shlex.split(body)
    return words[:-1]


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in _load(path)
        if doc is not None
    ]


def _k8s(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _k8s_docs() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in docker/k8s, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    return _k8s("Deployment")["spec"]["template"]["spec"]


def _sidecar_container() -> dict[str, Any]:
    (container,) = [c for c in _pod_spec()["containers"] if c["name"] == SIDECAR]
    return container


def _configmap_data() -> dict[str, Any]:
    return _k8s("ConfigMap")["data"]


def _cpu(quantity: Any) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _bytes(quantity: Any) -> float:
    text = str(quantity)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# ---------------------------------------------------------------- every YAML file


def test_the_deploy_files_exist() -> None:
    names = {str(p.relative_to(DOCKER)) for p in _yaml_files()}
    expected = {f"compose.{n}.yaml" for n in (*BASES, *OVERRIDES)} | {
        f"k8s/{n}.yaml"
        for n in ("deployment", "service", "hpa", "configmap", "pdb", "kustomization")
    }
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DOCKER)))
def test_every_yaml_file_parses_to_mappings(path: Path) -> None:
    docs = [doc for doc in _load(path) if doc is not None]
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs), path


def test_every_compose_file_is_checked_here() -> None:
    """A new compose file must be added to BASES or OVERRIDES, or it escapes these tests."""
    found = {p.name for p in DOCKER.glob("compose*.y*ml")}
    assert found == {f"compose.{n}.yaml" for n in (*BASES, *OVERRIDES)}


def test_allow_listed_env_names_are_read_by_rerankd() -> None:
    """The allow-list is no loophole: each name is a flag by now or read by the code."""
    flags = {f.env for f in FLAGS}
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "src").rglob("*.py"))
    for name in EXTRA_ENV:
        assert name in flags or name in source, f"{name}: nothing in src/rerankd reads it"


# ---------------------------------------------------------------- compose


@pytest.mark.parametrize("files", EFFECTIVE, ids=EFFECTIVE_IDS)
def test_compose_every_service_has_an_image_or_a_build(files: tuple[str, ...]) -> None:
    services = _effective(files)["services"]
    assert {SIDECAR, CACHE_INIT, BASES[files[0]]} <= set(services)
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name}: neither image nor build"


@pytest.mark.parametrize("files", EFFECTIVE, ids=EFFECTIVE_IDS)
def test_compose_sidecar_builds_a_real_dockerfile_target(files: tuple[str, ...]) -> None:
    services = _effective(files)["services"]
    stages = _dockerfile_stages()
    expected = "cuda" if "gpu" in files else "cpu"
    for name in (SIDECAR, CACHE_INIT):
        build = services[name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO, f"{name}: context {context} is not the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages, f"{name}: no stage {build['target']!r} in Dockerfile"
        assert build["target"] == expected
        assert services[name]["image"] == f"rerankd:{expected}"
    # The init job must run the sidecar's image: the volume is seeded from it.
    assert services[CACHE_INIT]["build"] == services[SIDECAR]["build"]


@pytest.mark.parametrize("files", EFFECTIVE, ids=EFFECTIVE_IDS)
def test_compose_ports_are_loopback_only_and_do_not_clash(files: tuple[str, ...]) -> None:
    published: list[str] = []
    targets: dict[str, set[str]] = {}
    for name, svc in _effective(files)["services"].items():
        for spec in svc.get("ports", []):
            if isinstance(spec, dict):
                host_ip, pub, target = (
                    spec.get("host_ip", ""),
                    str(spec.get("published", "")),
                    str(spec["target"]),
                )
            else:
                host_ip, pub, target = _short_port(str(spec))
            assert host_ip == "127.0.0.1", f"{name}: {spec!r} is not bound to 127.0.0.1"
            assert pub, f"{name}: {spec!r} publishes a random host port"
            published.append(pub)
            targets.setdefault(name, set()).add(target)
    assert len(published) == len(set(published)), f"host port used twice: {sorted(published)}"
    sidecar_env = _env(_effective(files)["services"][SIDECAR])
    assert sidecar_env["RERANKD_PORT"] in targets[SIDECAR]
    assert sidecar_env["RERANKD_HTTP_PORT"] in targets[SIDECAR]


@pytest.mark.parametrize("files", EFFECTIVE, ids=EFFECTIVE_IDS)
def test_compose_long_running_services_have_healthchecks(files: tuple[str, ...]) -> None:
    cfg = _effective(files)
    jobs = _one_shot_jobs(cfg)
    assert jobs == {CACHE_INIT}
    for name, svc in cfg["services"].items():
        if name in jobs:
            assert svc.get("restart", "no") == "no", f"{name}: a one-shot job must not restart"
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        if isinstance(check["test"], list):  # ["NONE"] would switch the image's check off
            assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
    db = cfg["services"][BASES[files[0]]]
    assert "healthcheck" in db
    sidecar = cfg["services"][SIDECAR]["healthcheck"]
    probe = "\n".join(sidecar["test"])
    assert "HealthStub" in probe and f'"{RERANKER_SERVICE}"' in probe
    assert "RERANKD_PORT" in probe  # follows the configured port, not a copy of it
    assert _seconds(sidecar["start_period"]) >= 120, "model loading needs a long start_period"


@pytest.mark.parametrize("files", EFFECTIVE, ids=EFFECTIVE_IDS)
def test_compose_sidecar_env_names_are_real_settings(files: tuple[str, ...]) -> None:
    services = _effective(files)["services"]
    for name in (SIDECAR, CACHE_INIT):
        unknown = {k for k in _env(services[name]) if k.startswith("RERANKD_")} - RERANKD_ENV
        assert not unknown, f"{name}: rerankd reads no {sorted(unknown)}"
    env = _env(services[SIDECAR])
    assert env["RERANKD_HOST"] == "0.0.0.0", "loopback inside a container is unreachable"
    assert env["RERANKD_MODEL"]


@pytest.mark.parametrize("files", EFFECTIVE, ids=EFFECTIVE_IDS)
def test_compose_depends_on_waits_for_a_condition(files: tuple[str, ...]) -> None:
    services = _effective(files)["services"]
    allowed = {"service_healthy", "service_completed_successfully"}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: short depends_on waits only for a start"
        for target, cond in deps.items():
            assert target in services, f"{name} depends on unknown {target}"
            assert cond.get("condition") in allowed, f"{name} -> {target}: {cond}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} can never be healthy"
    assert services[SIDECAR]["depends_on"][CACHE_INIT]["condition"] == (
        "service_completed_successfully"
    )
    if files[0] == "milvus":
        assert set(services["milvus"]["depends_on"]) == {"etcd", "minio"}


@pytest.mark.parametrize("files", EFFECTIVE, ids=EFFECTIVE_IDS)
def test_compose_cache_volume_is_shared_and_handed_to_the_sidecar(files: tuple[str, ...]) -> None:
    cfg = _effective(files)
    sidecar, init = cfg["services"][SIDECAR], cfg["services"][CACHE_INIT]
    cache = _env(sidecar)["RERANKD_CACHE"]
    mounts = {}
    for spec in sidecar["volumes"]:
        if isinstance(spec, str):
            source, target = spec.split(":")[:2]
            mounts[target] = source
    assert cache in mounts, f"RERANKD_CACHE={cache} is not a volume: lost on every restart"
    volume = mounts[cache]
    assert volume in (cfg.get("volumes") or {}), f"named volume {volume} is not declared"
    assert f"{volume}:{cache}" in init["volumes"]
    uid = str(sidecar["user"]).split(":")[0]
    assert uid != "0", "the sidecar runs as root"
    assert "chown" in init["entrypoint"] and cache in init["entrypoint"]
    assert any(arg.split(":")[0] == uid for arg in init["entrypoint"]), "chown to another uid"


@pytest.mark.parametrize("files", EFFECTIVE, ids=EFFECTIVE_IDS)
def test_compose_stop_grace_outlasts_the_drain(files: tuple[str, ...]) -> None:
    sidecar = _effective(files)["services"][SIDECAR]
    assert _seconds(sidecar["stop_grace_period"]) > float(_env(sidecar)["RERANKD_GRACE"])


def test_compose_sidecar_is_the_same_in_every_file() -> None:
    """Defined once per file (no `include`), so the overrides fit all three: keep in step."""
    first, *rest = BASES
    for name in (SIDECAR, CACHE_INIT):
        for other in rest:
            assert _compose_file(other)["services"][name] == _compose_file(first)["services"][name]
    names = [_compose_file(b).get("name") for b in BASES]
    assert all(names) and len(set(names)) == len(names), f"project names {names}"


@pytest.mark.parametrize("override", OVERRIDES)
def test_compose_overrides_touch_only_existing_services(override: str) -> None:
    for base in BASES:
        missing = set(_compose_file(override)["services"]) - set(_compose_file(base)["services"])
        assert not missing, f"compose.{override}.yaml adds {missing} to compose.{base}.yaml"


def test_compose_gpu_override_reserves_a_gpu() -> None:
    sidecar = _compose_file("gpu")["services"][SIDECAR]
    devices = sidecar["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) and d.get("driver") == "nvidia" for d in devices)


def test_compose_models_override_mounts_models_read_only() -> None:
    sidecar = _compose_file("models")["services"][SIDECAR]
    assert _env(sidecar)["RERANKD_MODEL"].startswith("/models/")
    (mount,) = [v for v in sidecar["volumes"] if v["target"] == "/models"]
    assert mount["type"] == "bind" and mount["read_only"] is True


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("item", _k8s_docs(), ids=lambda item: f"{item[0]}:{item[1].get('kind')}")
def test_k8s_docs_have_a_known_api_version_and_kind(item: tuple[str, dict[str, Any]]) -> None:
    _, doc = item
    assert (doc.get("apiVersion"), doc.get("kind")) in K8S_KINDS
    if doc["kind"] != "Kustomization":
        assert DNS_1123_LABEL.match(doc["metadata"]["name"])


def test_k8s_deployment_exposes_grpc_and_http_ports() -> None:
    ports = {p["name"]: p["containerPort"] for p in _sidecar_container()["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT}
    data = _configmap_data()
    assert int(data["RERANKD_PORT"]) == ports["grpc"]
    assert int(data["RERANKD_HTTP_PORT"]) == ports["http"]


def test_k8s_probes_are_native_grpc_probes_on_the_grpc_port() -> None:
    container = _sidecar_container()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert not {"httpGet", "exec", "tcpSocket"} & set(probe), kind
        assert probe["grpc"]["port"] == GRPC_PORT, kind  # grpc probes take no port names
        assert probe["grpc"].get("service", "") in ("", RERANKER_SERVICE), kind
    assert container["readinessProbe"]["grpc"]["service"] == RERANKER_SERVICE
    startup = container["startupProbe"]  # Kubernetes' defaults: period 10 s, threshold 3
    period, failures = startup.get("periodSeconds", 10), startup.get("failureThreshold", 3)
    budget = startup.get("initialDelaySeconds", 0) + period * failures
    assert budget >= 300, f"startupProbe gives model loading only {budget}s"


def test_k8s_termination_grace_outlasts_the_drain() -> None:
    grace = float(_configmap_data()["RERANKD_GRACE"])
    assert _pod_spec()["terminationGracePeriodSeconds"] > grace


def test_k8s_resources_fit_the_thread_count() -> None:
    resources = _sidecar_container()["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"], key
    assert _cpu(resources["requests"]["cpu"]) <= _cpu(resources["limits"]["cpu"])
    assert _bytes(resources["requests"]["memory"]) <= _bytes(resources["limits"]["memory"])
    assert _bytes(resources["requests"]["memory"]) >= 2**30, "a GiB at least for the models"
    threads = int(_configmap_data()["RERANKD_THREADS"])
    assert 0 < threads <= _cpu(resources["limits"]["cpu"]), "threads beyond the CPU limit"


def test_k8s_pod_is_non_root_with_a_read_only_root_and_writable_cache() -> None:
    pod = _pod_spec()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["enableServiceLinks"] is False, "a Service named rerankd would set RERANKD_PORT"
    for container in pod["containers"] + pod.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in _sidecar_container()["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in _sidecar_container().get("env", [])}
    assert mounts.get(env["RERANKD_CACHE"]) in empty_dirs, "RERANKD_CACHE is not writable"
    assert mounts.get("/tmp") in empty_dirs


def test_k8s_deployment_reads_the_configmap_and_seeds_from_its_own_image() -> None:
    container = _sidecar_container()
    refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert refs == [_k8s("ConfigMap")["metadata"]["name"]]
    for name in (e["name"] for e in container.get("env", [])):
        assert not name.startswith("RERANKD_") or name in RERANKD_ENV, name
    for init in _pod_spec().get("initContainers", []):
        assert init["image"] == container["image"], f"{init['name']} runs another image"


def test_k8s_deployment_selector_matches_its_pods() -> None:
    spec = _k8s("Deployment")["spec"]
    selector = spec["selector"]["matchLabels"]
    assert selector and selector.items() <= spec["template"]["metadata"]["labels"].items()


def test_k8s_service_is_headless_and_selects_the_pods() -> None:
    spec = _k8s("Service")["spec"]
    assert spec["clusterIP"] == "None", "a ClusterIP would pin each gRPC client to one pod"
    assert not spec.get("publishNotReadyAddresses", False)
    labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"] and spec["selector"].items() <= labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _sidecar_container()["ports"]}
    for port in spec["ports"]:
        target = port.get("targetPort", port["port"])
        assert target in container_ports or target in container_ports.values(), port
    assert GRPC_PORT in {p["port"] for p in spec["ports"]}


def test_k8s_hpa_scales_the_deployment() -> None:
    hpa = _k8s("HorizontalPodAutoscaler")["spec"]
    deployment = _k8s("Deployment")
    ref = hpa["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
    assert ref["name"] == deployment["metadata"]["name"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    cpu = [m for m in hpa["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    replicas = deployment["spec"].get("replicas", hpa["minReplicas"])
    assert hpa["minReplicas"] <= replicas <= hpa["maxReplicas"]


def test_k8s_pdb_selects_the_pods() -> None:
    selector = _k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()


def test_k8s_configmap_keys_are_real_settings_with_string_values() -> None:
    data = _configmap_data()
    assert set(data) <= RERANKD_ENV, sorted(set(data) - RERANKD_ENV)
    bad = {k: v for k, v in data.items() if not isinstance(v, str)}
    assert not bad, f"ConfigMap values must be strings (quote them): {bad}"
    assert data["RERANKD_HOST"] == "0.0.0.0"


def test_k8s_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _load(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization lists missing {resource}"
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == manifests, "a manifest is not applied by `kubectl apply -k`"
    images = {c["image"].split(":")[0] for c in _pod_spec()["containers"]}
    assert {i["name"] for i in kustomization.get("images", [])} <= images


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_has_the_cpu_and_cuda_targets() -> None:
    assert {"cpu", "cuda"} <= set(_dockerfile_stages())


def test_dockerfile_installs_with_the_tested_setup_script() -> None:
    stages = _dockerfile_stages()
    for target in ("cpu", "cuda"):
        runs = [line for line in stages[target] if line.upper().startswith("RUN ")]
        assert any("scripts/setup.sh" in run for run in runs), f"{target}: no scripts/setup.sh"
    for run in _instructions("RUN"):
        assert "pip install" not in run, f"installs outside scripts/setup.sh: {run}"
    setup = REPO / "scripts" / "setup.sh"
    assert setup.is_file() and os.access(setup, os.X_OK), "the image runs it directly"


def test_dockerfile_copy_sources_exist_and_reach_the_build() -> None:
    ignore = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "the dockerignore is an allow-list"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for name in allowed:
        assert (REPO / name).exists(), f"dockerignore lets in missing {name}"
    copied = 0
    for args in _instructions("COPY"):
        sources = _copy_sources(args)
        if sources is None:
            continue
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert Path(source).parts[0] in allowed, f"COPY {source}: excluded by dockerignore"
            copied += 1
    assert copied, "no COPY from the build context found"
