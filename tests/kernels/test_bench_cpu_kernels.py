"""`epd bench-cpu-kernels --json`: every formulation is timed and checked, or says why not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EPD = str(Path(sys.executable).parent / "epd")


def test_moe_and_attention_parts_report_every_formulation():
    out = subprocess.run(
        [EPD, "bench-cpu-kernels", "--part", "moe,attention", "--shapes", "small",
         "--dtypes", "float32", "--tokens", "1,8", "--batches", "2", "--context", "40",
         "--repeats", "2", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    moe = report["moe"]
    assert [c["tokens"] for c in moe] == [1, 8]
    for c in moe:
        names = [r["formulation"] for r in c["rows"]] + list(c["failed"])
        assert names[0] == "reference (grouped_mm)" and len(names) == 4
        assert 0 < c["active_experts"] <= 16
        for r in c["rows"]:
            assert r["median_ms"] > 0 and r["max_abs_diff_vs_ref"] < 1e-4
        assert c["rows"][0]["max_abs_diff_vs_ref"] == 0
    (att,) = report["attention"]
    assert [r["formulation"] for r in att["rows"]] == [
        "paged (engine)",
        "contiguous SDPA",
        "contiguous, per seq",
    ]
    assert all(r["max_abs_diff"] < 1e-5 for r in att["rows"])
