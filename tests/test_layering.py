"""House rules: core/ never imports the gRPC layer; the SDK imports neither torch nor the server."""

import re
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


# ---- the rooms of the server and what each may import (docs/architecture.md) ---------------------

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

SERVER = Path(__file__).resolve().parents[1] / "server" / "adjointdpm_server"
# room → the rooms of ours it may import; docs/architecture.md draws the same table
ALLOWED = {
    "errors": set(), "config": set(), "core": set(), "telemetry": set(), "version": set(),
    "integrity": {"errors"},
    "cluster": {"errors"},
    "models": {"core", "errors"},
    "engine": {"core", "errors"},
    "losses": {"core", "models", "errors", "integrity"},
    "storage": {"cluster", "errors", "integrity"},
    "admission": {"errors"},
    "tasks": {"cluster", "config", "core", "models", "losses", "storage", "telemetry", "errors",
              "integrity"},
    "runtime": {"cluster", "config", "models", "engine", "storage", "losses", "errors"},
    "wire": {"admission", "cluster", "config", "core", "errors", "integrity", "losses", "runtime",
             "storage", "tasks", "telemetry", "version"},
    "__main__": {"config", "models", "telemetry", "wire"},
    "__init__": {"version"},
}
EDGE_ONLY = ("grpc", "grpc_health", "grpc_reflection", "google", "adjointdpm")  # the wire's alone


def _rooms():
    """(room, file, [(kind, target)]) for every module: kind "ours" (a room) or "outside"."""
    for path in sorted(SERVER.rglob("*.py")):
        parts = list(path.relative_to(SERVER).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        room = parts[0] if len(parts) > 1 else parts[0]
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
                found += ([("ours", target[0])] if target else
                          [("ours", alias.name) for alias in node.names])
            elif isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")
                found.append(("ours", top[1]) if top[0] == "adjointdpm_server" else ("outside", top[0]))
            elif isinstance(node, ast.Import):
                found += [("outside", alias.name.split(".")[0]) for alias in node.names]
        yield room, path.relative_to(SERVER), found


def test_every_room_imports_only_the_rooms_below_it():
    broken, unknown = [], []
    for room, path, found in _rooms():
        if room not in ALLOWED:
            unknown.append(str(path))
            continue
        broken += [f"{path} imports {target}" for kind, target in found
                   if kind == "ours" and target != room and target not in ALLOWED[room]]
    assert not unknown, f"modules in no room of the table (add the room to ALLOWED and docs/architecture.md): {unknown}"
    assert not broken, "imports across the layering (docs/architecture.md):\n" + "\n".join(broken)


def test_only_the_wire_knows_grpc_and_the_generated_code():
    leaks = [f"{path} imports {target}" for room, path, found in _rooms() if room != "wire"
             for kind, target in found if kind == "outside" and target in EDGE_ONLY]
    assert not leaks, "\n".join(leaks)


def test_the_rooms_table_is_the_architecture_documents():
    doc = (SERVER.parents[1] / "docs" / "architecture.md").read_text()
    for room, allowed in ALLOWED.items():
        if room == "__init__":
            continue
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{room}")), None)
        assert row is not None, f"docs/architecture.md has no row for {room}"
        cells = row.split("|")
        named = set(re.findall(r"`([a-z_]+)`", cells[3]))
        assert named == allowed, (room, named, allowed)


MAX_LINES, MAX_PARAMS = 40, 7  # a task step reads in one screen; the options object carries the rest


def test_every_task_step_reads_in_one_screen():
    """Every function and method under tasks/ is at most 40 lines (def to last line, docstring
    included) with at most 7 positional parameters (the run_* take ctx, their inputs, the job and
    opts); keyword-only ones are named overrides with defaults (run_sampler's), not a list to
    remember."""
    long = []
    for path in sorted((SERVER / "tasks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                params = len(args.posonlyargs) + len(args.args)
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES or params > MAX_PARAMS:
                    long.append(f"tasks/{path.name}:{node.lineno} {node.name}: {lines} lines, {params} parameters")
    assert not long, "\n".join(long)
