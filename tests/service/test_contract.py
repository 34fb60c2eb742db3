"""The wire contract follows buf's STANDARD lint rules and its own format, and never breaks
silently: ``buf breaking`` (FILE rules, buf.yaml) against the released descriptor set refuses an
incompatible change and lets an additive one through (docs/design.md §4.9)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _needs import missing

ROOT = Path(__file__).resolve().parents[2]
RELEASED = ROOT / "proto" / "released" / "adjointdpm-v1.binpb"
SERVICE_PROTO = Path("proto/adjointdpm/v1/adjointdpm.proto")


def _buf() -> str:
    """buf from buf-bin (tests/requirements.txt) beside this Python, else on PATH."""
    here = Path(sys.executable).parent / "buf"
    found = str(here) if here.exists() else shutil.which("buf")
    if found is None:
        missing("buf (pip install buf-bin)")
    return found


def _run(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([_buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_with_the_standard_rules_is_clean():
    config = (ROOT / "buf.yaml").read_text()
    assert re.search(r"lint:\s*\n\s*use:\s*\n\s*- STANDARD", config), "buf.yaml must use STANDARD"
    run = _run("lint")
    assert run.returncode == 0, run.stdout + run.stderr


def test_buf_format_is_clean():
    run = _run("format", "--diff", "--exit-code")
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_contract_is_compatible_with_the_released_one():
    run = _run("breaking", "--against", str(RELEASED))
    assert run.returncode == 0, run.stdout + run.stderr


def _copy(tmp_path: Path) -> Path:
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", work / "proto", ignore=shutil.ignore_patterns("released"))
    shutil.copy(ROOT / "buf.yaml", work / "buf.yaml")
    return work


# (what changes, old text, new text, a rule buf names) — each breaks every deployed client:
# generated code (FILE) or the bytes on the wire.
BREAKING = [
    ("a field's type", "uint32 steps = 11;", "uint64 steps = 11;", "FIELD_SAME_TYPE"),
    ("a field's number", "string solver = 12;", "string solver = 16;", "FIELD_NO_DELETE"),
    ("a field's name", "string grid = 14;", "string time_grid = 14;", "FIELD_SAME_NAME"),
    ("a removed RPC", "  rpc ListLosses(ListLossesRequest) returns (ListLossesResponse);\n", "",
     "RPC_NO_DELETE"),
    ("an enum value's number", "DOMAIN_LATENT = 2;", "DOMAIN_LATENT = 3;", "ENUM_VALUE_NO_DELETE"),
    ("a oneof member moved out", "    GradientResult result = 5;\n  }\n", "  }\n  GradientResult result = 5;\n",
     "FIELD_SAME_ONEOF"),
]


@pytest.mark.parametrize("what,old,new,rule", BREAKING, ids=[b[0] for b in BREAKING])
def test_an_incompatible_change_fails_the_check(tmp_path, what, old, new, rule):
    work = _copy(tmp_path)
    proto = work / SERVICE_PROTO
    text = proto.read_text()
    assert text.count(old) == 1, f"the test's anchor for {what} moved: {old!r}"
    proto.write_text(text.replace(old, new))
    run = _run("breaking", "--against", str(RELEASED), "--error-format", "json", cwd=work)
    assert run.returncode != 0, f"{what}: buf breaking let it through"
    rules = {json.loads(line)["type"] for line in run.stdout.splitlines() if line.strip()}
    assert rule in rules, run.stdout + run.stderr


def test_an_additive_change_passes_the_check(tmp_path):
    """What may change within v1: a new field, message or RPC (docs/design.md §4.9)."""
    work = _copy(tmp_path)
    proto = work / SERVICE_PROTO
    text = proto.read_text().replace("  optional double t_start = 15;\n",
                                     "  optional double t_start = 15;\n  string scheduler = 16;\n")
    text += "\nmessage NewThing {\n  string name = 1;\n}\n"
    proto.write_text(text)
    run = _run("breaking", "--against", str(RELEASED), cwd=work)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_released_contract_is_the_v1_package_with_every_rpc():
    """The committed descriptor set is a buf image of adjointdpm.v1: every RPC served today was
    released (a new RPC is added to it at the next release, never one removed)."""
    from google.protobuf import descriptor_pb2

    from adjointdpm.v1 import adjointdpm_pb2 as pb

    image = descriptor_pb2.FileDescriptorSet.FromString(RELEASED.read_bytes())
    files = {f.name: f for f in image.file}
    released = files["adjointdpm/v1/adjointdpm.proto"]
    assert released.package == "adjointdpm.v1"
    (service,) = released.service
    served = pb.DESCRIPTOR.services_by_name["AdjointDPMService"]
    assert service.name == served.name
    assert {m.name for m in service.method} <= {m.name for m in served.methods}


# ---- the server's side of the 1.0 contract -------------------------------------------------------

def test_each_rpc_answers_in_its_own_response_and_refuses_an_undeclared_event():
    from adjointdpm.v1 import adjointdpm_pb2 as pb
    from adjointdpm_server.wire.servicer import _response

    progress = pb.Progress(phase="forward", step=1, total=2)
    assert _response(pb.SampleResponse)("progress", progress) == pb.SampleResponse(progress=progress)
    with pytest.raises(TypeError, match="SampleResponse has no 'plan' event"):
        _response(pb.SampleResponse)("plan", pb.MemoryPlan())
    with pytest.raises(TypeError, match="ComputeGradientResponse has no 'job' event"):
        _response(pb.ComputeGradientResponse)("job", pb.Job(id="j"))


def test_unspecified_enum_values_read_as_the_documented_defaults():
    from adjointdpm import options
    from adjointdpm.v1 import adjointdpm_pb2 as pb
    from adjointdpm_server.wire import convert

    spec = pb.GradientSpec(targets=[pb.TARGET_UNSPECIFIED, pb.TARGET_COND])
    assert options.read("ComputeGradient", spec)["targets"] == ["x_T", "cond"]
    assert options.read("ComputeGradient", pb.GradientSpec(targets=[pb.TARGET_X_T, pb.TARGET_WEIGHTS,
                                                                      pb.TARGET_TOKEN]))["targets"] == [
        "x_T", "weights", "token"]
    assert convert.DOMAINS[pb.DOMAIN_UNSPECIFIED] == "image" == convert.DOMAINS[pb.DOMAIN_IMAGE]
    assert convert.DOMAINS[pb.DOMAIN_LATENT] == "latent"
    (term,) = convert.losses([pb.LossTerm(server=pb.ServerLoss(name="mse"))], limits=None)
    assert term.domain == "image"  # an unset domain
