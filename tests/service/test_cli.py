"""The ``adjointdpm`` CLI, run in-process against a loopback server: files written, numbers equal
to the same calls made through the SDK."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

import adjointdpm
from adjointdpm.cli import main

TO_EIGHT = ["--loss", "classifier", "--params", '{"label": 8}']


@pytest.fixture
def cli(server, tmp_path, capsys):
    """``cli(command, *args)`` → (exit code, stdout, stderr); files go to tmp_path."""
    def run(command, *args):
        code = main(["--target", f"127.0.0.1:{server.port}", command, "--out", str(tmp_path), *args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def _png_sizes(directory, prefix):
    paths = sorted(directory.glob(f"{prefix}*.png"))
    sizes = []
    for path in paths:
        with Image.open(path) as img:
            sizes.append(img.size)
    return [p.name for p in paths], sizes


def test_models_and_losses(server, capsys):
    target = ["--target", f"127.0.0.1:{server.port}"]
    assert main([*target, "models"]) == 0
    table = capsys.readouterr().out
    assert "digits *" in table and "gaussian-mixture" in table
    assert main([*target, "models", "--json"]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)} == {"digits", "gaussian-mixture"}
    assert main([*target, "losses"]) == 0
    assert "classifier" in capsys.readouterr().out


def test_server_prints_the_metadata(server, capsys):
    target = ["--target", f"127.0.0.1:{server.port}"]
    assert main([*target, "server"]) == 0
    text = capsys.readouterr().out
    assert f"adjointdpm-server {adjointdpm.__version__} (API adjointdpm.v1)" in text
    assert "max_steps=200" in text  # the test server's limit
    assert main([*target, "server", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["models"] == ["digits", "gaussian-mixture"] and meta["limits"]["max_batch"] == 16


def test_sample_writes_pngs_and_the_latents(cli, client, tmp_path):
    code, out, _ = cli("sample", "--label", "1", "--label", "2", "--label", "3", "--seed", "0",
                       "--steps", "4")
    assert code == 0
    names, sizes = _png_sizes(tmp_path, "sample_")
    assert names == ["sample_000.png", "sample_001.png", "sample_002.png", "sample_grid.png"]
    assert sizes[:3] == [(256, 256)] * 3  # 8×8 digits enlarged 32× (nearest) to be seen
    assert sizes[3][0] > 3 * 256 and sizes[3][1] > 256  # three columns, labeled above
    with Image.open(tmp_path / "sample_000.png") as big:
        small = np.asarray(big)[::32, ::32]  # nearest neighbour: every 32nd pixel is the original
        assert (np.asarray(big)[:32, :32] == small[0, 0]).all()
    tensors = load_file(tmp_path / "sample.safetensors")
    ref = client.sample(labels=[1, 2, 3], seed=0, steps=4, images=False)
    np.testing.assert_allclose(tensors["x0"], ref.x0, atol=1e-6)
    np.testing.assert_allclose(tensors["x_T"], ref.x_T, atol=1e-6)
    assert out.count("wrote ") == 5 and "sampled 3 images" in out  # 3 PNGs, the grid, the tensors


def test_grad_equals_compute_gradient(cli, client, tmp_path):
    code, out, _ = cli("grad", *TO_EIGHT, "--label", "3", "--seed", "1", "--steps", "5")
    assert code == 0
    ref = client.compute_gradient(adjointdpm.ServerLoss("classifier", {"label": 8}), labels=3,
                                  seed=1, steps=5)
    tensors = load_file(tmp_path / "gradients.safetensors")
    assert set(tensors) == {"x_T", "x0"}
    np.testing.assert_allclose(tensors["x_T"], ref.gradients["x_T"], atol=1e-6)
    np.testing.assert_allclose(tensors["x0"], ref.x0, atol=1e-6)
    assert f"loss {ref.loss:.6g}" in out and "|d/dx_T|" in out


def test_optimize_writes_before_and_after(cli, client, tmp_path):
    code, out, _ = cli("optimize", *TO_EIGHT, "--batch", "2", "--seed", "2", "--steps", "4",
                       "--iterations", "2", "--lr", "0.2", "--constraint", "linf", "--epsilon", "0.3")
    assert code == 0
    for prefix in ("before_0", "after_0"):
        assert _png_sizes(tmp_path, prefix)[1] == [(256, 256)] * 2
    with Image.open(tmp_path / "before_after.png") as grid:
        assert grid.size[0] > 2 * 256 and grid.size[1] >= 2 * 256  # two rows, labeled
    latents = load_file(tmp_path / "latents.safetensors")
    start = client.sample(batch=2, seed=2, steps=4, images=False).x_T
    assert 0 < np.abs(latents["x_T"] - start).max() <= 0.3 + 1e-6
    assert re.search(r"loss \S+ -> \S+ over 2 iterations", out)


def test_finetune_prints_and_downloads_the_adapter(cli, client, tmp_path):
    code, out, _ = cli("finetune", *TO_EIGHT, "--examples", "2", "--label", "3", "--label", "5",
                       "--steps", "4", "--iterations", "2", "--lr", "5e-3", "--name", "eights")
    assert code == 0
    artifact_id = re.search(r"adapter (\S+) \(lora\)", out).group(1)
    state = load_file(tmp_path / f"adapter-{artifact_id}.safetensors")
    assert state and all("lora_" in k for k in state)
    tuned = client.sample(labels=3, seed=0, steps=4, adapter=artifact_id, images=False)
    assert tuned.x0.shape == (1, 1, 8, 8)
    # the same bytes through `artifact`
    code, out, _ = cli("artifact", artifact_id)
    assert code == 0
    assert ((tmp_path / f"{artifact_id}.safetensors").read_bytes()
            == (tmp_path / f"adapter-{artifact_id}.safetensors").read_bytes())


def test_optimize_stops_per_sample_and_finetune_validates(cli):
    """The CLI carries stop_when, schedules, validation and keep-best to the service."""
    code, out, _ = cli("optimize", "--loss", "classifier", "--params", '{"label": 3, "mode": "margin"}',
                       "--label", "3", "--batch", "2", "--seed", "2", "--steps", "4",
                       "--iterations", "3", "--stop-below", "1e9", "--schedule", "cosine")
    assert code == 0 and "stopped early: 2/2 samples; best iterations 0 0" in out
    assert re.search(r"over 1 iterations", out)  # every sample stopped at its first iterate
    code, out, _ = cli("finetune", *TO_EIGHT, "--examples", "2", "--label", "3", "--steps", "4",
                       "--iterations", "2", "--lr", "5e-3", "--validation", "2", "--keep-best")
    assert code == 0
    assert re.search(r"validation after 2 steps: loss \S+, verdicts kept \d+% \(best\)", out)
    code, out, _ = cli("invert", *TO_EIGHT, "--batch", "2", "--steps", "4", "--iterations", "3",
                       "--prior", "gaussian", "--prior-weight", "2", "--stop-below", "1e9")
    assert code == 0 and re.search(r"over 1 iterations", out)


def test_invert_from_a_png(cli, tmp_path):
    target = np.zeros((8, 8), np.uint8)
    target[1:7, 3:5] = 255  # a "1"
    Image.fromarray(target).save(tmp_path / "one.png")
    code, out, _ = cli("invert", "--target-image", str(tmp_path / "one.png"), "--label", "7",
                       "--seed", "0", "--batch", "2", "--steps", "4", "--iterations", "2")
    assert code == 0
    artifact_id = re.search(r"embedding (\S+):", out).group(1)
    assert artifact_id.startswith("embedding-") and load_file(tmp_path / f"{artifact_id}.safetensors")


def test_service_and_usage_errors(cli):
    code, _, err = cli("sample", "--model", "nope", "--steps", "4")
    assert code == 1 and err.startswith("error: NOT_FOUND: ")
    code, _, err = cli("grad", "--loss", "classifier", "--params", "{not json")
    assert code == 2 and "not valid JSON" in err
    code, _, err = cli("invert", "--steps", "4")
    assert code == 2 and "--target-image" in err


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, adjointdpm.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
