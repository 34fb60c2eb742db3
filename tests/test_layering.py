"""House rules: core/ never imports the gRPC layer; the SDK imports neither torch nor the server."""

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_core_does_not_import_grpc():
    mods = _modules_after("import adjointdpm_server.core")
    assert "torch" in mods
    assert not {m for m in mods if m == "grpc" or m.startswith("grpc.")}


def test_sdk_imports_neither_torch_nor_the_server():
    mods = _modules_after("import adjointdpm")
    assert "adjointdpm" in mods
    assert "torch" not in mods and "adjointdpm_server" not in mods


def test_sdk_imports_with_torch_unavailable():
    code = "import sys; sys.modules['torch'] = None; import adjointdpm; print(adjointdpm.__version__)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tasks_and_losses_do_not_import_grpc():
    """The gRPC layer only translates: tasks, losses, models and the engine work without it."""
    mods = _modules_after("import adjointdpm_server.tasks, adjointdpm_server.losses, "
                          "adjointdpm_server.models, adjointdpm_server.engine")
    assert not {m for m in mods if m == "grpc" or m.startswith("grpc.")}


def test_server_command_on_an_sdk_only_install_says_how_to_install_the_server():
    """Without the server's dependencies, ``adjointdpm-server`` explains instead of a traceback."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from adjointdpm_server.__main__ import main\nmain(['--port', '0'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "the server is not installed here (torch is missing)" in run.stderr
    assert "pip install" in run.stderr and "Traceback" not in run.stderr
