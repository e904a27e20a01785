"""`epd bench-step`: the per-component step profile runs the real engine parts end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.step_profile import STEP_PARTS

EPD = str(Path(sys.executable).parent / "epd")


def test_profile_reports_every_component_for_decode_and_prefill_steps(tiny_model):
    out = subprocess.run(
        [EPD, "bench-step", "--model", str(tiny_model), "--batches", "1,3", "--steps", "3",
         "--warmup", "1", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    prompt = report["prompt_tokens"]
    cells = [(c["kind"], c["batch"], c["tokens"]) for c in report["cells"]]
    assert cells == [("decode", 1, 1), ("prefill", 1, prompt),
                     ("decode", 3, 3), ("prefill", 3, 2 + prompt)]  # fmt: skip
    for c in report["cells"]:
        parts = c["median_s"]
        assert set(parts) == {*STEP_PARTS, "total"}
        assert parts["total"] > 0 and c["bare_total_s"] > 0
        assert parts["expert GEMMs (sort, gather, combine)"] > 0 and parts["sampling"] > 0
        assert c["alloc_mb_per_step"] > 0
    # decode contexts: the image prompt plus the tokens generated while measuring
    assert all(c["context_tokens"] > prompt for c in report["cells"][2:3])


def test_step_clock_hooks_come_off_and_leave_the_output_unchanged(tiny_model):
    import torch

    from bench.step_clock import StepClock
    from services.colocated import ColocatedPipeline
    from services.language.attention import ContiguousKVCache

    pipe = ColocatedPipeline(tiny_model)
    t = pipe.cfg.text
    x = pipe.decoder.embed(torch.tensor([1, 5, 9, 30]))
    pos = torch.arange(4).expand(3, -1)

    def forward() -> torch.Tensor:
        cache = ContiguousKVCache(
            t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 4, pipe.dtype
        )
        with torch.inference_mode():
            return pipe.decoder.compute_logits(pipe.decoder(x, pos, cache))

    plain = forward()
    clock = StepClock()
    clock.attach(pipe.decoder)
    timed = forward()
    assert clock.inclusive["expert GEMMs (sort, gather, combine)"] > 0
    assert clock.inclusive["attend"] > 0 and "decoder_out" in clock.marks
    clock.detach()
    assert torch.equal(plain, timed)
    hooked = [m for m in pipe.decoder.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
