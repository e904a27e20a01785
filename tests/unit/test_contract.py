"""The shared request contract: torch-free, the one place sampling is validated, the only wire
converters, and the same image token counts on both sides of the gateway."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from PIL import Image

from common.contract import (
    Cause,
    ContractError,
    Fault,
    ImageRef,
    PreprocessConfig,
    SamplingParams,
    fault_of,
    image_grid,
    image_pad_runs,
)
from common.contract.wire import (
    image_ref_from_proto,
    image_ref_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)
from common.rpc import language_pb2, tensor_pb2
from services.encoder.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[2]


def test_the_gateway_process_never_imports_torch(tiny_model):
    """Importing the gateway and building its whole app (pools, HTTP and gRPC front doors)."""
    code = f"""
import sys
from services.gateway.__main__ import GatewayConfig, create
from common.grpc_bootstrap import ServerConfig
import asyncio
async def main():
    svc = create(GatewayConfig(model={str(tiny_model)!r}, encoders=("127.0.0.1:1",),
                 language=("127.0.0.1:2",), server=ServerConfig(host="127.0.0.1", port=0),
                 http_port=0))
asyncio.run(main())
print("torch" in sys.modules, "transformers" in sys.modules, "av" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Nor PyAV until a video arrives (it is read only for video headers).
    assert out.stdout.split() == ["False", "False", "False"], out.stderr


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("role", ["gateway", "encoder", "language"])
def test_roles_import_nothing_from_each_other(role):
    others = {f"services.{r}" for r in ("gateway", "encoder", "language")} - {f"services.{role}"}
    for path in (ROOT / "services" / role).rglob("*.py"):
        bad = {m for m in _imports(path) if any(m == o or m.startswith(o + ".") for o in others)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_common_contract_imports_no_torch():
    for path in (ROOT / "common" / "contract").glob("*.py"):
        assert not {m for m in _imports(path) if m.split(".")[0] in ("torch", "numpy")}, path


def test_sampling_params_round_trip_the_wire():
    cases = [
        SamplingParams(),
        SamplingParams(max_tokens=None, temperature=0.5, top_p=0.875, top_k=5, min_p=0.125,
                       seed=(1 << 64) - 1, repetition_penalty=1.25, presence_penalty=-0.5,
                       frequency_penalty=1.5, stop_token_ids=(3, 9), ignore_eos=True,
                       min_tokens=2, logprobs=0),
    ]  # fmt: skip
    for p in cases:
        assert sampling_from_proto(sampling_to_proto(p)) == p


def test_sampling_from_the_wire_is_validated():
    with pytest.raises(ContractError, match="top_k") as err:
        sampling_from_proto(language_pb2.SamplingParams(max_tokens=4, top_k=(1 << 32) - 1))
    assert err.value.param == "top_k"
    with pytest.raises(ContractError, match="min_tokens"):
        sampling_from_proto(language_pb2.SamplingParams(max_tokens=4, min_tokens=5))


def test_image_refs_round_trip_and_bad_grids_are_refused():
    handle = tensor_pb2.TensorHandle(id="a" * 32, shape=[6, 8])
    ref = ImageRef(handle, (1, 4, 6), 6, "sha")
    assert image_ref_from_proto(image_ref_to_proto(ref), 2) == ref
    bad = image_ref_to_proto(ImageRef(handle, (1, 3, 6), 0))
    with pytest.raises(ContractError, match="multiples of 2"):
        image_ref_from_proto(bad, 2)


def test_image_pad_runs_are_checked_against_the_counts():
    img = 7
    ids = [1, img, img, img, 2, img, img, 3]
    assert image_pad_runs(ids, img, [3, 2]) == [(1, 3), (5, 2)]
    assert image_pad_runs([1, img, img, img, img], img, [2, 2]) == [(1, 2), (3, 2)]
    for counts in ([3], [2, 2], [3, 3], [3, 2, 1]):
        with pytest.raises(ContractError):
            image_pad_runs(ids, img, counts)
    with pytest.raises(ContractError, match="takes no images"):
        image_pad_runs([1, 2], None, [1])


def test_the_gateways_prediction_is_the_encoders_grid(tiny_model):
    """The gateway predicts token counts from an image's size; the encoder's preprocessing of the
    pixels must land on the same grid, for every size and aspect ratio."""
    cfg = PreprocessConfig.from_dir(tiny_model)
    rng = random.Random(0)
    sizes = [(1, 1), (31, 32), (33, 31), (640, 480), (1, 150), (3000, 20)]
    sizes += [(rng.randint(1, 1200), rng.randint(1, 1200)) for _ in range(40)]
    for w, h in sizes:
        if max(w, h) / min(w, h) > 200:
            continue
        assert preprocess(Image.new("RGB", (w, h)), cfg).grid_thw == image_grid(w, h, cfg), (w, h)


def test_faults_cross_the_wire_in_trailing_metadata():
    fault = Fault(Cause.IMAGE, grpc.StatusCode.NOT_FOUND, "image 1: gone", 1, "h:1", "not_found")
    error = grpc.aio.AioRpcError(
        fault.code, grpc.aio.Metadata(), grpc.aio.Metadata(*fault.metadata()), fault.message
    )
    assert fault_of(error) == fault
    plain = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connect failed"
    )
    assert fault_of(plain) is None  # the connection, not one of our servicers
