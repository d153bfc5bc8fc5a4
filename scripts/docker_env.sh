#!/usr/bin/env bash
# A private Docker engine for tests and local trials, everything under one directory.
#   scripts/docker_env.sh install              apt-get install docker.io docker-compose debootstrap (if missing)
#   scripts/docker_env.sh start DIR            dockerd with data-root, exec-root, pidfile and socket under DIR
#   scripts/docker_env.sh base DIR TAG         debootstrap bookworm (+ python3, venv) and import it as TAG
#   scripts/docker_env.sh stop DIR             stop that dockerd by its PID (and wait for it)
# After `start`, use: DOCKER_HOST=unix://DIR/docker.sock /usr/bin/docker ...
# No registry is needed: the base image is built from the Debian mirror apt is configured with.
set -euo pipefail

cmd=${1:?usage: docker_env.sh install|start|base|stop [DIR] [TAG]}

mirror() {  # the Debian mirror apt uses here (deb822 or one-line format)
  local m
  m=$(grep -hoE '^URIs: *http[^ ]*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | sed 's/^URIs: *//')
  [ -n "$m" ] || m=$(grep -hoE '^deb +http[^ ]*/debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | head -1 | awk '{print $2}')
  echo "${m:-http://deb.debian.org/debian}"
}

case "$cmd" in
  install)
    missing=()
    [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if ((${#missing[@]})); then
      sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
      echo "docker_env: installing ${missing[*]}" >&2
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    ;;
  start)
    dir=${2:?DIR}; mkdir -p "$dir"
    sock="$dir/docker.sock"
    # A private bridge name so a host docker0 (or another test's engine) is never touched.
    br="fw$(echo "$dir" | sha1sum | cut -c1-8)"
    ip link show "$br" >/dev/null 2>&1 || { ip link add "$br" type bridge && ip addr add 172.31.253.1/24 dev "$br" \
      && ip link set "$br" up; }
    echo "$br" > "$dir/bridge"
    nohup /usr/sbin/dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" \
      -H "unix://$sock" --bridge "$br" --storage-driver overlay2 \
      > "$dir/dockerd.log" 2>&1 &
    echo $! > "$dir/dockerd.launcher.pid"
    for _ in $(seq 1 100); do
      DOCKER_HOST="unix://$sock" /usr/bin/docker version >/dev/null 2>&1 && exit 0
      sleep 0.2
    done
    echo "docker_env: dockerd did not answer; log:" >&2; tail -20 "$dir/dockerd.log" >&2; exit 1
    ;;
  base)
    dir=${2:?DIR}; tag=${3:?TAG}
    root="$dir/rootfs"
    if ! DOCKER_HOST="unix://$dir/docker.sock" /usr/bin/docker image inspect "$tag" >/dev/null 2>&1; then
      rm -rf "$root"
      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$(mirror)" \
        > "$dir/debootstrap.log" 2>&1 || { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
      # The same apt sources inside the image as on this host (security + updates), then trim.
      cp /etc/apt/sources.list.d/*.sources "$root/etc/apt/sources.list.d/" 2>/dev/null && rm -f "$root/etc/apt/sources.list" || true
      rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
      tar -C "$root" -c . | DOCKER_HOST="unix://$dir/docker.sock" /usr/bin/docker import \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["bash"]' - "$tag" >/dev/null
      rm -rf "$root"
    fi
    ;;
  stop)
    dir=${2:?DIR}
    pid=$(cat "$dir/docker.pid" 2>/dev/null || cat "$dir/dockerd.launcher.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    br=$(cat "$dir/bridge" 2>/dev/null || true)
    [ -n "$br" ] && ip link del "$br" 2>/dev/null || true
    # overlay2 may leave mounts behind after a hard kill: unmount anything still under DIR.
    grep -o " $dir/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    ;;
  *)
    echo "usage: docker_env.sh install|start|base|stop" >&2; exit 2
    ;;
esac
