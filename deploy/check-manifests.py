#!/usr/bin/env python3
"""Validates limen's Kubernetes manifests without a cluster. Run by deploy/validate.sh, in a Python
environment that has kubernetes-validate (which brings PyYAML and jsonschema).

  python3 deploy/check-manifests.py [--kubernetes-version 1.30 ...] [FILE_OR_DIR ...]
  python3 deploy/check-manifests.py --doc docs/kubernetes.md [--rules-out FILE]

For every YAML document under deploy/kubernetes (or the files given):
  * core kinds: kubernetes-validate's strict schema for each version asked (default: 1.30, the
    oldest the Deployment supports because of the `sleep` preStop action, and the newest known).
    A kind with no schema is a failure, not a warning: a typo in apiVersion must not pass.
  * cert-manager kinds: kubernetes-validate has no schema for CRDs, and the CRD itself cannot be
    fetched here, so they are checked against the subset of cert-manager.io/v1 written below
    (required fields, known field names, enums).
  * Kustomization: every listed resource exists, and every manifest beside it is either listed or
    in a sub-folder with its own kustomization.yaml.
Then the cross-references between the manifests and the limen config inside the ConfigMap: labels,
selectors, named ports, volumes, no subPath, key file modes, cert dirs versus the Secret mount,
probe port versus listen.admin, the shutdown budget, and route hosts versus the Certificate.
With --doc, the ```yaml examples of Markdown files instead: each must parse, Kubernetes core kinds
must pass the strict schemas, and Prometheus rule groups can be written out for promtool.
Exits 1 listing every problem found.
"""

import argparse
import os
import posixpath
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(ROOT, "kubernetes")
NAME_LABEL = ("app.kubernetes.io/name", "limen")

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


# ------------------------------------------------------------------ cert-manager subset schema

_str = {"type": "string"}
_strs = {"type": "array", "items": _str}
_duration = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
_issuer_ref = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": _str, "kind": _str, "group": _str},
}
_metadata = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _str,
        "namespace": _str,
        "labels": {"type": "object", "additionalProperties": _str},
        "annotations": {"type": "object", "additionalProperties": _str},
    },
}
CERTIFICATE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": _metadata,
        "spec": {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "anyOf": [
                {"required": ["dnsNames"]},
                {"required": ["commonName"]},
                {"required": ["ipAddresses"]},
                {"required": ["uris"]},
                {"required": ["emailAddresses"]},
                {"required": ["otherNames"]},
                {"required": ["literalSubject"]},
            ],
            "properties": {
                "secretName": _str,
                "secretTemplate": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "labels": {"type": "object", "additionalProperties": _str},
                        "annotations": {"type": "object", "additionalProperties": _str},
                    },
                },
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": _strs,
                "ipAddresses": _strs,
                "uris": _strs,
                "emailAddresses": _strs,
                "otherNames": {"type": "array"},
                "literalSubject": _str,
                "subject": {"type": "object"},
                "duration": _duration,
                "renewBefore": _duration,
                "renewBeforePercentage": {"type": "integer"},
                "isCA": {"type": "boolean"},
                "usages": {
                    "type": "array",
                    "items": {
                        "enum": [
                            "signing", "digital signature", "content commitment",
                            "key encipherment", "key agreement", "data encipherment",
                            "cert sign", "crl sign", "encipher only", "decipher only", "any",
                            "server auth", "client auth", "code signing", "email protection",
                            "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
                            "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
                        ]
                    },
                },
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "issuerRef": _issuer_ref,
                "keystores": {"type": "object"},
                "additionalOutputFormats": {"type": "array"},
                "revisionHistoryLimit": {"type": "integer", "minimum": 1},
                "encodeUsagesInRequest": {"type": "boolean"},
                "nameConstraints": {"type": "object"},
                "signatureAlgorithm": _str,
            },
        },
    },
}
ISSUER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "metadata": _metadata,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "selfSigned": {"type": "object"},
                "ca": {"type": "object", "required": ["secretName"]},
                "acme": {"type": "object", "required": ["server", "privateKeySecretRef"]},
                "vault": {"type": "object"},
                "venafi": {"type": "object"},
            },
        },
    },
}
CERT_MANAGER = {"Certificate": CERTIFICATE, "Issuer": ISSUER, "ClusterIssuer": ISSUER}


# ------------------------------------------------------------------ loading


def yaml_files(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            for d, _, files in sorted(os.walk(p)):
                out += [os.path.join(d, f) for f in sorted(files) if f.endswith((".yaml", ".yml"))]
        else:
            out.append(p)
    return out


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        problem(path, f"not valid YAML: {e}")
        return []


def rel(path):
    return os.path.relpath(path, os.path.dirname(ROOT))


# ------------------------------------------------------------------ per-document checks


def check_document(path, doc, versions):
    where = f"{rel(path)}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    kind, api = doc.get("kind"), doc.get("apiVersion", "")
    if kind == "Kustomization":
        check_kustomization(path, doc)
        return where
    if api.startswith("cert-manager.io/"):
        schema = CERT_MANAGER.get(kind)
        if schema is None or api != "cert-manager.io/v1":
            problem(where, f"unknown cert-manager kind {api} {kind}")
            return where
        for err in sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str):
            loc = ".".join(str(p) for p in err.absolute_path) or "(document)"
            problem(where, f"{loc}: {err.message}")
    else:
        for v in versions:
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                problem(where, f"no schema for {api} {kind} in Kubernetes {v} (wrong apiVersion or kind?)")
            except kubernetes_validate.ValidationError as e:
                loc = ".".join(str(p) for p in e.path) or "(document)"
                problem(where, f"Kubernetes {v}: {loc}: {e.message}")
    labels = (doc.get("metadata") or {}).get("labels") or {}
    if labels.get(NAME_LABEL[0]) != NAME_LABEL[1]:
        problem(where, f"metadata.labels must have {NAME_LABEL[0]}: {NAME_LABEL[1]}")
    return where


def check_kustomization(path, doc):
    d = os.path.dirname(path)
    listed = set()
    for r in doc.get("resources") or []:
        target = os.path.normpath(os.path.join(d, r))
        listed.add(target)
        if not os.path.exists(target):
            problem(rel(path), f"resource {r} does not exist")
    for f in sorted(os.listdir(d)):
        full = os.path.join(d, f)
        if f.endswith((".yaml", ".yml")) and f != os.path.basename(path) and full not in listed:
            problem(rel(path), f"{f} is beside this kustomization but not in its resources")


# ------------------------------------------------------------------ cross-references


def covers(name, host):
    if name == host:
        return True
    return name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]


def dur_seconds(s, where):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for u in ("ms", "s", "m", "h"):
        if isinstance(s, str) and s.endswith(u) and s[: -len(u)].isdigit():
            return int(s[: -len(u)]) * units[u]
    problem(where, f"duration {s!r} is not like 5s")
    return 0


def subset(sel, labels):
    return all(labels.get(k) == v for k, v in (sel or {}).items())


def check_references(by_kind, where_of):
    deps = by_kind.get("Deployment", [])
    if len(deps) != 1:
        problem("deploy/kubernetes", f"expected one Deployment, found {len(deps)}")
        return
    dep = deps[0]
    w = where_of[id(dep)]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels", {})
    if not subset(spec["selector"].get("matchLabels"), pod_labels):
        problem(w, "spec.selector does not match the pod template's labels")
    containers = pod["containers"]
    c = next((x for x in containers if x["name"] == "limen"), None)
    if c is None:
        problem(w, "no container named limen")
        return
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    protocols = {p["name"]: p.get("protocol", "TCP") for p in c.get("ports", [])}

    # Services, PDB, HPA, spread constraints point at the pods and their named ports.
    for svc in by_kind.get("Service", []):
        sw = where_of[id(svc)]
        if not subset(svc["spec"].get("selector"), pod_labels):
            problem(sw, "selector does not select the Deployment's pods")
        for p in svc["spec"].get("ports", []):
            t = p.get("targetPort")
            if isinstance(t, str) and t not in ports:
                problem(sw, f"targetPort {t} is not a named port of the limen container")
            elif isinstance(t, str) and p.get("protocol", "TCP") != protocols.get(t):
                problem(sw, f"port {p.get('name')} is {p.get('protocol', 'TCP')} but targetPort {t} is {protocols.get(t)}")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not subset(pdb["spec"]["selector"].get("matchLabels"), pod_labels):
            problem(where_of[id(pdb)], "selector does not select the Deployment's pods")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", dep["metadata"]["name"]):
            problem(where_of[id(hpa)], "scaleTargetRef is not the limen Deployment")
        if not c.get("resources", {}).get("requests", {}).get("cpu"):
            problem(w, "the HPA scales on CPU utilisation, which needs a CPU request")
    for t in pod.get("topologySpreadConstraints", []):
        if not subset(t.get("labelSelector", {}).get("matchLabels"), pod_labels):
            problem(w, "a topologySpreadConstraint does not select the Deployment's pods")

    # Security context: the image's user, nothing writable, nothing extra.
    sc = c.get("securityContext", {})
    want = {"runAsNonRoot": True, "runAsUser": 65532, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False}
    for k, v in want.items():
        if sc.get(k) != v:
            problem(w, f"container securityContext.{k} must be {v}")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problem(w, "container securityContext.capabilities.drop must be [ALL]")
    if "fsGroup" not in pod.get("securityContext", {}):
        problem(w, "pod securityContext.fsGroup is needed to read the 0440 Secret files")

    # Volumes: directories (never subPath), the ConfigMap and the Secret that exist.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    for m in c.get("volumeMounts", []):
        if "subPath" in m or "subPathExpr" in m:
            problem(w, f"volumeMount {m['name']} uses subPath: such a mount never sees updates")
    cms = {cm["metadata"]["name"]: cm for cm in by_kind.get("ConfigMap", [])}
    cert_secrets = {x["spec"].get("secretName"): x for x in by_kind.get("Certificate", [])}
    config_mount, secret_mounts = None, []
    for name, v in volumes.items():
        if name not in mounts:
            problem(w, f"volume {name} is not mounted")
            continue
        if "configMap" in v:
            if v["configMap"]["name"] not in cms:
                problem(w, f"volume {name}: no ConfigMap {v['configMap']['name']} in the base")
            config_mount = (mounts[name]["mountPath"], cms.get(v["configMap"]["name"]))
        if "secret" in v:
            mode = v["secret"].get("defaultMode", 0o644)
            if mode & 0o007:
                problem(w, f"volume {name}: defaultMode {oct(mode)} lets every user read the key")
            secret_mounts.append((mounts[name]["mountPath"], name, v["secret"]["secretName"]))
    if config_mount is None or config_mount[1] is None:
        problem(w, "no ConfigMap volume holding the limen config")
        return

    # The limen config inside the ConfigMap against the Deployment.
    mount_path, cm = config_mount
    args = c.get("args", [])
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        problem(w, "container args need --config FILE")
        return
    cfg_file = args[args.index("--config") + 1]
    if posixpath.dirname(cfg_file) != mount_path.rstrip("/"):
        problem(w, f"--config {cfg_file} is not a file of the ConfigMap mounted at {mount_path}")
    key = posixpath.basename(cfg_file)
    cw = where_of[id(cm)]
    if key not in cm.get("data", {}):
        problem(cw, f"no data key {key} (the file --config names)")
        return
    try:
        cfg = yaml.safe_load(cm["data"][key])
    except yaml.YAMLError as e:
        problem(cw, f"data.{key} is not valid YAML: {e}")
        return
    listen = cfg.get("listen", {})

    def port_of(addr):
        return int(str(addr).rsplit(":", 1)[1])

    for lkey, pname in (("https", "https"), ("http", "http"), ("admin", "admin"), ("quic", "quic")):
        if lkey in listen and ports.get(pname) != port_of(listen[lkey]):
            problem(cw, f"listen.{lkey} {listen[lkey]} is not container port {pname} ({ports.get(pname)})")
        if lkey in listen and not str(listen[lkey]).startswith(("0.0.0.0:", "[::]:")):
            problem(cw, f"listen.{lkey} must bind all addresses in a pod, not {listen[lkey]}")
    if not listen.get("admin_public"):
        problem(cw, "listen.admin_public must be true: kubelet probes the admin port on the pod IP")
    for probe in ("readinessProbe", "livenessProbe"):
        pr = c.get(probe, {}).get("httpGet", {})
        want_path = "/readyz" if probe == "readinessProbe" else "/healthz"
        if pr.get("path") != want_path or ports.get(pr.get("port"), pr.get("port")) != ports.get("admin"):
            problem(w, f"{probe} must be httpGet {want_path} on the admin port")
    dirs = [d.rstrip("/") for d in cfg.get("tls", {}).get("cert_dirs", [])]
    # Secrets mounted for single files of the config: the admin token, the ticket keys.
    secret_files = {
        "listen.admin_token_file": listen.get("admin_token_file"),
        "tls.ticket_keys": cfg.get("tls", {}).get("ticket_keys"),
    }
    file_dirs = set()
    mounted = [sm.rstrip("/") for sm, _, _ in secret_mounts]
    for key, f in secret_files.items():
        if not f:
            continue
        if not posixpath.isabs(f):
            problem(cw, f"{key} {f} must be an absolute path in a pod")
        file_dirs.add(posixpath.dirname(f))
        if posixpath.dirname(f) not in mounted:
            problem(w, f"{key} {f}: no Secret is mounted at {posixpath.dirname(f)}")
    for sm, vname, secret in secret_mounts:
        sm = sm.rstrip("/")
        if sm in file_dirs:
            continue  # a Secret holding one of the files above
        if cert_secrets and secret not in cert_secrets:
            problem(w, f"volume {vname}: no Certificate writes Secret {secret}")
        if sm not in dirs and posixpath.dirname(sm) not in dirs:
            problem(w, f"Secret mounted at {sm} is neither a tls.cert_dirs entry nor directly inside one ({dirs})")
    t = cfg.get("timeouts", {})
    delay = dur_seconds(t.get("shutdown_delay", "0s"), cw)
    grace = dur_seconds(t.get("shutdown_grace", "30s"), cw)
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if tgps <= pre + delay + grace:
        problem(w, f"terminationGracePeriodSeconds {tgps} must exceed preStop sleep {pre} + "
                   f"shutdown_delay {delay} + shutdown_grace {grace}")
    names = [n for x in cert_secrets.values() for n in x["spec"].get("dnsNames", [])]
    for r in cfg.get("routes", []):
        host = str(r.get("host", "")).lower()
        if names and host != "*" and not any(covers(n, host) for n in names):
            problem(cw, f"route host {host} is not among the Certificate's dnsNames {names}")


def check_docs(docs, versions, rules_out):
    """The ```yaml examples in the docs: each must parse; Kubernetes core kinds must pass the strict
    schemas; Prometheus rule groups are written to rules_out for `promtool check rules`."""
    groups, count = [], 0
    for path in docs:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        block, start, indent = None, 0, ""
        for n, line in enumerate(lines, 1):
            stripped = line.strip()
            if block is None and stripped == "```yaml":
                block, start, indent = [], n + 1, line[: len(line) - len(line.lstrip())]
            elif block is not None and stripped == "```":
                text = "\n".join(b[len(indent):] if b.startswith(indent) else b for b in block)
                where = f"{rel(path)}:{start}"
                count += 1
                try:
                    docs_in_block = [d for d in yaml.safe_load_all(text) if d is not None]
                except yaml.YAMLError as e:
                    problem(where, f"example is not valid YAML: {e}")
                    docs_in_block = []
                for d in docs_in_block:
                    if not isinstance(d, dict):
                        continue
                    if "groups" in d:
                        groups += d["groups"]
                    elif "kind" in d and "apiVersion" in d and "metadata" in d:
                        if "." in d["apiVersion"].split("/")[0] and not d["apiVersion"].startswith(
                            ("apps/", "policy/", "autoscaling/", "networking.k8s.io/")
                        ):
                            continue  # a CRD (ServiceMonitor, ...): no schema here
                        for v in versions:
                            try:
                                kubernetes_validate.validate(d, v, strict=True)
                            except kubernetes_validate.SchemaNotFoundError:
                                problem(where, f"no schema for {d['apiVersion']} {d['kind']} in Kubernetes {v}")
                            except kubernetes_validate.ValidationError as e:
                                loc = ".".join(str(p) for p in e.path) or "(document)"
                                problem(where, f"Kubernetes {v}: {loc}: {e.message}")
                block = None
            elif block is not None:
                block.append(line)
    if rules_out:
        with open(rules_out, "w", encoding="utf-8") as f:
            yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    return count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubernetes-version", action="append", dest="versions",
                    help="validate core kinds against this version (repeatable); default: 1.30 and the newest known")
    ap.add_argument("--doc", action="append", default=[],
                    help="check the ```yaml examples of this Markdown file instead of manifests (repeatable)")
    ap.add_argument("--rules-out", help="with --doc: write the Prometheus rule groups found here")
    ap.add_argument("paths", nargs="*", default=[BASE])
    a = ap.parse_args()
    versions = a.versions or ["1.30", kubernetes_validate.latest_version()]

    if a.doc:
        count = check_docs(a.doc, versions, a.rules_out)
        summary = f"{count} YAML examples in {', '.join(rel(d) for d in a.doc)} parse; core kinds pass"
    else:
        by_kind, where_of, count = {}, {}, 0
        for path in yaml_files(a.paths):
            for doc in load(path):
                if not isinstance(doc, dict) or "kind" not in doc:
                    problem(rel(path), "a document without a kind")
                    continue
                where_of[id(doc)] = check_document(path, doc, versions)
                by_kind.setdefault(doc["kind"], []).append(doc)
                count += 1
        try:
            check_references(by_kind, where_of)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            # A field the schema checks above already reported as missing or malformed.
            problem("cross-references", f"stopped at a missing or malformed field: {e!r}")
        summary = (f"{count} documents OK (Kubernetes {', '.join(versions)}; cert-manager kinds "
                   f"against the built-in cert-manager.io/v1 subset; cross-references)")
    if problems:
        print(f"check-manifests: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"check-manifests: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
