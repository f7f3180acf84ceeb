# Sourced: points Go's module and build caches into $HOTSWAP_CACHE so CI on the same machine reuses
# them, and keeps the build gentle on a 2-core machine shared with tests.
HOTSWAP_CACHE="${HOTSWAP_CACHE:-$HOME/.cache/hotswap}"
export GOMODCACHE="${HOTSWAP_GOMODCACHE:-$HOTSWAP_CACHE/go/mod}"
export GOCACHE="${HOTSWAP_GOCACHE:-$HOTSWAP_CACHE/go/build}"
export GOFLAGS="${HOTSWAP_GOFLAGS:--p=2 -buildvcs=false -trimpath}"
export CGO_ENABLED=0
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
# Go itself: the one on PATH, else /usr/local/go, else the official toolchain zip that the Go module
# proxy named by $GOPROXY serves (module golang.org/toolchain), unpacked once into the cache.
if ! command -v go >/dev/null 2>&1; then
  if [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
  else
    go_version="${HOTSWAP_GO_VERSION:-1.26.8}"
    goroot="$HOTSWAP_CACHE/go/toolchain-go$go_version"
    if [ ! -x "$goroot/bin/go" ]; then
      proxy="${GOPROXY:-}"; proxy="${proxy%%,*}"
      if [ -z "$proxy" ] || [ "$proxy" = direct ] || [ "$proxy" = off ]; then
        echo "cluster-build: Go is not installed; install it, or set GOPROXY to a module proxy URL" >&2
        exit 1
      fi
      echo "cluster-build: fetching Go $go_version from the module proxy ($proxy)" >&2
      go_tmp="$(mktemp -d)"
      curl -fsSL "$proxy/golang.org/toolchain/@v/v0.0.1-go$go_version.linux-amd64.zip" -o "$go_tmp/go.zip"
      (cd "$go_tmp" && python3 -m zipfile -e go.zip .)
      # zipfile drops the executable bits.
      chmod +x "$go_tmp/golang.org/toolchain@v0.0.1-go$go_version.linux-amd64/bin/"* \
        "$go_tmp/golang.org/toolchain@v0.0.1-go$go_version.linux-amd64/pkg/tool/"*/*
      rm -rf "$goroot"; mkdir -p "$(dirname "$goroot")"
      mv "$go_tmp/golang.org/toolchain@v0.0.1-go$go_version.linux-amd64" "$goroot"
      rm -rf "$go_tmp"
    fi
    export PATH="$goroot/bin:$PATH"
  fi
fi
