#!/usr/bin/env bash
# The base images the container tests build on, made locally from Debian's archive (no image registry is
# reachable here): Debian 12 with Python (python3, python3-pip, python3-venv, ca-certificates) from
# `debootstrap --variant=minbase bookworm`, imported with `docker import`, and stand-ins for the Redis and nginx
# images built FROM it with Debian's packages, offline. Names of the project's own, never an official image's.
# Reused when all three exist; otherwise all three are made again (about 2 minutes).
# Prints the three names as KEY=name lines (tests/containers.py reads them). Needs root and a Docker daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
python_image=groq-proxy-stand-in/python:3.11-bookworm
redis_image=groq-proxy-stand-in/redis:bookworm
nginx_image=groq-proxy-stand-in/nginx:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

report() {
  printf 'PYTHON_IMAGE=%s\nREDIS_IMAGE=%s\nNGINX_IMAGE=%s\n' "$python_image" "$redis_image" "$nginx_image"
}
if docker image inspect "$python_image" "$redis_image" "$nginx_image" >/dev/null 2>&1; then
  report
  exit 0
fi

work=$(mktemp -d /var/tmp/groq-proxy-images.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

# The stand-ins' packages, fetched now with the rootfs's own apt (it knows what the base already has), so
# their builds need no network: each copies its .deb files in and installs them with dpkg.
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
chroot "$rootfs" apt-get -qq update
for name in redis nginx; do
  package=$([ "$name" = redis ] && echo redis-server || echo nginx)
  mkdir -p "$work/$name/debs"
  chroot "$rootfs" apt-get -qq install --download-only --no-install-recommends -y "$package" >/dev/null
  mv "$rootfs"/var/cache/apt/archives/*.deb "$work/$name/debs/"
done
chroot "$rootfs" apt-get -qq clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs/etc/resolv.conf"
: >"$rootfs/etc/resolv.conf"

tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$python_image" >/dev/null

# policy-rc.d: a package's maintainer script must not start its daemon during the build.
cat >"$work/redis/Dockerfile" <<EOF
FROM $python_image
COPY debs /tmp/debs
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && dpkg -i /tmp/debs/*.deb && rm -r /tmp/debs /usr/sbin/policy-rc.d
WORKDIR /data
CMD ["redis-server"]
EOF
cat >"$work/nginx/Dockerfile" <<EOF
FROM $python_image
COPY debs /tmp/debs
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && dpkg -i /tmp/debs/*.deb && rm -r /tmp/debs /usr/sbin/policy-rc.d
CMD ["nginx", "-g", "daemon off;"]
EOF
for name in redis nginx; do
  image=$([ "$name" = redis ] && echo "$redis_image" || echo "$nginx_image")
  DOCKER_BUILDKIT=0 docker build --quiet --network none -t "$image" "$work/$name" >/dev/null
done
report
