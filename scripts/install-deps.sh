#!/usr/bin/env bash
# Installs the Debian packages Zenith needs to build, test and run its demo,
# skipping those already installed. Needs root (or sudo) only when something
# is missing.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libgrpc-dev protobuf-compiler protobuf-compiler-grpc
  libprotobuf-c-dev protobuf-c-compiler
  libuv1-dev libgloo-dev libopenblas-dev libsqlite3-dev libjansson-dev libcmocka-dev zlib1g-dev
  libssl-dev libmicrohttpd-dev libcairo2-dev
  dataset-fashion-mnist
  python3 python3-numpy python3-torch python3-grpcio python3-protobuf python3-prometheus-client
  openssl python3-yaml
)
# The deploy tests (tests/deploy) render the Kubernetes manifests with `kubectl kustomize`
# and validate them with node: Debian's kubectl (kubernetes-client) and Node.js, unless a
# kubectl or an npm is already installed (another package of them would conflict).
command -v kubectl >/dev/null || packages+=(kubernetes-client)
command -v npm >/dev/null || packages+=(nodejs npm)

# ... and the npm packages of tests/deploy/package-lock.json, into tests/deploy/node_modules.
npm_deps() {
  local dir
  dir="$(cd "$(dirname "$0")/.." && pwd)/tests/deploy"
  [[ -d "$dir/node_modules/kubernetes-models" && -d "$dir/node_modules/dockerfile-utils" ]] \
    && return 0
  echo "deps: installing the npm packages of tests/deploy/package-lock.json"
  npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
}

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "deps: all ${#packages[@]} Debian packages are installed"
  npm_deps
  exit 0
fi

echo "deps: installing ${#missing[@]} missing Debian package(s): ${missing[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "deps: run as root or install sudo" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
npm_deps
echo "deps: done"
