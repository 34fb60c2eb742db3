"""The README's main job runs: server started, SDK drives it, pictures written."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--iterations", "2",
                          "--digit", "4"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "optimize_latent → 4 with a client-side loss" in out.stdout
    for name in ("digits_grid.png", "digits_steer_to_4.png"):
        assert (ROOT / "out" / name).stat().st_size > 100
