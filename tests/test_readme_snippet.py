"""The README's SDK snippet runs as written, in a process where torch cannot be imported (as on a
bare SDK install), against a real server on a loopback port."""

import re
import subprocess
import sys
from pathlib import Path

from adjointdpm_server.config import Limits, ServerConfig
from adjointdpm_server.wire import build_server

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(marker: str = "sdk-snippet") -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker}[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, f"the README lost its {marker} marker"
    return match.group(1)


def test_readme_sdk_snippet_runs_without_torch(tmp_path):
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "artifacts",
                                    limits=Limits(max_steps=50, max_iterations=50)))
    try:
        code = _snippet().replace("localhost:50051", f"127.0.0.1:{srv.port}")
        blocked = "import sys; sys.modules['torch'] = None\n"  # `import torch` raises ImportError
        run = subprocess.run([sys.executable, "-c", blocked + code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert (tmp_path / "out" / "sample_000.png").stat().st_size > 0
        assert (tmp_path / "out" / "adapter.safetensors").stat().st_size > 0
        loss, nfe = run.stdout.split()[:2]
        assert 0.0 < float(loss) < 1.0 and int(nfe) >= 10  # auto: 10 calls, more if any is recomputed
    finally:
        srv.stop(0)


def test_readme_aio_snippet_runs_without_torch(tmp_path):
    srv = build_server(ServerConfig(models=("digits",), port=0, artifact_dir=tmp_path / "artifacts"))
    try:
        code = _snippet("aio-snippet").replace("localhost:50051", f"127.0.0.1:{srv.port}")
        blocked = "import sys; sys.modules['torch'] = None\n"
        run = subprocess.run([sys.executable, "-c", blocked + code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        loss, shape, images = run.stdout.split(maxsplit=1)[0], run.stdout.split("(")[1], run.stdout.split()[-1]
        assert 0.0 < float(loss) < 2.0 and shape.startswith("2, 1, 8, 8") and int(images) == 10
    finally:
        srv.stop(0)
