#!/usr/bin/env python3
"""Check the Herald Helm chart (helm/herald) the way an install would use it.

Lints the chart, renders it offline with its default values, with
helm/herald/ci/production-values.yaml and with a set of less common values
(VARIANT_VALUES below), validates every rendered object against
the Kubernetes schemas that kubernetes-validate ships (the oldest version the
chart's kubeVersion allows, and the newest), then asserts what a running
release relies on:

- a Deployment for each of the five services runs its binary, with startup,
  liveness and readiness probes on the port its health server listens on;
- every HERALD_* variable the chart sets is one the services read (grepped
  from crates/*/src, else docs/configuration.md, else skipped with a warning);
- each service gets the connections and secrets it needs, from the Secret the
  release uses, and the admin finds its API keys file where it is told to;
- every service gets the NATS credentials and TLS files the values name: a
  token or NKey seed from the named Secret's key, a credentials file, CA and
  client certificate at paths really mounted from the named Secret's key, and
  HERALD_NATS_TLS_REQUIRED as configured;
- the image tag defaults to appVersion, and appVersion is the Cargo workspace
  version;
- security contexts are restricted, service links are off, pods get longer to
  stop than the services take to drain;
- PDBs, HPAs, Services, the Ingress and the ServiceMonitors point at objects
  that exist;
- values.schema.json refuses wrong values at install, accepts the URL forms
  the services accept, and the templates refuse NATS settings the services
  would refuse (two ways to authenticate, a certificate without its key).

Needs (installed by `make helm-check`, not here):
    pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0
Run from anywhere:
    python3 scripts/helm-check.py
Exits 1 when any check fails, naming each failure; 0 otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "herald"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
RELEASE = "herald"
NAMESPACE = "herald"
PINS = "helm-python-sdk==0.2.2 kubernetes-validate==1.37.0"

try:
    import helm_python
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as error:  # pragma: no cover - depends on the machine
    sys.exit(f"helm-check: missing Python package ({error}); run: pip install {PINS}")


@dataclass(frozen=True)
class Service:
    """What the chart must give one service."""

    addr_env: str
    redis: bool
    secret_key: bool


# The services' contract: the variable naming each health server's address,
# and which of the secrets each one reads.
SERVICES = {
    "ingest": Service("HERALD_INGEST_HEALTH_ADDR", redis=False, secret_key=False),
    "matcher": Service("HERALD_MATCHER_HEALTH_ADDR", redis=True, secret_key=False),
    "deliverer": Service("HERALD_DELIVERER_HEALTH_ADDR", redis=True, secret_key=True),
    "log-writer": Service("HERALD_LOG_WRITER_HEALTH_ADDR", redis=True, secret_key=False),
    "admin": Service("HERALD_ADMIN_HEALTH_ADDR", redis=True, secret_key=True),
}

SECRET_ENV = ("HERALD_NATS_URL", "HERALD_REDIS_URL", "HERALD_SECRET_KEY")
# NATS variables passed from a key of a Secret, and the nats.auth value naming the key.
NATS_SECRET_ENV = {"HERALD_NATS_TOKEN": "tokenKey", "HERALD_NATS_NKEY": "nkeyKey"}
# NATS variables naming a file, and the nats.<block> value naming the Secret key mounted there.
NATS_FILE_ENV = {
    "HERALD_NATS_CREDS": ("auth", "credsKey"),
    "HERALD_NATS_TLS_CA": ("tls", "caKey"),
    "HERALD_NATS_TLS_CERT": ("tls", "certKey"),
    "HERALD_NATS_TLS_KEY": ("tls", "keyKey"),
}
NATS_AUTH_ENV = ("HERALD_NATS_TOKEN", "HERALD_NATS_NKEY", "HERALD_NATS_CREDS")
SECRET_FILE_MODE = 0o440
API_KEYS_ITEM = "api-keys.json"
COMPONENT_LABEL = "app.kubernetes.io/component"

# Values that values.schema.json must refuse, so a typo fails the install
# instead of starting a misconfigured release.
SCHEMA_REJECTS = [
    ("a replica count given as a word", {"deliverer": {"replicas": "three"}}),
    ("a misspelled service key", {"delivrer": {"replicas": 3}}),
    ("a retry schedule that is not a list of durations", {"config": {"retrySchedule": "5 seconds"}}),
    ("zero stream replicas", {"config": {"streamReplicas": 0}}),
    ("a loopback listen address, which probes cannot reach", {"listenHost": "127.0.0.1"}),
    ("an unknown image pull policy", {"image": {"pullPolicy": "Sometimes"}}),
    (
        "an API key entry without a SHA-256",
        {"secrets": {"apiKeys": [{"key_sha256": "not-hex", "organizations": ["acme"], "default_organization": "acme"}]}},
    ),
    (
        "an API key entry without a default organization",
        {"secrets": {"apiKeys": [{"key_sha256": "a" * 64, "organizations": ["acme"]}]}},
    ),
    ("a privileged service port", {"admin": {"port": 80}}),
    ("a privileged API port", {"admin": {"apiPort": 443}}),
    ("an encryption key that is not 32 bytes of base64", {"secrets": {"secretKey": "hunter2"}}),
    ("a websocket NATS URL, which the services refuse", {"secrets": {"natsUrl": "wss://nats.example:443"}}),
    ("a NATS server list with an empty entry", {"secrets": {"natsUrl": "nats://a:4222,"}}),
    ("a Redis URL that is not redis:// or rediss://", {"secrets": {"redisUrl": "http://redis:6379"}}),
    ("a Redis node list with an empty entry", {"secrets": {"redisUrl": "redis://a:6379,"}}),
    ("an unknown NATS auth setting", {"nats": {"auth": {"passwordKey": "password"}}}),
    ("a NATS auth Secret name that Kubernetes refuses", {"nats": {"auth": {"existingSecret": "NATS_Auth"}}}),
    ("a NATS TLS key name with a slash", {"nats": {"tls": {"existingSecret": "nats-tls", "caKey": "certs/ca.crt"}}}),
    ("nats.tls.required given as a word", {"nats": {"tls": {"required": "yes"}}}),
]

# Values the schema lets through but the templates must refuse with a message
# naming the problem (each would stop every service at start, or connect
# without what was asked for): (reason, values, part of the message).
RENDER_REJECTS = [
    (
        "two ways to authenticate to NATS (token and credentials file)",
        {"nats": {"auth": {"existingSecret": "nats-auth", "tokenKey": "token", "credsKey": "herald.creds"}}},
        "set one of tokenKey, nkeyKey and credsKey",
    ),
    (
        "two ways to authenticate to NATS (NKey seed and token)",
        {"nats": {"auth": {"existingSecret": "nats-auth", "nkeyKey": "seed", "tokenKey": "token"}}},
        "set one of tokenKey, nkeyKey and credsKey",
    ),
    (
        "a NATS token with credentials in the chart-made NATS URL",
        {
            "secrets": {"natsUrl": "nats://herald:pw@nats:4222"},
            "nats": {"auth": {"existingSecret": "nats-auth", "tokenKey": "token"}},
        },
        "secrets.natsUrl carries credentials",
    ),
    (
        "a client certificate without its key",
        {"nats": {"tls": {"existingSecret": "nats-tls", "certKey": "tls.crt"}}},
        "certKey is set without nats.tls.keyKey",
    ),
    (
        "a client key without its certificate",
        {"nats": {"tls": {"existingSecret": "nats-tls", "keyKey": "tls.key"}}},
        "keyKey is set without nats.tls.certKey",
    ),
    (
        "a NATS token key without the Secret that holds it",
        {"nats": {"auth": {"tokenKey": "token"}}},
        "nats.auth.existingSecret is empty",
    ),
    (
        "a NATS credentials key without the Secret that holds it",
        {"nats": {"auth": {"credsKey": "herald.creds"}}},
        "nats.auth.existingSecret is empty",
    ),
    (
        "a client certificate without the Secret that holds it",
        {"nats": {"tls": {"certKey": "tls.crt", "keyKey": "tls.key"}}},
        "nats.tls.existingSecret is empty",
    ),
    (
        "a NATS auth Secret that names no key",
        {"nats": {"auth": {"existingSecret": "nats-auth"}}},
        "nats.auth.existingSecret is set but names no key",
    ),
    (
        "a NATS TLS Secret that names no key",
        {"nats": {"tls": {"existingSecret": "nats-tls", "caKey": ""}}},
        "nats.tls.existingSecret is set but names no key",
    ),
]

# Values the schema must let through: the URL forms the services accept
# (crates/platform/src/config.rs for NATS, crates/platform/src/redis.rs for Redis).
SCHEMA_ACCEPTS = [
    ("Redis over TLS", {"secrets": {"redisUrl": "rediss://:pw@redis.example:6380/0"}}),
    ("a Redis Cluster as redis+cluster://", {"secrets": {"redisUrl": "redis+cluster://:pw@r0:6379,r1:6379,r2:6379/"}}),
    ("a Redis Cluster over TLS", {"secrets": {"redisUrl": "rediss+cluster://herald:pw@r0:6379,r1:6379"}}),
    ("a Redis Cluster as a list of node URLs", {"secrets": {"redisUrl": "rediss://r0:6379, rediss://r1:6379"}}),
    ("a Valkey URL", {"secrets": {"redisUrl": "valkeys://valkey.example:6380"}}),
    ("a list of NATS servers with credentials", {"secrets": {"natsUrl": "nats://herald:s%40cret@n0:4222,nats://n1:4222"}}),
    ("NATS over TLS, servers without a scheme", {"secrets": {"natsUrl": "tls://n0:4222, n1:4222,[::1]:4222"}}),
    ("TLS required with the system's root certificates", {"nats": {"tls": {"required": True}}}),
]

# Less common settings, rendered and checked like the two values files, so the
# templates' other branches are exercised too.
VARIANT_VALUES = {
    "listenHost": "[::]",
    "image": {"digest": "sha256:" + "0" * 64},
    "serviceAccount": {"create": False, "name": "herald-runner"},
    "spreadAcrossNodes": False,
    "secrets": {"apiKeys": [{"key_sha256": "a" * 64, "organizations": ["acme"], "default_organization": "acme"}]},
    "config": {"streamReplicas": 1, "extraEventTypes": ["invoice.approved"], "allowHttp": True},
    "otel": {"endpoint": "http://otel-collector:4317"},
    "deliverer": {"autoscaling": {"enabled": False}, "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}]},
    "admin": {"podDisruptionBudget": {"enabled": False}, "service": {"type": "LoadBalancer", "port": 443}},
    "ingress": {"enabled": True, "host": "herald.internal", "tls": {"enabled": False}},
    # A token, and TLS checked against a private CA without a client certificate.
    "nats": {
        "auth": {"existingSecret": "nats-client", "tokenKey": "token"},
        "tls": {"existingSecret": "nats-ca", "caKey": "ca.pem", "required": True},
    },
}

# NATS's other branches: an NKey seed, and a client certificate checked by
# the system's root certificates (no CA key); the chart makes the Secret.
NKEY_VARIANT_VALUES = {
    "secrets": {"natsUrl": "tls://nats-0.nats:4222,tls://nats-1.nats:4222", "redisUrl": "rediss+cluster://r0:6379,r1:6379"},
    "nats": {
        "auth": {"existingSecret": "nats-client", "nkeyKey": "seed"},
        "tls": {"existingSecret": "nats-client-cert", "caKey": "", "certKey": "tls.crt", "keyKey": "tls.key"},
    },
}

# kubernetes-validate ships no schema for the Prometheus Operator's CRD; this
# covers every field the chart writes, and refuses any other.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


class Report:
    """Collects every failure, so one run shows all that is wrong."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []
        self.warnings: list[str] = []

    def check(self, ok: bool, message: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(message)
            print(f"FAIL: {message}")
        return ok

    def fail(self, message: str) -> None:
        self.check(False, message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"warning: {message}")


@dataclass
class EnvVar:
    """A container variable: its literal value, or the Secret key it comes from."""

    value: str | None
    secret: tuple[str, str] | None
    source: str


@dataclass
class Rendered:
    label: str
    values: dict[str, Any]
    objects: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"]: o for o in self.objects if o.get("kind") == kind}


def main() -> int:
    report = Report()
    chart = helm_python.Chart.load(CHART)
    metadata = chart.metadata
    print(
        f"helm-check: chart {metadata['name']} {metadata['version']} (appVersion {metadata['appVersion']}),"
        f" Helm SDK {helm_python.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.version.__version__}"
    )

    check_versions(report, metadata)
    known_env = known_env_names(report)
    kube_versions = kube_versions_to_validate(report, metadata)

    production = helm_python.values_from_yaml(PRODUCTION_VALUES.read_text())
    specifics = {
        "default": check_default_specifics,
        "production": check_production_specifics,
        "variants": check_variant_specifics,
        "variants-nkey": check_nkey_variant_specifics,
    }
    for label, overrides in (
        ("default", {}),
        ("production", production),
        ("variants", VARIANT_VALUES),
        ("variants-nkey", NKEY_VARIANT_VALUES),
    ):
        lint(report, label, overrides, kube_versions[0])
        rendered = render(report, chart, label, overrides)
        if rendered is None:
            continue
        validate_objects(report, rendered, kube_versions)
        check_release(report, rendered, metadata, known_env)
        specifics[label](report, chart, rendered)

    check_schema_rejects(report, chart)
    check_schema_accepts(report, chart)
    check_render_rejects(report, chart)
    chart.close()

    print(
        f"helm-check: {report.passed} checks passed, {len(report.failures)} failed,"
        f" {len(report.warnings)} warnings"
    )
    if report.failures:
        print("helm-check: FAILED:", file=sys.stderr)
        for failure in report.failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    return 0


# --- versions ---------------------------------------------------------------


def check_versions(report: Report, metadata: dict[str, Any]) -> None:
    report.check(
        re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", str(metadata.get("version", ""))) is not None,
        f"Chart.yaml version {metadata.get('version')!r} is not a semantic version",
    )
    cargo = ROOT / "Cargo.toml"
    if not cargo.exists():
        report.warn("Cargo.toml is absent: skipped the check that appVersion equals the workspace version")
        return
    manifest = tomllib.loads(cargo.read_text())
    workspace_version = manifest.get("workspace", {}).get("package", {}).get("version")
    if workspace_version is None:
        report.fail("Cargo.toml has no [workspace.package] version to compare appVersion with")
        return
    report.check(
        str(metadata.get("appVersion")) == workspace_version,
        f"Chart.yaml appVersion {metadata.get('appVersion')!r} differs from the Cargo workspace version"
        f" {workspace_version!r}: bump them together",
    )


def known_env_names(report: Report) -> set[str] | None:
    """The HERALD_* names the services read, or None when nothing says yet."""
    literal = re.compile(r'"(HERALD_[A-Z0-9_]+)"')
    sources = sorted((ROOT / "crates").glob("*/src/**/*.rs"))
    names = {name for path in sources for name in literal.findall(path.read_text(errors="replace"))}
    if names:
        print(f"helm-check: {len(names)} HERALD_* names read by the services ({len(sources)} files under crates/*/src)")
        return names
    table = ROOT / "docs" / "configuration.md"
    if table.exists():
        names = set(re.findall(r"`(HERALD_[A-Z0-9_]+)", table.read_text()))
        if names:
            report.warn("no HERALD_* literal under crates/*/src yet: checking names against docs/configuration.md")
            return names
    report.warn(
        "no HERALD_* literal under crates/*/src and no docs/configuration.md: skipped the check"
        " that every HERALD_* variable the chart sets is read by a service"
    )
    return None


def kube_versions_to_validate(report: Report, metadata: dict[str, Any]) -> list[str]:
    """The oldest Kubernetes the chart claims (kubeVersion) and the newest shipped."""
    shipped = kubernetes_validate.utils.all_versions()
    newest = shipped[-1]
    match = re.search(r">=\s*v?(\d+)\.(\d+)", str(metadata.get("kubeVersion", "")))
    if not report.check(match is not None, "Chart.yaml kubeVersion names no minimum (>=1.N)"):
        return [newest]
    oldest = f"{match.group(1)}.{match.group(2)}.0"
    if oldest not in shipped:
        report.warn(f"kubernetes-validate ships no schema for {oldest}; validating against {shipped[0]} instead")
        oldest = shipped[0]
    return [oldest, newest] if oldest != newest else [newest]


# --- lint and render --------------------------------------------------------


def lint(report: Report, label: str, values: dict[str, Any], kube_version: str) -> None:
    result = helm_python.lint(
        str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}"
    )
    # Severity 1 is information ("icon is recommended"); 2 and 3 are findings.
    findings = [m for m in result.get("messages", []) if m.get("severity", 0) >= 2]
    for message in findings:
        report.fail(f"[{label}] helm lint: {message.get('path')}: {message.get('error', '').strip()}")
    for error in result.get("errors", []):
        if not any(error.strip() in m.get("error", "") for m in findings):
            report.fail(f"[{label}] helm lint: {error.strip()}")
    report.check(result.get("total_charts_linted") == 1, f"[{label}] helm lint linted no chart")


def render(report: Report, chart: Any, label: str, overrides: dict[str, Any]) -> Rendered | None:
    try:
        manifests = chart.render(overrides, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm_python.HelmError as error:
        report.fail(f"[{label}] the chart does not render: {error}")
        return None
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        try:
            documents = [d for d in yaml.safe_load_all(text) if d]
        except yaml.YAMLError as error:
            report.fail(f"[{label}] {path} renders invalid YAML: {error}")
            continue
        for document in documents:
            if report.check(
                isinstance(document, dict) and "kind" in document and "metadata" in document,
                f"[{label}] {path} renders a document that is not a Kubernetes object",
            ):
                objects.append(document)
    report.check(bool(notes.strip()), f"[{label}] NOTES.txt renders empty")
    identities = [(o["kind"], o["metadata"].get("namespace"), o["metadata"].get("name")) for o in objects]
    for identity in sorted({i for i in identities if identities.count(i) > 1}):
        report.fail(f"[{label}] the chart renders {identity[0]} {identity[2]} more than once")
    return Rendered(label, chart.merge_values(overrides), objects, notes)


def validate_objects(report: Report, rendered: Rendered, kube_versions: list[str]) -> None:
    for obj in rendered.objects:
        what = f"[{rendered.label}] {obj['kind']} {obj['metadata'].get('name')}"
        if obj.get("apiVersion") == "monitoring.coreos.com/v1" and obj["kind"] == "ServiceMonitor":
            errors = list(jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(obj))
            report.check(not errors, f"{what}: {'; '.join(e.message for e in errors)}")
            continue
        for version in kube_versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                report.check(True, "")
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(p) for p in error.path) or "(top)"
                report.fail(f"{what} is invalid for Kubernetes {version}: {where}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                report.fail(f"{what}: {error.message}")


# --- the release ------------------------------------------------------------


def check_release(
    report: Report, rendered: Rendered, metadata: dict[str, Any], known_env: set[str] | None
) -> None:
    label, values = rendered.label, rendered.values
    deployments = rendered.of_kind("Deployment")
    config_maps = rendered.of_kind("ConfigMap")
    secrets = rendered.of_kind("Secret")
    existing_secret = values["secrets"].get("existingSecret") or ""
    image = values["image"]
    if image.get("digest"):
        expected_image = f"{image['repository']}@{image['digest']}"
    else:
        expected_image = f"{image['repository']}:{image.get('tag') or metadata['appVersion']}"

    herald_names: dict[str, str] = {}  # HERALD_* name -> where the chart sets it
    for name, cm in config_maps.items():
        for key in cm.get("data") or {}:
            herald_names.setdefault(key, f"[{label}] ConfigMap {name}")
    for name, secret in secrets.items():
        for key in secret.get("data") or {}:
            herald_names.setdefault(key, f"[{label}] Secret {name}")

    workloads: dict[str, dict[str, Any]] = {}
    for service_name, service in SERVICES.items():
        found = [d for d in deployments.values() if labels_of(d).get(COMPONENT_LABEL) == service_name]
        if not report.check(len(found) == 1, f"[{label}] expected one Deployment for {service_name}, found {len(found)}"):
            continue
        deployment = found[0]
        workloads[service_name] = deployment
        what = f"[{label}] Deployment {deployment['metadata']['name']}"
        pod = deployment["spec"]["template"]["spec"]
        containers = pod.get("containers", [])
        if not report.check(len(containers) == 1, f"{what}: expected one container, found {len(containers)}"):
            continue
        container = containers[0]
        env = resolve_env(report, what, container, config_maps, secrets)
        for env_name, var in env.items():
            herald_names.setdefault(env_name, var.source)

        command = container.get("command") or []
        report.check(
            bool(command) and Path(command[0]).name == f"herald-{service_name}" and len(command) == 1,
            f"{what}: command should be [herald-{service_name}] (the binaries take no arguments), got {command}",
        )
        report.check(
            container.get("image") == expected_image,
            f"{what}: image {container.get('image')!r}, expected {expected_image!r}",
        )
        check_probes(report, what, service, container, env)
        check_security(report, what, pod, container)
        check_secrets(report, what, service_name, service, pod, container, env, existing_secret, secrets)
        check_nats(report, what, pod, container, env, values["nats"])
        check_mount_nesting(report, what, pod, container)
        check_grace(report, what, pod, env)
        report.check(
            pod.get("enableServiceLinks") is False,
            f"{what}: enableServiceLinks must be false, or Kubernetes injects HERALD_ADMIN_PORT and the like",
        )
        report.check(
            "HERALD_STREAM_REPLICAS" in env,
            f"{what}: HERALD_STREAM_REPLICAS is not set, so streams would be created with one replica",
        )

    if known_env is not None:
        for env_name, source in sorted(herald_names.items()):
            if env_name.startswith("HERALD_"):
                report.check(
                    env_name in known_env,
                    f"{source} sets {env_name}, which no service reads (not a quoted literal in crates/*/src)",
                )

    check_pdbs(report, rendered, workloads)
    check_hpas(report, rendered, workloads)
    check_admin_exposure(report, rendered, workloads)
    check_service_monitors(report, rendered)


def labels_of(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"].get("labels") or {}


def resolve_env(
    report: Report,
    what: str,
    container: dict[str, Any],
    config_maps: dict[str, dict[str, Any]],
    secrets: dict[str, dict[str, Any]],
) -> dict[str, EnvVar]:
    """The container's environment as Kubernetes builds it: envFrom, then env."""
    env: dict[str, EnvVar] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            if report.check(name in config_maps, f"{what}: envFrom names ConfigMap {name}, which the chart does not make"):
                for key, value in (config_maps[name].get("data") or {}).items():
                    env[key] = EnvVar(str(value), None, f"ConfigMap {name}")
        elif "secretRef" in source:
            name = source["secretRef"]["name"]
            for key in (secrets.get(name, {}).get("data") or {}):
                env[key] = EnvVar(None, (name, key), f"Secret {name}")
    for item in container.get("env") or []:
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            env[item["name"]] = EnvVar(None, (ref["name"], ref["key"]), f"{what} env (Secret {ref['name']})")
        else:
            env[item["name"]] = EnvVar(item.get("value"), None, f"{what} env")
    return env


def check_probes(
    report: Report, what: str, service: Service, container: dict[str, Any], env: dict[str, EnvVar]
) -> None:
    addr = env.get(service.addr_env)
    if not report.check(
        addr is not None and addr.value is not None,
        f"{what}: {service.addr_env} is not set, so the health server would listen on loopback only",
    ):
        return
    host, _, port_text = addr.value.rpartition(":")
    report.check(
        host not in ("127.0.0.1", "localhost", "[::1]", ""),
        f"{what}: {service.addr_env}={addr.value} listens on loopback, where the kubelet's probes cannot reach",
    )
    if not report.check(port_text.isdigit(), f"{what}: {service.addr_env}={addr.value} has no port"):
        return
    port = int(port_text)
    container_ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    report.check(
        port in container_ports.values(),
        f"{what}: no containerPort {port} for the server at {service.addr_env}={addr.value}",
    )
    for probe_name, path in (("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        probe = container.get(probe_name)
        if not report.check(
            probe is not None and "httpGet" in probe, f"{what}: no {probe_name} with httpGet"
        ):
            continue
        probe_port = probe["httpGet"].get("port")
        resolved = container_ports.get(probe_port) if isinstance(probe_port, str) else probe_port
        report.check(
            resolved == port,
            f"{what}: {probe_name} targets port {probe_port!r} ({resolved}), but {service.addr_env} listens on {port}",
        )
        report.check(
            probe["httpGet"].get("path") == path,
            f"{what}: {probe_name} path is {probe['httpGet'].get('path')!r}, expected {path}",
        )


def check_security(report: Report, what: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    pod_sc = pod.get("securityContext") or {}
    sc = container.get("securityContext") or {}

    def effective(key: str) -> Any:
        return sc.get(key, pod_sc.get(key))

    report.check(effective("runAsNonRoot") is True, f"{what}: runAsNonRoot is not true")
    report.check(effective("runAsUser") != 0, f"{what}: runs as user 0")
    report.check(sc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation is not false")
    report.check(sc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem is not true")
    report.check(
        "ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{what}: capabilities do not drop ALL"
    )
    added = (sc.get("capabilities") or {}).get("add")
    report.check(not added, f"{what}: adds capabilities {added}")
    report.check(
        (effective("seccompProfile") or {}).get("type") == "RuntimeDefault",
        f"{what}: seccompProfile is not RuntimeDefault",
    )
    report.check(pod.get("automountServiceAccountToken") is False, f"{what}: mounts a service account token it never uses")


def check_secrets(
    report: Report,
    what: str,
    service_name: str,
    service: Service,
    pod: dict[str, Any],
    container: dict[str, Any],
    env: dict[str, EnvVar],
    existing_secret: str,
    secrets: dict[str, dict[str, Any]],
) -> None:
    needed = ["HERALD_NATS_URL"]
    needed += ["HERALD_REDIS_URL"] if service.redis else []
    needed += ["HERALD_SECRET_KEY"] if service.secret_key else []
    for env_name in needed:
        var = env.get(env_name)
        if not report.check(var is not None, f"{what}: {env_name} is not set"):
            continue
        if not report.check(
            var.secret is not None, f"{what}: {env_name} may carry credentials and must come from a Secret"
        ):
            continue
        check_secret_key(report, what, env_name, var.secret, existing_secret, secrets)

    if service_name != "admin":
        return
    keys_file = env.get("HERALD_API_KEYS_FILE")
    if not report.check(
        keys_file is not None and keys_file.value, f"{what}: HERALD_API_KEYS_FILE is not set; the admin API would refuse to start"
    ):
        return
    served = secret_files(pod, container).get(keys_file.value)
    if report.check(
        served is not None and served.key == API_KEYS_ITEM,
        f"{what}: HERALD_API_KEYS_FILE={keys_file.value} is not a file mounted from the Secret's {API_KEYS_ITEM}",
    ):
        check_secret_key(report, what, "the API keys file", (served.secret, served.key), existing_secret, secrets)


@dataclass
class SecretFile:
    """A file in the container that a Secret's key is mounted as."""

    secret: str
    key: str
    read_only: bool
    mode: int | None


def secret_files(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, SecretFile]:
    """Every file the container sees from a Secret volume's items, by path."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    files: dict[str, SecretFile] = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"], {})
        if "secret" not in volume:
            continue
        for item in volume["secret"].get("items") or []:
            if mount.get("subPath"):
                if mount["subPath"] != item["path"]:
                    continue
                path = mount["mountPath"]
            else:
                path = f"{mount['mountPath'].rstrip('/')}/{item['path']}"
            files[path] = SecretFile(
                volume["secret"]["secretName"],
                item["key"],
                mount.get("readOnly") is True,
                item.get("mode", volume["secret"].get("defaultMode")),
            )
    return files


def check_nats(
    report: Report, what: str, pod: dict[str, Any], container: dict[str, Any], env: dict[str, EnvVar], nats: dict[str, Any]
) -> None:
    """NATS credentials and TLS reach the service as nats.auth and nats.tls say."""
    auth, tls = nats["auth"], nats["tls"]
    for env_name, key_field in NATS_SECRET_ENV.items():
        var, key = env.get(env_name), auth.get(key_field)
        if not key:
            report.check(var is None, f"{what}: sets {env_name} though nats.auth.{key_field} is empty")
            continue
        if not report.check(var is not None, f"{what}: {env_name} is not set, though nats.auth.{key_field} is {key!r}"):
            continue
        report.check(
            var.secret == (auth["existingSecret"], key),
            f"{what}: {env_name} comes from {var.secret or 'a literal value'}, expected key {key!r} of Secret"
            f" {auth['existingSecret']!r}",
        )

    files = secret_files(pod, container)
    for env_name, (block, key_field) in NATS_FILE_ENV.items():
        settings = nats[block]
        var = env.get(env_name)
        key = settings.get(key_field) if settings.get("existingSecret") else ""
        if not key:
            report.check(var is None, f"{what}: sets {env_name} though nats.{block} names no {key_field}")
            continue
        if not report.check(
            var is not None and bool(var.value),
            f"{what}: {env_name} is not set to a path, though nats.{block}.{key_field} is {key!r}",
        ):
            continue
        served = files.get(var.value)
        if not report.check(
            served is not None, f"{what}: {env_name}={var.value} is not a file mounted from a Secret"
        ):
            continue
        report.check(
            (served.secret, served.key) == (settings["existingSecret"], key),
            f"{what}: {env_name}={var.value} is key {served.key!r} of Secret {served.secret!r}, expected key"
            f" {key!r} of Secret {settings['existingSecret']!r}",
        )
        report.check(served.read_only, f"{what}: the volume holding {env_name}={var.value} is not mounted read-only")
        report.check(
            served.mode == SECRET_FILE_MODE,
            f"{what}: {env_name}={var.value} has mode {oct(served.mode) if served.mode is not None else 'default (0644)'},"
            f" expected {oct(SECRET_FILE_MODE)}",
        )

    required = env.get("HERALD_NATS_TLS_REQUIRED")
    wanted = "true" if tls.get("required") else "false"
    report.check(
        required is not None and required.value == wanted,
        f"{what}: HERALD_NATS_TLS_REQUIRED is {required.value if required else None!r}, expected {wanted!r}"
        " (nats.tls.required)",
    )
    methods = [name for name in NATS_AUTH_ENV if name in env]
    report.check(len(methods) <= 1, f"{what}: gives NATS {len(methods)} ways to authenticate ({methods}); services refuse two")


def check_mount_nesting(report: Report, what: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    """No two mounts share a path, and none sits inside a Secret's volume.

    Secret volumes are mounted read-only: a mount inside one needs its
    directory made there first, which some runtimes have failed at
    (kubernetes#60342, kata-containers#3140).
    """
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = [(m["mountPath"].rstrip("/"), m["name"]) for m in container.get("volumeMounts") or []]
    paths = [path for path, _ in mounts]
    report.check(len(paths) == len(set(paths)), f"{what}: two volumes mount at the same path ({sorted(paths)})")
    for path, name in mounts:
        if "secret" not in volumes.get(name, {}):
            continue
        inside = [other for other in paths if other.startswith(path + "/")]
        report.check(not inside, f"{what}: {inside} mounted inside Secret volume {name} at {path}; give each its own directory")


def check_secret_key(
    report: Report,
    what: str,
    purpose: str,
    ref: tuple[str, str],
    existing_secret: str,
    secrets: dict[str, dict[str, Any]],
) -> None:
    name, key = ref
    if existing_secret:
        report.check(
            name == existing_secret and not secrets,
            f"{what}: {purpose} comes from Secret {name}, but secrets.existingSecret is {existing_secret}"
            f" (and the chart should make no Secret of its own)",
        )
        return
    if report.check(name in secrets, f"{what}: {purpose} comes from Secret {name}, which the chart does not make"):
        report.check(key in (secrets[name].get("data") or {}), f"{what}: Secret {name} has no key {key} for {purpose}")


def check_grace(report: Report, what: str, pod: dict[str, Any], env: dict[str, EnvVar]) -> None:
    grace = env.get("HERALD_SHUTDOWN_GRACE")
    if not report.check(grace is not None and grace.value is not None, f"{what}: HERALD_SHUTDOWN_GRACE is not set"):
        return
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", grace.value)
    if not report.check(match is not None, f"{what}: HERALD_SHUTDOWN_GRACE={grace.value} is not a duration"):
        return
    seconds = int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    report.check(
        pod.get("terminationGracePeriodSeconds", 30) > seconds,
        f"{what}: terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} does not exceed"
        f" HERALD_SHUTDOWN_GRACE={grace.value}, so Kubernetes would kill pods mid-drain",
    )


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_pdbs(report: Report, rendered: Rendered, workloads: dict[str, dict[str, Any]]) -> None:
    pdbs = rendered.of_kind("PodDisruptionBudget")
    for service_name, deployment in workloads.items():
        covering = [
            name for name, pdb in pdbs.items()
            if selects(pdb["spec"]["selector"].get("matchLabels") or {}, labels_of(deployment))
        ]
        wanted = 1 if values_of(rendered, service_name)["podDisruptionBudget"]["enabled"] else 0
        report.check(
            len(covering) == wanted,
            f"[{rendered.label}] {service_name}: expected {wanted} PodDisruptionBudget selecting its pods, found {covering}",
        )


def values_of(rendered: Rendered, service_name: str) -> dict[str, Any]:
    """A service's block of values: `log-writer` is `logWriter`."""
    head, *rest = service_name.split("-")
    return rendered.values[head + "".join(word.capitalize() for word in rest)]


def check_hpas(report: Report, rendered: Rendered, workloads: dict[str, dict[str, Any]]) -> None:
    by_name = {d["metadata"]["name"]: s for s, d in workloads.items()}
    scaled = set()
    for name, hpa in rendered.of_kind("HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        if report.check(
            target.get("kind") == "Deployment" and target.get("name") in by_name,
            f"[{rendered.label}] HorizontalPodAutoscaler {name} targets {target}, which the chart does not make",
        ):
            scaled.add(by_name[target["name"]])
    for service_name, deployment in workloads.items():
        has_replicas = "replicas" in deployment["spec"]
        report.check(
            has_replicas != (service_name in scaled),
            f"[{rendered.label}] Deployment {deployment['metadata']['name']}: "
            + ("sets replicas while an HPA scales it (each upgrade would reset the scale)"
               if has_replicas else "sets no replicas and no HPA scales it"),
        )


def check_admin_exposure(report: Report, rendered: Rendered, workloads: dict[str, dict[str, Any]]) -> None:
    label = rendered.label
    admin = workloads.get("admin")
    if admin is None:
        return
    services = rendered.of_kind("Service")
    # The headless Service a ServiceMonitor scrapes is not the API's.
    fronting = [
        s
        for s in services.values()
        if selects(s["spec"].get("selector") or {}, labels_of(admin))
        and (s["metadata"].get("labels") or {}).get("herald.io/metrics") != "true"
    ]
    for name, s in services.items():
        if (s["metadata"].get("labels") or {}).get("herald.io/metrics") == "true":
            report.check(
                s["spec"].get("clusterIP") == "None" and s["spec"].get("type", "ClusterIP") == "ClusterIP",
                f"[{label}] metrics Service {name} must be headless and internal",
            )
    if not report.check(len(fronting) == 1, f"[{label}] expected one Service for the admin API, found {len(fronting)}"):
        return
    service = fronting[0]
    container = admin["spec"]["template"]["spec"]["containers"][0]
    container_ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    env_addr = next((e.get("value") for e in container.get("env") or [] if e["name"] == "HERALD_ADMIN_ADDR"), "")
    admin_port = int(env_addr.rpartition(":")[2]) if env_addr.rpartition(":")[2].isdigit() else None
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        resolved = container_ports.get(target) if isinstance(target, str) else target
        report.check(
            resolved == admin_port,
            f"[{label}] Service {service['metadata']['name']} sends port {port['port']} to {target!r} ({resolved}),"
            f" but the admin API listens on {admin_port}",
        )
    for name, ingress in rendered.of_kind("Ingress").items():
        for rule in ingress["spec"].get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                backend = path["backend"]["service"]
                report.check(
                    backend["name"] == service["metadata"]["name"],
                    f"[{label}] Ingress {name} sends {path.get('path')} to Service {backend['name']}, not the admin API",
                )
                port_names = {p.get("name") for p in service["spec"]["ports"]}
                port_numbers = {p["port"] for p in service["spec"]["ports"]}
                report.check(
                    backend["port"].get("name") in port_names or backend["port"].get("number") in port_numbers,
                    f"[{label}] Ingress {name} uses port {backend['port']}, which Service {backend['name']} lacks",
                )


def check_service_monitors(report: Report, rendered: Rendered) -> None:
    services = rendered.of_kind("Service")
    for name, monitor in rendered.of_kind("ServiceMonitor").items():
        selector = monitor["spec"]["selector"].get("matchLabels") or {}
        selected = [s for s in services.values() if selects(selector, s["metadata"].get("labels") or {})]
        if not report.check(
            len(selected) == 1, f"[{rendered.label}] ServiceMonitor {name} selects {len(selected)} Services, expected 1"
        ):
            continue
        port_names = {p.get("name") for p in selected[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            report.check(
                endpoint["port"] in port_names,
                f"[{rendered.label}] ServiceMonitor {name} scrapes port {endpoint['port']!r},"
                f" which Service {selected[0]['metadata']['name']} lacks",
            )
            report.check(endpoint.get("path") == "/metrics", f"[{rendered.label}] ServiceMonitor {name} path is not /metrics")


# --- what each values file must produce -------------------------------------


def check_default_specifics(report: Report, chart: Any, rendered: Rendered) -> None:
    """A plain `helm install` works: the image is the appVersion, only the deliverer autoscales."""
    defaults = chart.values
    report.check(
        not defaults["image"].get("tag") and not defaults["image"].get("digest"),
        f"values.yaml pins image tag {defaults['image'].get('tag')!r} or digest; leave both empty so the"
        " image follows appVersion",
    )
    hpas = {h["spec"]["scaleTargetRef"]["name"] for h in rendered.of_kind("HorizontalPodAutoscaler").values()}
    report.check(
        hpas == {f"{RELEASE}-deliverer"},
        f"[default] autoscaling should be on for the deliverer only, found HPAs for {sorted(hpas)}",
    )
    report.check("port-forward" in rendered.notes, "[default] NOTES.txt does not say how to port-forward to the API")
    config = next(iter(rendered.of_kind("ConfigMap").values()), {}).get("data") or {}
    report.check(
        config.get("HERALD_STREAM_REPLICAS") == "3",
        f"[default] HERALD_STREAM_REPLICAS is {config.get('HERALD_STREAM_REPLICAS')!r}, expected '3' for a 3-node NATS cluster",
    )
    secrets = rendered.of_kind("Secret")
    if not report.check(len(secrets) == 1, f"[default] expected the chart to make one Secret, found {len(secrets)}"):
        return
    data = {k: base64.b64decode(v).decode() for k, v in (next(iter(secrets.values())).get("data") or {}).items()}
    for key in (*SECRET_ENV, API_KEYS_ITEM):
        report.check(bool(data.get(key)), f"[default] the chart's Secret has no {key}")
    try:
        keys = json.loads(data.get(API_KEYS_ITEM, ""))["keys"]
    except (ValueError, KeyError, TypeError) as error:
        report.fail(f"[default] {API_KEYS_ITEM} is not a {{\"keys\": [...]}} document: {error}")
        return
    report.check(len(keys) == 1, f"[default] expected one generated operator key, found {len(keys)}")
    operator_key = data.get("operator-api-key", "")
    for entry in keys:
        report.check(
            entry.get("key_sha256") == hashlib.sha256(operator_key.encode()).hexdigest(),
            "[default] the generated key's key_sha256 is not the SHA-256 of operator-api-key",
        )
        report.check(entry.get("organizations") == ["*"], "[default] the operator key should see every organization")
        report.check(entry.get("default_organization") == "default", "[default] the operator key's default organization is not 'default'")
    try:
        report.check(len(base64.b64decode(data.get("HERALD_SECRET_KEY", ""), validate=True)) == 32,
                     "[default] the generated HERALD_SECRET_KEY is not 32 bytes of base64")
    except ValueError:
        report.fail("[default] the generated HERALD_SECRET_KEY is not base64")
    check_dockerfile(report, rendered)


def check_production_specifics(report: Report, chart: Any, rendered: Rendered) -> None:
    """The production file exercises what it claims: replicas, HPA, ingress, ServiceMonitor, existingSecret."""
    report.check(not rendered.of_kind("Secret"), "[production] existingSecret is set, yet the chart makes a Secret")
    report.check(len(rendered.of_kind("Ingress")) == 1, "[production] no Ingress for the admin API")
    report.check(
        len(rendered.of_kind("ServiceMonitor")) == len(SERVICES),
        f"[production] expected a ServiceMonitor per service, found {len(rendered.of_kind('ServiceMonitor'))}",
    )
    report.check(bool(rendered.of_kind("HorizontalPodAutoscaler")), "[production] no HorizontalPodAutoscaler")
    for name, deployment in rendered.of_kind("Deployment").items():
        replicas = deployment["spec"].get("replicas")
        report.check(replicas in (None, 3), f"[production] Deployment {name} has {replicas} replicas, expected 3")
    for name, hpa in rendered.of_kind("HorizontalPodAutoscaler").items():
        report.check(hpa["spec"]["minReplicas"] >= 3, f"[production] HPA {name} may scale below 3 replicas")
    host = rendered.values["ingress"]["host"]
    report.check(f"https://{host}" in rendered.notes, "[production] NOTES.txt does not give the Ingress URL")

    # A production-like NATS: a credentials file, TLS required, a private CA
    # and a client certificate, in every service (check_nats checks the files
    # are mounted from the keys the values name).
    nats = rendered.values["nats"]
    report.check(
        bool(nats["auth"]["existingSecret"] and nats["auth"]["credsKey"]),
        "[production] nats.auth should use a credentials file (existingSecret and credsKey)",
    )
    report.check(
        bool(nats["tls"]["existingSecret"] and nats["tls"]["caKey"] and nats["tls"]["certKey"] and nats["tls"]["keyKey"]),
        "[production] nats.tls should give a CA and a client certificate (existingSecret, caKey, certKey, keyKey)",
    )
    report.check(nats["tls"]["required"] is True, "[production] nats.tls.required should be true")
    for name, deployment in rendered.of_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0].get("env") or []}
        files = secret_files(pod, pod["containers"][0])
        for env_name in NATS_FILE_ENV:
            path = (env.get(env_name) or {}).get("value")
            report.check(
                path in files, f"[production] Deployment {name}: {env_name}={path} is not a file mounted from a Secret"
            )
        report.check(
            (env.get("HERALD_NATS_TLS_REQUIRED") or {}).get("value") == "true",
            f"[production] Deployment {name}: HERALD_NATS_TLS_REQUIRED is not 'true'",
        )
        report.check(
            "checksum/nats" in (deployment["spec"]["template"]["metadata"].get("annotations") or {}),
            f"[production] Deployment {name}: no checksum/nats annotation, so a NATS setting change would not roll it",
        )


def check_variant_specifics(report: Report, chart: Any, rendered: Rendered) -> None:
    """A NATS token reaches all five services from its Secret; so does a CA alone."""
    auth = rendered.values["nats"]["auth"]
    deployments = rendered.of_kind("Deployment")
    report.check(len(deployments) == len(SERVICES), f"[variants] expected {len(SERVICES)} Deployments, found {len(deployments)}")
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0].get("env") or []}
        ref = ((env.get("HERALD_NATS_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        report.check(
            (ref.get("name"), ref.get("key")) == (auth["existingSecret"], auth["tokenKey"]),
            f"[variants] Deployment {name}: HERALD_NATS_TOKEN does not come from key {auth['tokenKey']!r} of Secret"
            f" {auth['existingSecret']!r}",
        )
        report.check(
            "HERALD_NATS_TLS_CA" in env and "HERALD_NATS_TLS_CERT" not in env and "HERALD_NATS_TLS_KEY" not in env,
            f"[variants] Deployment {name}: a CA alone should set HERALD_NATS_TLS_CA and no client certificate",
        )


def check_nkey_variant_specifics(report: Report, chart: Any, rendered: Rendered) -> None:
    """An NKey seed reaches all five services from its Secret; a client certificate needs no CA."""
    auth = rendered.values["nats"]["auth"]
    deployments = rendered.of_kind("Deployment")
    report.check(
        len(deployments) == len(SERVICES), f"[variants-nkey] expected {len(SERVICES)} Deployments, found {len(deployments)}"
    )
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0].get("env") or []}
        ref = ((env.get("HERALD_NATS_NKEY") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        report.check(
            (ref.get("name"), ref.get("key")) == (auth["existingSecret"], auth["nkeyKey"]),
            f"[variants-nkey] Deployment {name}: HERALD_NATS_NKEY does not come from key {auth['nkeyKey']!r} of Secret"
            f" {auth['existingSecret']!r}",
        )
        report.check(
            "HERALD_NATS_TLS_CA" not in env and "HERALD_NATS_TLS_CERT" in env and "HERALD_NATS_TLS_KEY" in env,
            f"[variants-nkey] Deployment {name}: a client certificate without caKey should set HERALD_NATS_TLS_CERT"
            " and HERALD_NATS_TLS_KEY but no HERALD_NATS_TLS_CA",
        )


def check_dockerfile(report: Report, rendered: Rendered) -> None:
    """The image the chart runs holds the binaries it calls, as the user it expects."""
    if not report.check(DOCKERFILE.exists(), f"{DOCKERFILE.relative_to(ROOT)} is missing"):
        return
    text = DOCKERFILE.read_text()
    for service_name in SERVICES:
        report.check(f"herald-{service_name}" in text, f"deploy/Dockerfile does not build herald-{service_name}")
    users = re.findall(r"^USER\s+(\d+)", text, re.MULTILINE)
    run_as = {
        (d["spec"]["template"]["spec"].get("securityContext") or {}).get("runAsUser")
        for d in rendered.of_kind("Deployment").values()
    }
    report.check(
        bool(users) and run_as == {int(users[-1])},
        f"deploy/Dockerfile runs as USER {users[-1] if users else '(none)'}, the chart as {sorted(map(str, run_as))}",
    )


def check_schema_rejects(report: Report, chart: Any) -> None:
    for reason, values in SCHEMA_REJECTS:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm_python.HelmValuesError:
            report.check(True, "")
            continue
        except helm_python.HelmError as error:
            report.fail(f"values.schema.json accepts {reason} ({values}); only a template caught it: {error}")
            continue
        report.fail(f"values.schema.json accepts {reason}: {values}")


def check_schema_accepts(report: Report, chart: Any) -> None:
    for reason, values in SCHEMA_ACCEPTS:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            report.check(True, "")
        except helm_python.HelmError as error:
            report.fail(f"the chart refuses {reason} ({values}), which the services accept: {error}")


def check_render_rejects(report: Report, chart: Any) -> None:
    for reason, values, message in RENDER_REJECTS:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm_python.HelmValuesError:
            report.check(True, "")  # values.schema.json caught it first: as good
            continue
        except helm_python.HelmError as error:
            report.check(
                message in str(error),
                f"the chart refuses {reason} ({values}), but not with a message saying {message!r}: {error}",
            )
            continue
        report.fail(f"the chart renders {reason}: {values}")


if __name__ == "__main__":
    sys.exit(main())
