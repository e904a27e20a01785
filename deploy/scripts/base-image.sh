#!/usr/bin/env bash
# Print the base image to build on: BASE if it is local or can be pulled, else (when no registry
# is reachable) a Debian 12 minbase with Python 3.11 made by mmdebstrap from the apt mirror and
# imported as FALLBACK (kept, so this happens once per machine).
#
#   deploy/scripts/base-image.sh BASE [FALLBACK]
#
# Installs mmdebstrap from apt when it is missing (needs root).
set -euo pipefail
base=${1:?usage: base-image.sh BASE [FALLBACK]}
fallback=${2:-epd-base:bookworm}
for image in "$base" "$fallback"; do
    if docker image inspect "$image" >/dev/null 2>&1; then
        echo "$image"
        exit 0
    fi
done
if docker pull --quiet "$base" >/dev/null 2>&1; then
    echo "$base"
    exit 0
fi
echo "base-image: $base is not local and cannot be pulled; making $fallback with mmdebstrap" >&2
if ! command -v mmdebstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null
fi
# No docs, man pages or locales, as in the slim Python images.
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm - | docker import --change 'CMD ["python3"]' - "$fallback" >/dev/null
echo "$fallback"
