"""The README's CLI audit runs as written against a loopback digits server, and it finds what the
README says it finds: the stated share of samples flip, and each flipped image stays within the
stated pixel distance of its start."""

import re
import shlex
from pathlib import Path

from adjointdpm.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _audit_line() -> tuple[list[str], str]:
    """The README's `adjointdpm optimize-latent … --stop-on-flip` command (continuations joined) as argv
    after `adjointdpm`, and its trailing comment."""
    text = README.read_text().replace("\\\n", " ")
    lines = [ln for ln in text.splitlines() if ln.startswith("adjointdpm optimize-latent") and "--stop-on-flip" in ln]
    assert len(lines) == 1, "the README lost its audit example (or has two)"
    command, _, comment = lines[0].partition("#")
    return shlex.split(command)[1:], comment


def test_readme_audit_flips_the_stated_share_close_to_the_start(server, tmp_path, capsys):
    argv, comment = _audit_line()
    stated = re.search(r"(\d+)/(\d+) flip, each within RMS ([\d.]+), L∞ ([\d.]+)", comment)
    assert stated, f"the audit's comment no longer states its figures: {comment!r}"
    flips, total, rms_limit, linf_limit = int(stated[1]), int(stated[2]), float(stated[3]), float(stated[4])
    assert "--seed" in argv, "a README figure needs a fixed seed"

    code = main(["--target", f"127.0.0.1:{server.port}", *argv, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    printed = re.search(r"audit: (\d+)/(\d+) samples flipped \(the classifier's verdict changed\); "
                        r"their pixel change from the start \(in \[0, 1\]\): RMS mean ([\d.]+) max ([\d.]+), "
                        r"L-inf mean ([\d.]+) max ([\d.]+)", out)
    assert printed, out[-2000:]
    flipped, n = int(printed[1]), int(printed[2])
    rms_mean, rms_max, linf_mean, linf_max = map(float, printed.groups()[2:])
    assert n == total and flipped >= flips  # the stated share, at least
    assert 0 < rms_mean <= rms_max <= rms_limit and 0 < linf_mean <= linf_max <= linf_limit
    # the line agrees with the per-sample report above it
    assert re.search(rf"stopped early: {flipped}/{n} samples", out)
