#!/usr/bin/env bash
# Every GPU test and the kernel benchmark, in one call on one H100/H200 (about 2-3 minutes).
# Uses the machine's own python3 (torch, triton, transformers preinstalled); the project is
# imported from this checkout, not installed. JSON/XML results go under $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$(mktemp -d)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
      torch.cuda.get_device_name())'

status=0
# --confcutdir: the root conftest pins CPU-side fixtures (transformers parity) we do not need.
timeout 240 $PY -m pytest -q -m gpu tests/gpu --confcutdir=tests/gpu -p no:cacheprovider \
    --junitxml="$OUT_DIR/gpu-tests.xml" || status=$?
timeout 150 $PY -m services.cli bench-kernels --json > "$OUT_DIR/bench-kernels.json" || status=$?
$PY - "$OUT_DIR/bench-kernels.json" <<'PYEOF'
import json, sys
from bench.kernels import Row, format_table
data = json.load(open(sys.argv[1]))
print(format_table([Row(**r) for r in data["rows"]], data["device"]))
PYEOF
echo "results in $OUT_DIR (exit $status)"
exit $status
