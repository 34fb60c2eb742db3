"""Two distributions from one repository, one version: the SDK ``adjointdpm`` (sdk/) and the
server ``adjointdpm-server`` (server/). Both wheels are built here, the way a release builds them
(``python -m build --wheel --no-isolation``, with this interpreter's setuptools), from a copy of
sdk/ and server/, and their contents and metadata are held to the split: the SDK wheel ships no
server and needs no torch, the server wheel ships no SDK and pins exactly the SDK of its own
version. scripts/check_wheels.sh (CI) installs them into fresh venvs and runs them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

import adjointdpm
from _needs import needs_module

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = Path("adjointdpm_server/models/weights")
LOSSES = {"mse", "classifier", "gram_style", "clip_similarity", "triton", "aesthetic", "preference"}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """{"sdk": wheel, "server": wheel}, built from a copy of sdk/ and server/ side by side (the
    server's setup.py reads the version from ../sdk, as in the repository)."""
    needs_module("build", "build (tests/requirements.txt)")
    needs_module("setuptools", "setuptools (tests/requirements.txt)")
    tmp = tmp_path_factory.mktemp("distributions")
    junk = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.pyc")
    built = {}
    for name in ("sdk", "server"):
        shutil.copytree(ROOT / name, tmp / name, ignore=junk)
    for name in ("sdk", "server"):
        out = tmp / f"dist-{name}"
        run = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                              "--outdir", str(out), str(tmp / name)],
                             capture_output=True, text=True, timeout=300, cwd=tmp)
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        (wheel,) = out.glob("*.whl")
        built[name] = wheel
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _dist_info(wheel: Path, file: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        (path,) = [n for n in zf.namelist()
                   if n.count("/") == 1 and n.split("/")[0].endswith(".dist-info") and n.endswith("/" + file)]
        return zf.read(path).decode()


def _metadata(wheel: Path):
    return HeaderParser().parsestr(_dist_info(wheel, "METADATA"))


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_the_sdk_wheel_holds_the_sdk_typed_with_its_generated_code_and_no_server(wheels):
    names = _names(wheels["sdk"])
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"adjointdpm"}, packages
    assert not [n for n in names if n.startswith("adjointdpm_server/")]
    for file in ("adjointdpm/py.typed", "adjointdpm/_version.py", "adjointdpm/cli.py",
                 "adjointdpm/v1/adjointdpm_pb2.py", "adjointdpm/v1/adjointdpm_pb2.pyi",
                 "adjointdpm/v1/adjointdpm_pb2_grpc.py", "adjointdpm/v1/tensor_pb2.pyi"):
        assert file in names, f"the SDK wheel lacks {file}"
    # every module of the SDK's sources is in the wheel
    sources = {p.relative_to(ROOT / "sdk").as_posix() for p in (ROOT / "sdk" / "adjointdpm").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))


def test_the_sdk_wheel_needs_no_torch_and_no_server(wheels):
    meta = _metadata(wheels["sdk"])
    assert meta["Name"] == "adjointdpm"
    requires = {_requirement_name(r) for r in meta.get_all("Requires-Dist") or []}
    assert requires == {"grpcio", "protobuf", "numpy", "tqdm", "pillow", "safetensors"}, requires
    assert meta["License-Expression"] == "Apache-2.0"
    assert "console_scripts" in (eps := _dist_info(wheels["sdk"], "entry_points.txt"))
    assert re.search(r"^adjointdpm = adjointdpm\.cli:main$", eps, re.M), eps
    assert "adjointdpm-server" not in eps and "adjointdpm.losses" not in eps


def test_the_server_wheel_holds_the_server_and_its_weights_and_no_sdk(wheels):
    names = _names(wheels["server"])
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"adjointdpm_server"}, packages
    assert not [n for n in names if n.startswith("adjointdpm/")]
    source = ROOT / "server" / WEIGHTS
    weights = {p.relative_to(ROOT / "server").as_posix(): p.stat().st_size
               for p in source.rglob("*") if p.is_file()}
    assert any(w.endswith(".safetensors") for w in weights), "no embedded weights in the sources?"
    with zipfile.ZipFile(wheels["server"]) as zf:
        shipped = {i.filename: i.file_size for i in zf.infolist()
                   if i.filename.startswith(WEIGHTS.as_posix() + "/")}
    assert shipped == weights, (sorted(set(weights) ^ set(shipped)), "sizes differ")


def test_the_server_wheel_pins_the_sdk_of_its_own_version(wheels):
    meta = _metadata(wheels["server"])
    assert meta["Name"] == "adjointdpm-server"
    requires = meta.get_all("Requires-Dist") or []
    plain = [r for r in requires if "extra ==" not in r]
    assert f"adjointdpm=={adjointdpm.__version__}" in plain, plain
    assert [r for r in plain if _requirement_name(r) == "adjointdpm"] == [f"adjointdpm=={adjointdpm.__version__}"]
    assert "torch" in {_requirement_name(r) for r in plain}
    extras = {r.split(";")[0].strip() for r in requires if 'extra == "tracing"' in r}
    assert {_requirement_name(r) for r in extras} == {"opentelemetry-api", "opentelemetry-sdk"}, extras


def test_both_wheels_carry_the_one_version(wheels):
    version = adjointdpm.__version__
    text = (ROOT / "sdk" / "adjointdpm" / "_version.py").read_text()
    assert re.search(rf'^__version__ = "{re.escape(version)}"$', text, re.M), \
        "adjointdpm.__version__ is not the one in sdk/adjointdpm/_version.py"
    for name, wheel in wheels.items():
        assert _metadata(wheel)["Version"] == version, name
        assert wheel.name.split("-")[1] == version, wheel.name


def test_the_server_wheel_declares_its_command_and_the_losses(wheels):
    eps = _dist_info(wheels["server"], "entry_points.txt")
    sections = dict(re.findall(r"^\[([^\]]+)\]\n((?:[^\[\n].*\n?)*)", eps, re.M))
    scripts = dict(re.findall(r"^(\S+) = (\S+)$", sections.get("console_scripts", ""), re.M))
    assert scripts == {"adjointdpm-server": "adjointdpm_server.__main__:main"}, eps
    losses = dict(re.findall(r"^(\S+) = (\S+)$", sections.get("adjointdpm.losses", ""), re.M))
    assert set(losses) == LOSSES, eps
    assert all(target.startswith("adjointdpm_server.losses.") for target in losses.values()), losses
    # each names a module of the wheel
    names = set(_names(wheels["server"]))
    for target in losses.values():
        module = target.split(":")[0].replace(".", "/") + ".py"
        assert module in names, f"{target}: {module} is not in the wheel"
