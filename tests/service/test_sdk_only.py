"""A bare SDK install (no torch, no server) writes tensors as safetensors, as everything else does:
safetensors' numpy API is an SDK dependency."""

import importlib.metadata
import re
import subprocess
import sys

from safetensors.numpy import load_file


def test_safetensors_is_a_dependency_of_the_sdk_itself_not_of_an_extra():
    requires = importlib.metadata.requires("adjointdpm") or []
    plain = [r for r in requires if "extra ==" not in r]
    assert any(re.match(r"safetensors\b", r) for r in plain), plain


def test_the_cli_without_torch_writes_safetensors(server, tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from adjointdpm.cli import main\n"
            f"sys.exit(main(['--target', '127.0.0.1:{server.port}', 'grad', '--out', {str(tmp_path)!r},"
            " '--loss', 'classifier', '--params', '{\"label\": 8}', '--label', '3', '--steps', '4',"
            " '--seed', '0']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not installed" not in run.stdout + run.stderr
    assert not list(tmp_path.glob("*.npz"))
    files = list(tmp_path.glob("*.safetensors"))
    assert files, run.stdout
    tensors = load_file(str(files[0]))
    assert tensors["x_T"].shape == (1, 1, 8, 8)
