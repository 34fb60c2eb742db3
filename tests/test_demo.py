"""The README's main job runs: server started, SDK drives it, pictures written."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end():
    started = time.time() - 1  # the pictures must be this run's, not left from an earlier one
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--iterations", "2",
                          "--digit", "4"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "optimize_latent → 4 with a client-side loss" in out.stdout
    assert "digits-flow (rectified flow, velocity): 40 digits" in out.stdout
    for name in ("digits_grid.png", "digits_steer_to_4.png", "digits_flow_grid.png"):
        stat = (ROOT / "out" / name).stat()
        assert stat.st_size > 100 and stat.st_mtime >= started
