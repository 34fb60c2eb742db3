"""deploy/k8s/overlays/production and production-keda: N GPU replicas of the server.

What these overlays must say beyond the generic checks of test_manifests.py (which render and
validate them too, strictly, against both Kubernetes versions): several replicas held by exactly
one autoscaler (an HPA on queue depth per pod, or a KEDA ScaledObject on the same metric, never
both), a PodDisruptionBudget and topology spread over exactly the server pods, a drain that lets
the longest job finish, artifacts in an S3 bucket instead of a volume, Redis for coordination,
each pod's replica id from the downward API, and a weights cache whose time budget fits the
rollout deadline. fetch_models.py (the cache's init container) runs here against moto's S3.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from _needs import needs_module

from .test_manifests import (DEPLOY, K8S, K8S_VERSIONS, MIN_STARTUP_BUDGET_S, PRODUCTION_RENDERS,
                             RENDERS, ROOT, SERVER_CONTAINER, SERVER_DEPLOYMENT, _all, _flag, _flags,
                             _mount_source, _one, _render, _run_kustomize, _selects, _server,
                             _validate)

COMPONENT = K8S / "components" / "production"
FETCH_SCRIPT = COMPONENT / "fetch_models.py"
ADAPTER_VALUES = DEPLOY / "monitoring" / "prometheus-adapter-values.yaml"
QUEUE_METRIC = "adjointdpm_jobs_queued"
AUTOSCALERS = {"overlays/production": "HorizontalPodAutoscaler",
               "overlays/production-keda": "ScaledObject"}


@pytest.fixture(params=PRODUCTION_RENDERS)
def prod(request) -> tuple[dict, ...]:
    return _render(request.param)


def _pod(dep) -> dict:
    return dep["spec"]["template"]["spec"]


def _server_labels(docs) -> dict:
    return _one(docs, "Deployment", SERVER_DEPLOYMENT)["spec"]["template"]["metadata"]["labels"]


def _workload_labels(docs) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["metadata"]["labels"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")}


def _autoscaler(docs):
    """The one object that scales the server: (kind, doc)."""
    found = _all(docs, "HorizontalPodAutoscaler") + _all(docs, "ScaledObject")
    assert len(found) == 1, f"exactly one autoscaler, found {[d['kind'] for d in found]}"
    return found[0]["kind"], found[0]


def _bounds(kind, scaler) -> tuple[int, int]:
    spec = scaler["spec"]
    if kind == "HorizontalPodAutoscaler":
        return spec.get("minReplicas", 1), spec["maxReplicas"]
    return spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)


def _behavior(kind, scaler) -> dict:
    if kind == "HorizontalPodAutoscaler":
        return scaler["spec"].get("behavior", {})
    return scaler["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}) \
        .get("behavior", {})


def _per_pod_targets(kind, scaler) -> dict[str, float]:
    """{metric name: per-pod target} of an HPA's Pods metrics or a ScaledObject's prometheus
    triggers (AverageValue: KEDA divides the query's fleet total by the pods)."""
    out = {}
    if kind == "HorizontalPodAutoscaler":
        for m in scaler["spec"]["metrics"]:
            assert m["type"] == "Pods", m
            assert m["pods"]["target"]["type"] == "AverageValue", m
            out[m["pods"]["metric"]["name"]] = float(m["pods"]["target"]["averageValue"])
        return out
    for t in scaler["spec"]["triggers"]:
        assert t["type"] == "prometheus" and t.get("metricType") == "AverageValue", t
        names = set(re.findall(r"\badjointdpm_[a-z_]+\b", t["metadata"]["query"]))
        assert len(names) == 1, t["metadata"]["query"]
        out[names.pop()] = float(t["metadata"]["threshold"])
    return out


def _env(container) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _init(dep, name="fetch-models") -> dict:
    (c,) = [c for c in _pod(dep).get("initContainers", []) if c["name"] == name]
    return c


def _fetch_timeout(init) -> int:
    cmd = init["command"]
    assert cmd[0] == "timeout", f"the weights fetch must be bounded in time: {cmd}"
    (seconds,) = [w for w in cmd[1:] if not w.startswith("-")][:1]
    return int(seconds)


def _startup_budget(container) -> int:
    p = container["startupProbe"]
    return p.get("initialDelaySeconds", 0) + p.get("failureThreshold", 3) * p.get("periodSeconds", 10)


def _referenced(pod_spec, kind) -> set[str]:
    """Names of the Secrets (kind "secret") or ConfigMaps ("configMap") a pod refers to."""
    names = set()
    for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        for e in c.get("envFrom", []):
            if f"{kind}Ref" in e:
                names.add(e[f"{kind}Ref"]["name"])
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get(f"{kind}KeyRef")
            if ref:
                names.add(ref["name"])
    for v in pod_spec.get("volumes", []):
        if kind in v:
            names.add(v[kind].get("secretName") or v[kind].get("name"))
    return names


def _placeholder_secret(docs, name) -> dict:
    secret = _one(docs, "Secret", name)
    assert not secret.get("data") and not secret.get("stringData"), \
        f"Secret {name} must not carry data in the manifests (kubectl create secret)"
    return secret


# ---------------------------------------------------------------------------------------------
# replicas and autoscaling


def test_several_replicas_held_by_the_autoscaler(prod):
    dep, _ = _server(prod)
    kind, scaler = _autoscaler(prod)
    low, high = _bounds(kind, scaler)
    assert low >= 2, f"{kind} keeps only {low} replica(s): N GPUs means at least 2, always"
    assert high > low
    # The autoscaler owns the count: a `replicas` in the manifest would be re-applied over it.
    assert "replicas" not in dep["spec"], \
        "with an autoscaler, spec.replicas must not be in the manifest (each apply resets it)"


@pytest.mark.parametrize("name", PRODUCTION_RENDERS)
def test_one_autoscaler_on_queue_depth_per_pod(name):
    docs = _render(name)
    kind, scaler = _autoscaler(docs)  # an HPA xor a ScaledObject, never both
    assert kind == AUTOSCALERS[name]
    ref = scaler["spec"]["scaleTargetRef"]
    assert (ref.get("apiVersion"), ref.get("kind"), ref["name"]) == \
        ("apps/v1", "Deployment", SERVER_DEPLOYMENT)
    targets = _per_pod_targets(kind, scaler)
    assert QUEUE_METRIC in targets, f"{kind} must scale on {QUEUE_METRIC}: {targets}"
    assert all(v > 0 for v in targets.values()), targets
    if kind == "ScaledObject":  # KEDA's query picks the server's series in this namespace
        namespace = _one(docs, "Deployment", SERVER_DEPLOYMENT)["metadata"].get("namespace")
        assert namespace, "the KEDA overlay needs a namespace for its queries to match"
        for t in scaler["spec"]["triggers"]:
            assert f'namespace="{namespace}"' in t["metadata"]["query"], t["metadata"]["query"]
            assert t["metadata"].get("ignoreNullValues") == "false", \
                "an empty query (wrong namespace, no scrape) must be an error, not zero load"
        assert scaler["spec"]["fallback"]["replicas"] >= _bounds(kind, scaler)[0]


def test_scale_down_is_slow_and_one_pod_at_a_time(prod):
    kind, scaler = _autoscaler(prod)
    down = _behavior(kind, scaler).get("scaleDown", {})
    window = down.get("stabilizationWindowSeconds", 300)
    assert 900 <= window <= 3600, f"scale-down stabilization {window} s: too short (or invalid)"
    assert down.get("policies"), "scale-down needs an explicit pace"
    assert down.get("selectPolicy") in ("Min", "Disabled") or len(down["policies"]) == 1
    for policy in down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1, policy
        assert 1 <= policy["periodSeconds"] <= 1800
    up = _behavior(kind, scaler).get("scaleUp", {})
    assert up.get("stabilizationWindowSeconds", 0) <= 300, "scale-up must react within minutes"


def test_hpa_and_keda_scale_alike():
    """The two overlays are alternatives for one policy: same bounds, targets and pace."""
    hpa_kind, hpa = _autoscaler(_render("overlays/production"))
    so_kind, so = _autoscaler(_render("overlays/production-keda"))
    assert _bounds(hpa_kind, hpa) == _bounds(so_kind, so)
    assert _per_pod_targets(hpa_kind, hpa) == _per_pod_targets(so_kind, so)
    assert _behavior(hpa_kind, hpa) == _behavior(so_kind, so)


def test_scaledobject_schema_is_strict():
    """The ScaledObject subset is not vacuous: the rendered one passes, and an unknown field, a
    misspelled scaler parameter, a bad enum and a missing trigger fail."""
    import jsonschema

    (so,) = _all(_render("overlays/production-keda"), "ScaledObject")
    _validate(so, K8S_VERSIONS[-1])
    low, high = _bounds("ScaledObject", so)  # the CRD's CEL rule, which JSON Schema cannot say
    assert low <= high

    def broken(mutate):
        doc = copy.deepcopy(so)
        mutate(doc)
        with pytest.raises(jsonschema.ValidationError):
            _validate(doc, K8S_VERSIONS[-1])

    broken(lambda d: d["spec"].update(minReplicas=3))
    broken(lambda d: d["spec"]["triggers"][0]["metadata"].update(treshold="4"))
    broken(lambda d: d["spec"]["triggers"][0]["metadata"].pop("query"))
    broken(lambda d: d["spec"]["triggers"][0].update(metricType="Average"))
    broken(lambda d: d["spec"]["fallback"].update(behavior="currentReplicasIfBigger"))
    broken(lambda d: d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
           ["scaleDown"].update(stabilizationWindowSeconds=7200))
    broken(lambda d: d["spec"].update(triggers=[]))
    broken(lambda d: d["spec"].pop("scaleTargetRef"))
    with pytest.raises(pytest.fail.Exception, match="Couldn't find schema"):  # not our CRD
        _validate({**so, "apiVersion": "keda.sh/v1beta1"}, K8S_VERSIONS[-1])


def test_prometheus_adapter_rule_serves_the_hpa_metrics():
    """The adapter rule (a values fragment for the adapter's own release, not a manifest we
    apply) exposes every Pods metric the HPA asks for, per pod and namespace, under its name."""
    _, hpa = _autoscaler(_render("overlays/production"))
    wanted = set(_per_pod_targets("HorizontalPodAutoscaler", hpa))
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert "apiVersion" not in values, "a values fragment, not an object kustomize would apply"
    served = set()
    for rule in values["rules"]["custom"]:
        series = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"]).group(1)
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        assert [rule["resources"]["overrides"][k]["resource"] for k in ("namespace", "pod")] == \
            ["namespace", "pod"]
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], placeholder
        name = rule.get("name", {})
        matches = re.compile(name.get("matches", ".*"))
        for metric in wanted:
            if not re.fullmatch(series.lstrip("^").rstrip("$"), metric):
                continue
            m = matches.search(metric)
            assert m, (metric, name)
            # the adapter's default `as` is $1 with one capture group: spell it out
            template = name.get("as") or ("$1" if matches.groups == 1 else "$0")
            api_name = re.sub(r"\$\{?(\d+)\}?", lambda g: m.group(int(g.group(1))), template)
            if api_name == metric:
                served.add(metric)
    assert served == wanted, f"the adapter does not serve {wanted - served} under their names"


# ---------------------------------------------------------------------------------------------
# disruption, spread, drain


def test_pdb_selects_exactly_the_server_pods(prod):
    (pdb,) = _all(prod, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    selector = pdb["spec"]["selector"]
    assert set(selector) == {"matchLabels"}, selector
    hits = [n for n, labels in _workload_labels(prod).items()
            if _selects(selector["matchLabels"], labels)]
    assert hits == [f"Deployment/{SERVER_DEPLOYMENT}"], hits
    low, _ = _bounds(*_autoscaler(prod))
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] == 1, "evict one server pod at a time"
    else:
        assert 1 <= int(pdb["spec"]["minAvailable"]) < low, "the PDB must not block every drain"
    assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", \
        "a pod that is not ready must not block node drains"


def test_topology_spread_over_zones_and_gpu_nodes(prod):
    dep, _ = _server(prod)
    constraints = _pod(dep).get("topologySpreadConstraints", [])
    keys = {c["topologyKey"]: c for c in constraints}
    assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= set(keys), keys
    labels = _server_labels(prod)
    for c in constraints:
        assert set(c["labelSelector"]) == {"matchLabels"}
        assert _selects(c["labelSelector"]["matchLabels"], labels), c
        others = [n for n, lab in _workload_labels(prod).items()
                  if _selects(c["labelSelector"]["matchLabels"], lab)]
        assert others == [f"Deployment/{SERVER_DEPLOYMENT}"], others
        assert c["maxSkew"] >= 1
        assert c["whenUnsatisfiable"] in ("DoNotSchedule", "ScheduleAnyway")
        assert "pod-template-hash" in c.get("matchLabelKeys", []), \
            "spread per revision, so a rollout's old pods do not skew the new ones"
    # zones are preferred only: a GPU pod left Pending to balance zones serves nobody
    assert keys["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    # the spread counts GPU nodes only (the nodeSelector is honoured by default)
    assert _pod(dep).get("nodeSelector")
    assert all(c.get("nodeAffinityPolicy", "Honor") == "Honor" for c in constraints)


def test_grace_outlasts_the_longest_job(prod):
    dep, server = _server(prod)
    longest = float(_flag(server, "--max-request-seconds"))
    drain = float(_flag(server, "--shutdown-grace"))
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = _pod(dep)["terminationGracePeriodSeconds"]
    assert pre_stop > 0, "Endpoints/DNS must drop the pod before the drain starts"
    assert drain >= longest, f"--shutdown-grace {drain} s < the longest job ({longest} s)"
    assert grace > pre_stop + drain, (grace, pre_stop, drain)
    # a lease outlives a replica only briefly, and never a drain
    assert 0 < float(_flag(server, "--lease-seconds")) < drain


# ---------------------------------------------------------------------------------------------
# the server's configuration for N replicas


def test_artifacts_in_a_bucket_not_a_volume(prod):
    dep, server = _server(prod)
    flags = _flags(server["args"])
    store = _flag(server, "--artifact-store")
    assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?", store), store
    assert "--artifact-dir" not in flags, "the bucket replaces the artifacts directory"
    assert not _all(prod, "PersistentVolumeClaim"), "no claim outside the Redis StatefulSet"
    pod = _pod(dep)
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        assert "/artifacts" not in [m["mountPath"] for m in c.get("volumeMounts", [])], c["name"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], pod["volumes"]
    # endpoint and credentials: the standard AWS variables, from a Secret without data here
    for c in (server, _init(dep)):
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert refs, f"{c['name']}: AWS_* variables come from the object-store Secret"
        for name in refs:
            _placeholder_secret(prod, name)


def test_every_secret_and_configmap_the_pods_use_is_rendered(prod):
    """(So `kubectl apply -k` creates each, placeholders included, before a pod waits on it.)"""
    for d in prod:
        if d["kind"] in ("Deployment", "StatefulSet"):
            for kind, objects in (("secret", "Secret"), ("configMap", "ConfigMap")):
                present = {o["metadata"]["name"] for o in _all(prod, objects)}
                missing = _referenced(_pod(d), kind) - present
                assert not missing, f"{d['metadata']['name']} uses {objects}s {missing}"


def test_coordination_in_redis_from_a_secret(prod):
    _, server = _server(prod)
    flags = _flags(server["args"])
    if "--coordination" in flags:
        (url,) = flags["--coordination"]
        assert url.startswith(("redis://", "rediss://")) and "@" not in url, \
            "a password belongs in a Secret (ADJOINTDPM_COORDINATION), not in the args"
        return
    ref = _env(server)["ADJOINTDPM_COORDINATION"]["valueFrom"]["secretKeyRef"]
    assert ref.get("optional") is not True, "no coordination URL must mean no pod"
    _placeholder_secret(prod, ref["name"])


def test_each_replica_is_named_by_its_pod(prod):
    _, server = _server(prod)
    assert _flag(server, "--replica-id") == "$(POD_NAME)"
    env = _env(server)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert float(_flag(server, "--lease-seconds")) == 30
    age = float(_flag(server, "--max-connection-age"))
    assert 60 <= age <= 3600, "GOAWAY often enough that clients find new replicas"


@pytest.mark.parametrize("name", RENDERS)
def test_the_server_accepts_the_manifests_flags(name, monkeypatch):
    """Every flag the manifests pass parses with the server's own argument parser."""
    import adjointdpm_server.__main__ as entry

    class _Got(Exception):
        pass

    original = argparse.ArgumentParser.parse_args
    captured = {}

    def grab(self, *args, **kwargs):
        captured["parser"] = self
        raise _Got

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Got):
        entry.parse_args([])
    monkeypatch.undo()
    parser = captured["parser"]
    _, server = _server(_render(name))
    unknown = {f for f in _flags(server["args"]) if f not in parser._option_string_actions}
    assert not unknown, f"the server has no {sorted(unknown)}"

    def fail(message):
        raise AssertionError(f"{name}: {message}")

    monkeypatch.setattr(parser, "error", fail)
    original(parser, server["args"])


def test_the_server_takes_its_coordination_url_from_the_environment(monkeypatch):
    """The manifests pass the Redis URL (with its password) only as ADJOINTDPM_COORDINATION."""
    import adjointdpm_server.__main__ as entry

    url = "redis://:secret@adjointdpm-redis:6379/0"
    monkeypatch.setenv("ADJOINTDPM_COORDINATION", url)
    config, _ = entry.parse_args([])
    assert config.coordination == url


# ---------------------------------------------------------------------------------------------
# the weights cache and the start-up budget


def test_weights_cache_fills_a_node_local_volume_before_the_server_starts(prod):
    dep, server = _server(prod)
    pod = _pod(dep)
    init = _init(dep)
    assert init["image"] == server["image"], "the server's image (already pulled, has boto3)"
    models = _mount_source(pod, server, "/models")
    assert "emptyDir" in models and models["_mount"].get("readOnly") is True
    cache = _mount_source(pod, init, "/models")
    assert cache["name"] == models["name"] and not cache["_mount"].get("readOnly")
    targets = []
    for pair in init["args"]:
        source, target = pair.rsplit("=", 1)
        assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]+[a-z0-9]/\S+", source), source
        assert target.startswith("/models/")
        targets.append(target.rstrip("/") + "/")
    for spec in _flags(server["args"])["--model"]:
        path = spec.split(":", 1)[1].rstrip("/") + "/"
        assert any(path.startswith(t) for t in targets), f"--model {spec}: not in the cache"
    # the script is the one in the repository, mounted from the generated ConfigMap
    script = _mount_source(pod, init, "/opt/adjointdpm-fetch")
    cm = _one(prod, "ConfigMap", script["configMap"]["name"])
    assert cm["data"]["fetch_models.py"] == FETCH_SCRIPT.read_text()
    assert init["command"][-1] == "/opt/adjointdpm-fetch/fetch_models.py"
    # room for it: the cache's size limit counts against the pod's ephemeral storage
    size = _parse_quantity(models["emptyDir"]["sizeLimit"])
    assert size >= 8 * 2**30, "an SD 1.5 directory (2-5 GB) and another version beside it"
    assert _parse_quantity(server["resources"]["limits"]["ephemeral-storage"]) > size


def test_the_image_has_what_the_init_container_runs():
    """fetch_models.py runs in the server's image: boto3 must be a dependency of the server
    (server/setup.py's SERVER_DEPENDENCIES, the distribution's requirements besides the SDK)."""
    tree = ast.parse((ROOT / "server" / "setup.py").read_text())
    (deps,) = [ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and any(getattr(target, "id", None) == "SERVER_DEPENDENCIES" for target in node.targets)]
    assert any(re.match(r"boto3\b", d) for d in deps), "fetch_models.py needs boto3 in the image"


def test_startup_budget_fits_the_rollout_deadline(prod):
    dep, server = _server(prod)
    fetch = _fetch_timeout(_init(dep))
    load = _startup_budget(server)
    assert load >= MIN_STARTUP_BUDGET_S
    assert 60 <= fetch <= 1800, fetch
    assert dep["spec"]["progressDeadlineSeconds"] > fetch + load, \
        (dep["spec"]["progressDeadlineSeconds"], fetch, load)


def test_readme_states_the_budget_the_manifests_enforce():
    dep, server = _server(_render("overlays/production"))
    text = (DEPLOY / "README.md").read_text()
    assert "## Production: N GPUs" in text
    section = text.split("## Production: N GPUs", 1)[1].split("\n## ", 1)[0]
    for number in (_fetch_timeout(_init(dep)), _startup_budget(server),
                   dep["spec"]["progressDeadlineSeconds"],
                   _pod(dep)["terminationGracePeriodSeconds"]):
        assert f"{number} s" in section, f"the README's production section should state {number} s"
    for path in ("overlays/production", "overlays/production-keda",
                 "monitoring/prometheus-adapter-values.yaml"):
        assert path in section


def _parse_quantity(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]i)?", str(text))
    assert m, text
    return int(m.group(1)) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]


# ---------------------------------------------------------------------------------------------
# Redis


def test_redis_statefulset_with_storage_probes_and_a_password(prod):
    (sts,) = _all(prod, "StatefulSet")
    assert sts["spec"]["replicas"] == 1, "one Redis writer; HA means an external Redis"
    pod = _pod(sts)
    (redis,) = pod["containers"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+", redis["image"]), redis["image"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert redis.get(kind), f"Redis {kind} missing"
    assert "exec" in redis["readinessProbe"], "ready means PONG, not an open port (AOF loading)"
    # persistence: the append-only file on a claim from volumeClaimTemplates
    args = redis["args"]
    data_dir = args[args.index("--dir") + 1]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction", \
        "leases and the job registry must never be evicted"
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    (mount,) = [m for m in redis["volumeMounts"] if m["mountPath"] == data_dir]
    assert mount["name"] in templates
    assert templates[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # the password: from a Secret without data here, never optional
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    ref = _env(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref.get("optional") is not True
    _placeholder_secret(prod, ref["name"])
    # its headless Service and a NetworkPolicy that lets only the server in
    svc = _one(prod, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert 6379 in [p["port"] for p in svc["spec"]["ports"]]
    (policy,) = [n for n in _all(prod, "NetworkPolicy")
                 if _selects(n["spec"]["podSelector"]["matchLabels"],
                             pod_labels := sts["spec"]["template"]["metadata"]["labels"])]
    assert pod_labels
    peers = [f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"]
             for f in rule["from"]]
    assert peers and all(_selects(p, _server_labels(prod)) for p in peers)


def test_external_redis_variant_renders_without_the_statefulset():
    """The documented external-Redis setup: the production component without ../redis."""
    needs_module("kubernetes_validate", "kubernetes-validate (tests/requirements.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        rel = Path(os.path.relpath(K8S, tmp))
        shutil.copy(K8S / "overlays/production/hpa.yaml", Path(tmp) / "hpa.yaml")
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "namespace": "adjointdpm",
            "resources": [str(rel / "overlays/gpu"), "hpa.yaml"],
            "components": [str(rel / "components/production")]}))
        docs = _run_kustomize(Path(tmp))
    assert not _all(docs, "StatefulSet") and not _all(docs, "NetworkPolicy")
    # nothing the server pod needs lived in the Redis component
    dep, _ = _server(docs)
    for kind, objects in (("secret", "Secret"), ("configMap", "ConfigMap")):
        present = {d["metadata"]["name"] for d in _all(docs, objects)}
        assert _referenced(_pod(dep), kind) <= present, (kind, _referenced(_pod(dep), kind), present)
    for doc in docs:
        for version in K8S_VERSIONS:
            _validate(doc, version)
    _, server = _server(docs)
    assert "secretKeyRef" in _env(server)["ADJOINTDPM_COORDINATION"]["valueFrom"]


# ---------------------------------------------------------------------------------------------
# fetch_models.py against an in-process S3 (moto)


@pytest.fixture
def fetch_models():
    spec = importlib.util.spec_from_file_location("fetch_models", FETCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def s3(monkeypatch):
    moto = needs_module("moto", "moto (tests/requirements.txt)")
    import boto3

    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="models")
        yield client


MODEL = {"model_index.json": b"{}", "unet/config.json": b'{"a": 1}',
         "unet/diffusion_pytorch_model.safetensors": os.urandom(3 * 2**20 + 17),
         "vae/diffusion_pytorch_model.safetensors": os.urandom(2**20)}


def _upload(client, prefix, files):
    for rel, data in files.items():
        client.put_object(Bucket="models", Key=f"{prefix}/{rel}", Body=data)


def test_fetch_models_copies_a_prefix_and_then_trusts_its_marker(s3, fetch_models, tmp_path,
                                                                 monkeypatch):
    _upload(s3, "sd-1.5/v1", MODEL)
    s3.put_object(Bucket="models", Key="sd-1.5/v1/empty-folder/", Body=b"")
    s3.put_object(Bucket="models", Key="sd-1.5/v10/other", Body=b"not this version")
    target = tmp_path / "models" / "sd-1.5"
    assert fetch_models.main([f"s3://models/sd-1.5/v1={target}"], client=s3) == 0
    got = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*")
           if p.is_file() and p.name != fetch_models.MARKER}
    assert got == MODEL
    assert not list(target.rglob("*.part"))
    # again, unchanged: nothing is downloaded
    monkeypatch.setattr(s3, "download_file", lambda *a, **k: pytest.fail("downloaded again"))
    assert fetch_models.fetch(s3, "models", "sd-1.5/v1/", target) == 0
    monkeypatch.undo()
    # a changed object (another ETag) or a stray file: copied afresh, stray files gone
    (target / "stray").write_text("left over")
    s3.put_object(Bucket="models", Key="sd-1.5/v1/unet/config.json", Body=b'{"a": 2}')
    assert fetch_models.fetch(s3, "models", "sd-1.5/v1/", target) > 0
    assert (target / "unet/config.json").read_bytes() == b'{"a": 2}'
    assert not (target / "stray").exists()


def test_fetch_models_refuses_empty_or_unsafe_sources(s3, fetch_models, tmp_path, capsys):
    target = tmp_path / "m"
    assert fetch_models.main([f"s3://models/nothing-here={target}"], client=s3) == 2
    assert "no objects" in capsys.readouterr().err
    s3.put_object(Bucket="models", Key="evil/../../etc/passwd", Body=b"x")
    assert fetch_models.main([f"s3://models/evil={target}"], client=s3) == 2
    assert "unsafe key" in capsys.readouterr().err
    assert not (tmp_path / "etc").exists()
    assert fetch_models.main(["/models/x"], client=s3) == 2
    assert fetch_models.main(["s3://models/x=relative/path"], client=s3) == 2
    assert fetch_models.main([], client=s3) == 2


def test_fetch_models_fails_when_the_store_does(s3, fetch_models, tmp_path, capsys, monkeypatch):
    assert fetch_models.main([f"s3://no-such-bucket/x={tmp_path / 'm'}"], client=s3) == 1
    assert "NoSuchBucket" in capsys.readouterr().err
    # a truncated download never becomes a file, and the marker is not written
    _upload(s3, "sd", MODEL)

    def short(bucket, key, filename, Config=None):
        Path(filename).write_bytes(b"short")

    monkeypatch.setattr(s3, "download_file", short)
    target = tmp_path / "sd"
    assert fetch_models.main([f"s3://models/sd={target}"], client=s3) == 1
    assert "expected" in capsys.readouterr().err
    assert not (target / fetch_models.MARKER).exists()
    assert not (target / "model_index.json").exists()


def test_production_component_keeps_the_server_container_first():
    """The JSON patches address the server as containers/0 (and pin the base's args by `test`
    ops): the server must stay the first container of the base Deployment."""
    dep, _ = _server(_render("base"))
    assert _pod(dep)["containers"][0]["name"] == SERVER_CONTAINER
