#!/usr/bin/env bash
# The image's wheelhouse, made on the host where the package registries (and the local torch
# wheel) are reachable: OUT/deps holds torch and every dependency of the project, as wheels for
# the image's Python; OUT/app holds the epd wheel. deploy/Dockerfile installs from it with
# `pip install --no-index`, so the image build needs no network.
#
#   deploy/scripts/wheelhouse.sh OUT
#
# Environment: PIP (the pip to run, default .venv/bin/pip), EPD_EXTRAS (extras of pyproject.toml,
# e.g. "nixl"), TORCH_VERSION (2.13.0), TORCH_INDEX_URL (where torch comes from, e.g. the cu128
# index; empty = pip's own configuration), IMAGE_PYTHON (the base image's Python, default this
# pip's).
#
# deps/ is re-resolved only when pyproject.toml or one of these settings changes (its key file
# records them); app/ is rebuilt every time.
set -euo pipefail
out=${1:?usage: wheelhouse.sh OUT}
pip=${PIP:-.venv/bin/pip}
extras=${EPD_EXTRAS:-}
torch_version=${TORCH_VERSION:-2.13.0}
torch_index=${TORCH_INDEX_URL:-}
python_version=${IMAGE_PYTHON:-$("${pip%/pip}/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}

key="$(sha1sum pyproject.toml | cut -c1-12) extras=$extras torch=$torch_version index=$torch_index python=$python_version"
if [ "$(cat "$out/deps/.key" 2>/dev/null)" != "$key" ]; then
    rm -rf "$out/deps" "$out/deps.tmp"
    mkdir -p "$out/deps.tmp"
    # Binary wheels only, for the image's Python: nothing is compiled on the host or in the build.
    get=(env PYTHONWARNINGS=ignore "$pip" download --quiet --dest "$out/deps.tmp" --only-binary=:all:
         --python-version "$python_version")
    if [ -n "$torch_index" ]; then
        "${get[@]}" --no-deps --index-url "$torch_index" "torch==$torch_version"
    fi
    # The project's own requirements, resolved next to that exact torch.
    "${get[@]}" --find-links "$out/deps.tmp" "torch==$torch_version" ".${extras:+[$extras]}"
    rm -f "$out"/deps.tmp/epd-*
    # xgrammar asks for triton (~1 GB installed) for its CUDA bitmask kernel alone, imported
    # only if present; a CPU torch needs none, so a CPU image leaves it out (the Dockerfile's
    # pip check allows exactly that missing requirement).
    if ! "${pip%/pip}/python" - "$out"/deps.tmp/torch-*.whl <<'EOF'; then
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
sys.exit(0 if b"Requires-Dist: triton" in z.read(meta) else 1)
EOF
        rm -f "$out"/deps.tmp/triton-*.whl
    fi
    echo "$key" > "$out/deps.tmp/.key"
    mv "$out/deps.tmp" "$out/deps"
fi
rm -rf "$out/app"
PYTHONWARNINGS=ignore "$pip" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$out/app" .
echo "wheelhouse $out: $(find "$out/deps" -name '*.whl' | wc -l) dependency wheels ($(du -sh "$out/deps" | cut -f1)), $(basename "$out"/app/*.whl)"
