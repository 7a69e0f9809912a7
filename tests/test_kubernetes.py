"""deploy/kubernetes against the Kubernetes schemas, checkov, and the proxy's own code.

No cluster runs here, so each manifest is checked where it can be: against the API schemas of
Kubernetes 1.30 (kubernetes-validate, strict: an unknown field is an error), by checkov's
security scan (once per session: it is the slow part), by `kubectl kustomize` where kubectl is
installed, and against the proxy itself: the ConfigMap's config.yaml loads with
``settings.load_settings`` under the Deployment's environment (the Secret's values taken from
secret.example.yaml, `$(VAR)` references expanded as the kubelet does), and the probes' paths
answer 200 from an app built from those settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app import create_app
from settings import ENV_VARS, load_settings
from tests.test_deployment import comment_above

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"  # the oldest release the manifests are written for
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MANIFESTS = sorted(K8S.glob("*.yaml"))
# Kept out of kustomization.yaml on purpose (see its comments), and the only kinds without a
# schema in kubernetes-validate: Kustomization and the Prometheus Operator's ServiceMonitor.
NOT_APPLIED = {"secret.example.yaml", "servicemonitor.yaml"}
NO_SCHEMA = {"Kustomization", "ServiceMonitor"}
# The checkov checks skipped in the manifests (checkov.io/skipN annotations), each with its
# reason there; a new skip must be added here on purpose.
CHECKOV_SKIPS = {("CKV_K8S_43", "deployment.yaml"), ("CKV_K8S_35", "deployment.yaml"),
                 ("CKV_K8S_43", "redis.yaml"), ("CKV_K8S_35", "redis.yaml")}
CHECKOV_TIMEOUT = 120  # seconds; a scan takes about 4 here
# From the README's measurements: the RSS after a 30-minute soak at 600 req/s, 256 threads.
SOAK_RSS_MB = 85
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
# Set by the Deployment, read by the drain on SIGTERM (server.shutdown_grace) that is being
# added alongside: listed until settings.ENV_VARS has it everywhere (then this can go).
PENDING_VARS = {"SHUTDOWN_GRACE"}


# --- the manifests as data ----------------------------------------------------------------

def documents(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def resource(kind: str, name: str) -> dict:
    """The one manifest of this kind and name under deploy/kubernetes."""
    found = [doc for path in MANIFESTS for doc in documents(path)
             if doc.get("kind") == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} manifests"
    return found[0]


def proxy_deployment() -> dict:
    return resource("Deployment", "llm-proxy")


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def secret_values() -> dict[str, str]:
    """The example Secret's keys and placeholder values."""
    secret = resource("Secret", "llm-proxy-secrets")
    return {**secret.get("data", {}), **secret.get("stringData", {})}


def pod_environment(spec: dict, secrets: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: plain values, secretKeyRef values
    (an optional key that is missing leaves the variable unset), and `$(VAR)` references
    expanded from the variables defined before it (an unknown one stays as written)."""
    env: dict[str, str] = {}
    for var in spec.get("env", []):
        if "value" in var:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "llm-proxy-secrets", f"{var['name']}: an unknown Secret"
            if ref["key"] not in secrets:
                assert ref.get("optional"), f"{var['name']}: the Secret has no {ref['key']}"
                continue
            value = secrets[ref["key"]]
        env[var["name"]] = value
    return env


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[:-len(suffix)]) * factor
    raise ValueError(f"unexpected memory quantity {quantity!r}")


@pytest.fixture
def config_file(tmp_path) -> Path:
    """The ConfigMap's config.yaml, written where load_settings can read it."""
    path = tmp_path / "config.yaml"
    path.write_text(resource("ConfigMap", "llm-proxy-config")["data"]["config.yaml"],
                    encoding="utf-8")
    return path


def deployed_settings(config_file: Path, **overrides):
    env = pod_environment(container(proxy_deployment()), secret_values())
    return load_settings(environ={**env, **overrides}, config_path=str(config_file))


# --- kustomize ------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest_but_the_secret_example_and_the_servicemonitor():
    listed = set(documents(K8S / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in MANIFESTS} - NOT_APPLIED - {"kustomization.yaml"}


def test_kustomize_renders_every_resource_into_the_namespace():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed (its `kubectl kustomize` renders the directory)")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert {d["kind"] for d in rendered} >= {"Namespace", "ConfigMap", "Deployment", "Service",
                                              "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                              "NetworkPolicy"}
    assert all(d["metadata"].get("namespace") == "llm-proxy"
               for d in rendered if d["kind"] != "Namespace")


# --- the Kubernetes schemas --------------------------------------------------------------

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schemas(path):
    for doc in documents(path):
        if doc["kind"] in NO_SCHEMA:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} {where}: "
                        f"{e.message}")


def test_schema_validation_rejects_an_unknown_field():
    """Strict mode is what catches a misspelt field, which Kubernetes would drop silently."""
    deployment = proxy_deployment()
    probe = container(deployment).pop("readinessProbe")
    container(deployment)["readinesProbe"] = probe
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_servicemonitor_scrapes_the_services_port_and_pods():
    monitor = resource("ServiceMonitor", "llm-proxy")
    service = resource("Service", "llm-proxy")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"] and "http" in ports
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# --- checkov --------------------------------------------------------------------------------

def checkov_binary() -> str:
    """checkov lives in its own venv (requirements-deploy.txt, made by `make test`)."""
    for candidate in (os.environ.get("CHECKOV"), Path(sys.prefix) / "checkov" / "bin" / "checkov",
                      shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    message = ("checkov is not installed (make test installs it: requirements-deploy.txt, "
               "in .venv/checkov)")
    if IN_CI:
        pytest.fail(message + ": CI must provide it")
    pytest.skip(message)


@pytest.fixture(scope="module")
def checkov_reports() -> dict[str, dict]:
    """One checkov scan of deploy/kubernetes for the module, by framework (kubernetes;
    kustomize where kubectl is installed; secrets when it finds something): the summary, the
    failed checks and the skipped ones, as (check id, file name, reason)."""
    done = subprocess.run(
        # --skip-download: nothing is fetched from the vendor's platform
        [checkov_binary(), "--directory", str(K8S), "--output", "json", "--skip-download"],
        capture_output=True, text=True, timeout=CHECKOV_TIMEOUT, cwd=ROOT)
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: some check failed
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]

    def brief(check):
        return (check["check_id"], Path(check["file_path"]).name,
                check["check_result"].get("suppress_comment", check["check_name"]))
    return {r.get("check_type", "none"): {
        "summary": r.get("summary", r),
        "failed": [brief(c) for c in r.get("results", {}).get("failed_checks", [])],
        "skipped": [brief(c) for c in r.get("results", {}).get("skipped_checks", [])]}
        for r in reports}


def test_checkov_passes_with_only_the_justified_skips(checkov_reports):
    assert {kind: r["failed"] for kind, r in checkov_reports.items() if r["failed"]} == {}
    assert "kubernetes" in checkov_reports, checkov_reports
    kubernetes = checkov_reports["kubernetes"]
    assert kubernetes["summary"]["parsing_errors"] == 0
    assert kubernetes["summary"]["passed"] > 100  # it did read the manifests
    assert {(check, name) for check, name, _ in kubernetes["skipped"]} == CHECKOV_SKIPS
    for check, name, reason in kubernetes["skipped"]:
        assert len(reason) > 20, f"{check} in {name}: say why it is skipped"


# --- the proxy under the Deployment's settings ------------------------------------------

def test_configmap_config_loads_with_the_deployments_environment(config_file):
    settings = deployed_settings(config_file)
    assert settings.environment == "production"
    assert settings.auth.api_keys_required and settings.auth.client_keys()  # PROXY_API_KEYS
    assert settings.redis.url == ("redis://:replace-me-with-openssl-rand-hex-32"
                                  "@llm-proxy-redis:6379/0")
    assert [(p.name, p.type, p.api_key_env) for p in settings.providers] == [
        ("openai", "openai", "OPENAI_API_KEY"), ("anthropic", "anthropic", "ANTHROPIC_API_KEY")]
    assert settings.server.workers == 1 and settings.server.port == 8000


def test_configmap_is_mounted_where_proxy_config_points():
    deployment = proxy_deployment()
    env = pod_environment(container(deployment), secret_values())
    mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (config_volume,) = [name for name, v in volumes.items()
                        if v.get("configMap", {}).get("name") == "llm-proxy-config"]
    assert env["PROXY_CONFIG"] == mounts[config_volume] + "/config.yaml"
    assert "config.yaml" in resource("ConfigMap", "llm-proxy-config")["data"]


def test_the_proxy_starts_with_only_the_required_secret_keys(config_file):
    """A Secret with PROXY_API_KEYS and REDIS_PASSWORD alone still starts the pod and loads."""
    required = {"PROXY_API_KEYS", "REDIS_PASSWORD"}
    secrets = {k: v for k, v in secret_values().items() if k in required}
    env = pod_environment(container(proxy_deployment()), secrets)
    settings = load_settings(environ=env, config_path=str(config_file))
    assert settings.admin_api_key == "" and settings.auth.client_keys()


def test_the_database_is_postgresql_shared_by_every_pod_or_off(config_file):
    """Several replicas on a read-only root: a SQLite file per pod would split keys and spend
    between them, so the ConfigMap turns the database off, and turned on it is the Secret's
    DATABASE_URL, which every pod shares."""
    config = yaml.safe_load(resource("ConfigMap", "llm-proxy-config")["data"]["config.yaml"])
    assert config["database"]["enabled"] is False
    assert not deployed_settings(config_file).database.enabled
    on = deployed_settings(config_file, DATABASE_ENABLED="true")
    assert on.database.url == secret_values()["DATABASE_URL"]
    assert on.database.target.startswith("postgresql+psycopg://")
    # The Secret's key is optional: a Secret without it starts the pods, the database off.
    secrets = {k: v for k, v in secret_values().items() if k != "DATABASE_URL"}
    env = pod_environment(container(proxy_deployment()), secrets)
    assert "DATABASE_URL" not in env
    assert not load_settings(environ=env, config_path=str(config_file)).database.enabled


def test_the_comments_say_what_the_admin_key_and_database_url_are_for():
    """ADMIN_API_KEY opens /admin/* (the keys API) as well as /debug/*; DATABASE_URL is read
    only with the database turned on in the ConfigMap, whose comment says to set both."""
    deployment = (K8S / "deployment.yaml").read_text(encoding="utf-8")
    admin = comment_above(deployment, r"- name: ADMIN_API_KEY$")
    assert "/admin/*" in admin and "/debug/*" in admin, admin
    database = comment_above(deployment, r"- name: DATABASE_URL$")
    assert "configmap.yaml" in database and "enabled" in database, database
    config = resource("ConfigMap", "llm-proxy-config")["data"]["config.yaml"]
    database = comment_above(config, r"^\s+enabled: false")
    assert "DATABASE_URL" in database and "true" in database, database


def test_every_variable_the_deployment_sets_is_read_by_the_proxy():
    spec = container(proxy_deployment())
    names = [v["name"] for v in spec["env"]]
    config = yaml.safe_load(resource("ConfigMap", "llm-proxy-config")["data"]["config.yaml"])
    key_vars = {p["api_key_env"] for p in config["providers"] if p.get("api_key_env")}
    referenced = {m for v in spec["env"] for m in re.findall(r"\$\((\w+)\)", v.get("value", ""))}
    known = set(ENV_VARS) | {"PROXY_CONFIG"} | key_vars | referenced | PENDING_VARS
    assert [n for n in names if n not in known] == []
    assert len(names) == len(set(names))


def test_memory_settings_fit_the_memory_limit(config_file):
    """The arithmetic in deployment.yaml's comments, on the settings as loaded."""
    settings = deployed_settings(config_file)
    resources = container(proxy_deployment())["resources"]
    limit = mebibytes(resources["limits"]["memory"])
    request = mebibytes(resources["requests"]["memory"])
    m = settings.memory_manager
    # The memory manager frees before the kernel's OOM killer acts, with a margin for the
    # 10 s between its samples.
    assert m.memory_threshold_mb < m.emergency_threshold_mb <= limit - 64
    # Without Redis the cache's full budget on top of the soaked RSS stays under the first
    # threshold (no cleanups in the steady state); with Redis, the local fallback under the
    # request.
    assert SOAK_RSS_MB + settings.cache.max_memory_mb < m.memory_threshold_mb
    assert SOAK_RSS_MB + settings.redis.local_fallback_mb < request


def test_termination_grace_outlasts_the_prestop_sleep_and_the_drain(config_file):
    deployment = proxy_deployment()
    spec = container(deployment)
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    env = pod_environment(spec, secret_values())
    drain = float(env["SHUTDOWN_GRACE"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(command[1]) + drain + 5  # 5 s at least to close and exit
    if "SHUTDOWN_GRACE" in ENV_VARS:  # once the proxy reads it
        section, name = ENV_VARS["SHUTDOWN_GRACE"]
        assert getattr(getattr(deployed_settings(config_file), section), name) == drain


def test_probes_answer_200_from_the_app(config_file, upstream):
    """The probes' paths as the app serves them, built from the Deployment's settings with
    the providers pointed at a local fake upstream, and Redis away (a closed local port): a
    Redis outage must not take every pod out of the Service."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    # The database as deployed: off (test_the_database_is_postgresql_shared_by_every_pod_or_off).
    settings = deployed_settings(config_file, REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    for provider in settings.providers:
        provider.base_url = upstream.url + ("/v1" if provider.type == "openai" else "")
    app = create_app(settings)
    try:
        client = app.test_client()
        spec = container(proxy_deployment())
        ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
        for probe in PROBES:
            get = spec[probe]["httpGet"]
            assert ports[get["port"]] == settings.server.port, probe
            response = client.get(get["path"])
            assert response.status_code == 200, (probe, get["path"], response.get_data())
    finally:
        app.extensions["llm_proxy"].close()


# --- security and wiring ------------------------------------------------------------------

def test_the_proxy_runs_as_the_images_user_on_a_read_only_root():
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    uid, gid = map(int, re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M).groups())
    pod = proxy_deployment()["spec"]["template"]["spec"]
    spec = container(proxy_deployment())
    for context in (pod["securityContext"], spec["securityContext"]):
        assert (context["runAsNonRoot"], context["runAsUser"], context["runAsGroup"]) == (
            True, uid, gid)
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
    sc = spec["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    # The one writable place: /tmp, on disk (waitress spills large bodies there).
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in spec["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "medium" not in volumes[tmp["name"]]["emptyDir"]


def test_service_pdb_hpa_and_scrape_annotations_reach_the_proxy_pods():
    deployment = proxy_deployment()
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    service = resource("Service", "llm-proxy")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]] == [
        (8000, 8000)]
    assert resource("PodDisruptionBudget", "llm-proxy")["spec"]["selector"]["matchLabels"] \
        .items() <= labels.items()
    target = resource("HorizontalPodAutoscaler", "llm-proxy")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "llm-proxy")
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) in ports.values()
    assert annotations["prometheus.io/path"] == "/metrics"


def test_redis_keeps_nothing_on_disk_and_wants_the_password():
    deployment = resource("Deployment", "llm-proxy-redis")
    spec = container(deployment)
    args = spec["args"]
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--save"] == "" and pairs["--appendonly"] == "no"
    assert pairs["--requirepass"] == "$(REDIS_PASSWORD)"
    assert pod_environment(spec, secret_values())["REDIS_PASSWORD"]
    maxmemory = int(pairs["--maxmemory"].removesuffix("mb"))
    assert maxmemory < mebibytes(spec["resources"]["limits"]["memory"])
    sc = spec["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"]
    assert {m["mountPath"] for m in spec["volumeMounts"]} == {"/data"}
    # The proxy's REDIS_URL names this Redis's Service and port.
    service = resource("Service", "llm-proxy-redis")
    env = pod_environment(container(proxy_deployment()), secret_values())
    assert env["REDIS_URL"].endswith(
        f"@{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0")
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
