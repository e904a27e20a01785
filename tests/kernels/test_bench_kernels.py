"""The CPU-side parts of `epd bench-kernels`: peaks, the table, and a clear exit without a GPU."""

from __future__ import annotations

import pytest
import torch

from bench.kernels import Row, format_table, peaks
from services.cli import main


def test_peaks_by_card_name_and_overrides() -> None:
    assert peaks("NVIDIA H200", None, None) == (4.8e12, 989e12)
    assert peaks("NVIDIA H100 80GB HBM3", 3000.0, 800.0) == (3.0e12, 800e12)


def test_table_lists_every_row() -> None:
    rows = [
        Row("30B-A3B", 1, 8, 0.05, 1.2, 24.0, 2359.0, 0.7, 0.2, 0.0002),
        Row("235B-A22B", 4096, 128, 9.1, None, None, 530.0, 0.16, 520.0, 0.53),
    ]
    table = format_table(rows, "NVIDIA H100")
    assert "30B-A3B" in table and "235B-A22B" in table and table.count("\n") == 4
    assert "  70.0" in table  # 70% of the HBM peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cli_without_gpu_exits_2(capsys) -> None:
    assert main(["bench-kernels", "--tokens", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
