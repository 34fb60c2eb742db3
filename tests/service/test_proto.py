"""The generated code is what `scripts/gen_proto.py` makes from proto/ today, byte for byte;
health checking and reflection are served next to the service."""

import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    def generated(root: Path, base: Path) -> list[Path]:  # sources, not a local run's bytecode
        return sorted(p.relative_to(base) for p in root.rglob("*_pb2*.py*") if "__pycache__" not in p.parts)
    fresh = generated(tmp_path, tmp_path)
    committed = generated(ROOT / "sdk" / "adjointdpm", ROOT / "sdk")
    assert fresh == committed, "proto/ and sdk/adjointdpm/v1 list different files: run scripts/gen_proto.py"
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (ROOT / "sdk" / rel).read_bytes(), (
            f"{rel} drifted from proto/: run scripts/gen_proto.py")


def test_health_and_reflection(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "adjointdpm.v1.AdjointDPMService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"adjointdpm.v1.AdjointDPMService", "grpc.health.v1.Health"} <= names


def test_list_models_and_losses(client):
    models = {m["name"]: m for m in client.list_models()}
    assert set(models) == {"digits", "gaussian-mixture"}
    assert models["digits"]["is_default"] and models["digits"]["conditioning"] == "labels"
    assert [int(v) for v in models["digits"]["latent_shape"]] == [1, 8, 8]
    assert "dpm3" in models["digits"]["solvers"] and "checkpoint" in models["digits"]["grad_modes"]
    digits = models["digits"]
    assert (digits["path"], digits["prediction"], digits["default_grid"]) == ("vp", "epsilon", "karras")
    assert (digits["t_min"], digits["t_max"]) == (0.0, 850.0)  # the sampling span (models/_digits.py)
    losses = {entry["name"]: entry for entry in client.list_losses()}
    assert {"mse", "classifier", "gram_style"} <= set(losses)
    assert "clip_similarity" not in losses and "triton" not in losses  # neither configured
    assert losses["mse"]["tensors"] == ["target"]
    assert losses["mse"]["domain"] == "image" and losses["classifier"]["domain"] == "image"
