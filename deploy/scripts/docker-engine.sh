#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine: install Debian's docker.io (Engine 20.10 on
# Debian 12) when there is no dockerd, and start dockerd when nothing runs it (machines without
# systemd, such as CI VMs, do not start it on install). Idempotent; needs root for either step.
#
# The daemon it starts keeps running afterwards, as an installed service would; its log is
# /var/log/epd-dockerd.log.
set -euo pipefail
if docker info >/dev/null 2>&1; then
    exit 0
fi
if ! command -v dockerd >/dev/null; then
    echo "docker-engine: installing docker.io from apt" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends docker.io iptables ca-certificates >/dev/null
fi
if ! pgrep -x dockerd >/dev/null; then
    echo "docker-engine: starting dockerd" >&2
    nohup dockerd >/var/log/epd-dockerd.log 2>&1 &
fi
for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then
        docker version --format 'docker-engine: client {{.Client.Version}}, engine {{.Server.Version}}' >&2
        exit 0
    fi
    sleep 0.5
done
echo "docker-engine: no engine after 30 s; see /var/log/epd-dockerd.log" >&2
exit 1
