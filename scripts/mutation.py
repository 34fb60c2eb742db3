#!/usr/bin/env python3
"""Mutation testing of the server, run by hand (issue 15, item 4). Not in CI: it is too slow.

Why: a green suite shows that the code runs. Mutation testing shows whether the tests would
notice if the code were wrong. It changes one operator, number or condition at a time (a
"mutant"), runs the tests that should catch the change, and counts the mutants they kill.

    nice -n 19 python3 scripts/mutation.py --sample 12        # every group, about an hour on 2 cores
    nice -n 19 python3 scripts/mutation.py --groups core --sample 200 --out /tmp/core.md
    nice -n 19 python3 scripts/mutation.py --sample core=40,engine=20,tasks=10,service=12
    python3 scripts/mutation.py --python /path/to/venv/bin/python   # when the project's venv is not .venv

On 2 cores one mutant takes about 8 s in core when killed (55 s when it survives: the whole of
tests/core runs), 50 s in engine, 100 s in tasks and service (tests/service + tests/reliability).

Tool: cosmic-ray, pinned in scripts/mutation.toml and installed on first use into
.venv-mutation/ (its own venv; the tests run with the project's interpreter). Its operators make
the mutants and its session database records them (`.venv-mutation/bin/cr-report` reads a session
kept with --keep). Each mutant is written into the source file and the group's pytest command runs
as a plain subprocess, so it works with our two packages (server/ and sdk/) and with tests that
start `python -m adjointdpm_server` in a subprocess. (mutmut 3 instead copies the code and swaps
every function for a trampoline.) All of it happens in a scratch copy of the tree (the files git
tracks or would track), put first on PYTHONPATH, so the working tree is never modified.

Groups, their files, test commands and goals are in scripts/mutation.toml. A line marked
`# pragma: no mutate` is skipped. The script writes benchmarks/results/mutation.md: mutants per
module (killed, survived, timeouts) and one row per survivor, with a column for "equivalent?
reason". Reasons already written there are kept on the next run when the mutated line is the same.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import glob
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "scripts" / "mutation.toml"
TOOL_VENV = REPO / ".venv-mutation"
PKG = Path("server/adjointdpm_server")


def load_config() -> dict:
    try:
        import tomllib
        return tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    except ImportError:  # Python 3.10: cosmic-ray depends on `toml`
        import toml
        return toml.loads(CONFIG.read_text(encoding="utf-8"))


def ensure_tool_venv(tool: str) -> None:
    """Re-run this script inside .venv-mutation, creating it with the pinned tool when missing."""
    tool_python = TOOL_VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == TOOL_VENV.resolve():
        return
    stamp = TOOL_VENV / ".installed"
    if not tool_python.exists() or not stamp.exists() or stamp.read_text(encoding="utf-8") != tool:
        print(f"installing {tool} into {TOOL_VENV.name}/ ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TOOL_VENV)], check=True)
        subprocess.run([str(tool_python), "-m", "pip", "install", "-q", tool], check=True)
        stamp.write_text(tool)
    os.execv(str(tool_python), [str(tool_python), __file__, *sys.argv[1:]])


def scratch_copy(dest: Path) -> None:
    """Copy the files git tracks or would track (no .venv, caches or outputs) into `dest`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def group_files(patterns: list[str]) -> list[Path]:
    files = {Path(p) for pat in patterns for p in glob.glob(str(PKG / pat))}
    return sorted(f for f in files if f.suffix == ".py")


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where type annotations are: with ``from __future__ import annotations`` they are never
    evaluated, so a mutant inside one (``X | None`` → ``X - None``) is equivalent by construction."""
    import ast

    spans = []
    for node in ast.walk(ast.parse(source)):
        found = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            found.append(node.returns)
        elif isinstance(node, ast.arg) and node.annotation is not None:
            found.append(node.annotation)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
        spans += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in found]
    return spans


def mutants_of(db, files, exclude) -> tuple[list, int]:
    """Fill the session with every mutant of `files`, minus excluded operators, pragma lines and
    mutants inside annotations. Returns the mutants to choose from (sorted, for a reproducible
    sample) and how many were left out."""
    from cosmic_ray.commands.init import init

    init(files, db, {})
    excluded = re.compile("|".join(exclude)) if exclude else None
    sources = {f: f.read_text(encoding="utf-8") for f in files}
    lines = {f: text.splitlines() for f, text in sources.items()}
    annotations = {f: annotation_spans(text) if "from __future__ import annotations" in text else []
                   for f, text in sources.items()}
    keep, dropped = [], 0
    for item in db.work_items:
        m = item.mutations[0]
        end_line = m.end_pos[0] - (1 if m.end_pos[1] == 0 else 0)
        in_annotation = any(a <= tuple(m.start_pos) and tuple(m.end_pos) <= b for a, b in annotations[m.module_path])
        if ((excluded and excluded.search(m.operator_name)) or in_annotation
                or "pragma: no mutate" in lines[m.module_path][end_line - 1]):
            dropped += 1
        else:
            keep.append(item)
    keep.sort(key=lambda it: (str(it.mutations[0].module_path), it.mutations[0].start_pos,
                              it.mutations[0].operator_name, it.mutations[0].occurrence))
    return keep, dropped


def mutant_code(item) -> str | None:
    """The mutated module, or None when it is not valid Python: cosmic-ray 8.7 also "mutates" the
    `*` of keyword-only parameters and `*args`, a SyntaxError that any test run would "kill"."""
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator

    m = item.mutations[0]
    operator = get_operator(m.operator_name)(**m.operator_args)
    code = mutate_code(m.module_path.read_text(encoding="utf-8"), operator, m.occurrence)
    try:
        with warnings.catch_warnings():  # `x is "literal"` mutants warn, and are valid
            warnings.simplefilter("ignore")
            compile(code or "", str(m.module_path), "exec")
    except SyntaxError:
        return None
    return code


def run_tests(command: str, timeout: float, write_bytecode: bool = False) -> tuple[str, str]:
    """Run the test command in its own process group; returns (outcome, output). Whatever is
    left of the group afterwards (a server started by a test that was cut short) is killed."""
    env = dict(os.environ) if write_bytecode else dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if output is None:
        return "timeout", proc.communicate()[0]
    if proc.returncode == 0:
        return "survived", output
    # pytest-timeout (--timeout-method=thread) prints a "+++ Timeout +++" banner, then exits
    return ("timeout" if re.search(r"^\++ Timeout \++$", output, re.M) else "killed"), output


def run_group(name: str, spec: dict, cfg: dict, args, scratch: Path, results: list) -> None:
    """Test the group's mutants; its entry in `results` is filled as it goes (for Ctrl-C)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    command = f"{shlex.quote(args.python)} -m pytest {cfg['pytest-args']} {' '.join(spec['tests'])}"
    print(f"\n== {name}: baseline `{command}`", flush=True)
    baseline_s = next((r["baseline_s"] for r in results if r["command"] == command), None)
    if baseline_s is None:
        started = time.monotonic()
        # The baseline writes __pycache__ (the mutants don't), which saves recompiling the
        # unmutated modules for every mutant.
        outcome, output = run_tests(command, 3600, write_bytecode=True)
        baseline_s = time.monotonic() - started
        if outcome != "survived":
            sys.exit(f"{name}: the tests fail without any mutant ({baseline_s:.0f} s); fix them first:\n"
                     + output[-3000:])
    timeout = args.timeout or cfg["timeout-factor"] * baseline_s + 30
    print(f"   baseline passed in {baseline_s:.0f} s; per-mutant timeout {timeout:.0f} s", flush=True)

    files = group_files(spec["files"])
    with use_db(str(scratch / f"mutation-{name}.sqlite"), WorkDB.Mode.create) as db:
        pool, dropped = mutants_of(db, files, cfg.get("exclude-operators", []))
        order = list(range(len(pool)))
        sample = args.sample.get(name, args.sample.get("*", 0))
        if sample:
            random.Random(f"{args.seed}-{name}").shuffle(order)
        chosen, invalid = [], 0
        for i in order:  # drawn in a seeded order until the sample is full; invalid mutants don't count
            if sample and len(chosen) == sample:
                break
            code = mutant_code(pool[i])
            if code is None:
                invalid += 1
            else:
                chosen.append((i, code))
        chosen.sort()
        print(f"   {len(pool)} mutants in {len(files)} files ({dropped} excluded); testing {len(chosen)}"
              f" ({invalid} skipped: not valid Python)", flush=True)

        per_module = defaultdict(lambda: defaultdict(int))
        for item in pool:
            per_module[str(item.mutations[0].module_path.relative_to(PKG))]["mutants"] += 1
        survivors, times = [], []
        results.append(dict(name=name, goal=spec.get("goal"), command=command, baseline_s=baseline_s,
                            timeout=timeout, per_module=per_module, survivors=survivors, times=times,
                            dropped=dropped, invalid=invalid))
        for n, (i, code) in enumerate(chosen, 1):
            item, m = pool[i], pool[i].mutations[0]
            original = m.module_path.read_text(encoding="utf-8")
            t0 = time.monotonic()
            try:
                m.module_path.write_text(code, encoding="utf-8")
                outcome, output = run_tests(command, timeout)
            finally:
                m.module_path.write_text(original, encoding="utf-8")
            times.append(time.monotonic() - t0)
            diff = "\n".join(difflib.unified_diff(original.splitlines(), code.splitlines(), lineterm="", n=0))
            db.set_result(item.job_id, WorkResult(
                worker_outcome=WorkerOutcome.NORMAL, output=output, diff=diff,
                test_outcome=TestOutcome.SURVIVED if outcome == "survived" else TestOutcome.KILLED))
            if outcome == "survived":
                survivors.append((m, diff))
            stats = per_module[str(m.module_path.relative_to(PKG))]
            stats["tested"] += 1
            stats[outcome] += 1
            print(f"   [{name} {n}/{len(chosen)}] {m.module_path.relative_to(PKG)}:{m.start_pos[0]} "
                  f"{m.operator_name.removeprefix('core/')} -> {outcome} ({times[-1]:.0f} s)", flush=True)


def changed_lines(diff: str) -> tuple[str, str]:
    old = [l[1:].strip() for l in diff.splitlines() if l.startswith("-") and not l.startswith("---")]
    new = [l[1:].strip() for l in diff.splitlines() if l.startswith("+") and not l.startswith("+++")]
    return " ".join(old), " ".join(new)


def old_reasons(path: Path) -> dict:
    """Reasons already filled in the survivors table, keyed by (module, operator, mutation)."""
    reasons = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            if len(cells) == 4 and ":" in cells[0] and cells[3]:
                reasons[(cells[0].rsplit(":", 1)[0], cells[1], cells[2])] = cells[3]
    return reasons


def parse_sample(text: str) -> dict[str, int]:
    """``12`` (every group) or ``core=40,engine=20`` (the groups named; others: all mutants)."""
    if "=" not in text:
        return {"*": int(text)}
    return {name.strip(): int(n) for name, n in (part.split("=", 1) for part in text.split(","))}


def describe_sample(sample: dict[str, int]) -> str:
    if set(sample) == {"*"}:
        return f"{sample['*']} random mutants per group" if sample["*"] else "all mutants"
    return "random mutants per group: " + ", ".join(f"{k} {v or 'all'}" for k, v in sample.items())


def write_report(path: Path, results: list[dict], args, tool: str, interrupted: bool) -> None:
    cell = lambda s: s.replace("|", "\\|")
    reasons = old_reasons(path)
    out = ["# Mutation testing", "",
           f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}" + (" (interrupted)" if interrupted else ""),
           f"- tool: {tool} (scripts/mutation.py, config scripts/mutation.toml); {os.cpu_count()} CPUs",
           f"- command: `python3 scripts/mutation.py {' '.join(sys.argv[1:])}`",
           f"- sample: {describe_sample(args.sample)}, seed {args.seed}",
           "- killed % = (killed + timeouts) / tested: a mutant that hangs the tests is detected.", "",
           "| group | module | mutants | tested | killed | survived | timeouts | killed % | goal |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    pct = lambda s: f"{100 * (s['killed'] + s['timeout']) / s['tested']:.0f}%" if s["tested"] else "—"
    for r in results:
        total = defaultdict(int)
        for module, s in sorted(r["per_module"].items()):
            out.append(f"| {r['name']} | {module} | {s['mutants']} | {s['tested']} | {s['killed']} | "
                       f"{s['survived']} | {s['timeout']} | {pct(s)} | |")
            for k, v in s.items():
                total[k] += v
        goal = f"≥ {r['goal']}%" if r["goal"] else "—"
        out.append(f"| **{r['name']}** | **all** | {total['mutants']} | {total['tested']} | {total['killed']} | "
                   f"{total['survived']} | {total['timeout']} | **{pct(total)}** | {goal} |")
    out += ["", "Excluded: operators left out in scripts/mutation.toml, mutants inside type annotations "
            "(never evaluated: `from __future__ import annotations`) and `# pragma: no mutate` lines. "
            "Invalid: mutants that are not valid Python (cosmic-ray mutating a `*` parameter marker), skipped.", "",
            "| group | tests (pytest) | baseline | per-mutant timeout | mean time per mutant | excluded | invalid |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        mean = f"{sum(r['times']) / len(r['times']):.0f} s" if r["times"] else "—"
        out.append(f"| {r['name']} | `{r['command'].split(' -m pytest ')[1]}` | {r['baseline_s']:.0f} s | "
                   f"{r['timeout']:.0f} s | {mean} | {r['dropped']} | {r['invalid']} |")
    out += ["", "## Survivors", "",
            "Each survivor gets a test that kills it, or a one-line reason why it is equivalent.", "",
            "| where | operator | mutation | equivalent? reason |", "| --- | --- | --- | --- |"]
    for r in results:
        for m, diff in r["survivors"]:
            where = f"{m.module_path}:{m.start_pos[0]}"
            old, new = changed_lines(diff or "")
            mutation = cell(f"`{old}` → `{new}`")
            operator = m.operator_name.removeprefix("core/")
            reason = reasons.get((where.rsplit(":", 1)[0], operator, mutation), "")
            out.append(f"| {where} | {operator} | {mutation} | {reason} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    print(f"\nwrote {path}", flush=True)


def main() -> None:
    cfg = load_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default=",".join(cfg["groups"]), help="comma-separated, from scripts/mutation.toml")
    parser.add_argument("--sample", type=parse_sample, default={"*": 0},
                        help="test N random mutants per group (0: all), or per group: core=40,engine=20")
    parser.add_argument("--seed", type=int, default=cfg["mutation"]["seed"])
    parser.add_argument("--timeout", type=float, default=0, help="per-mutant timeout in s (default: from the baseline)")
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="the project's interpreter")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mutation.md")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy and its cosmic-ray sessions")
    args = parser.parse_args()
    args.python, args.out = os.path.abspath(args.python), args.out.absolute()  # the run chdirs
    unknown = set(args.groups.split(",")) - set(cfg["groups"])
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; known: {list(cfg['groups'])}")
    if not Path(args.python).exists():
        parser.error(f"{args.python} not found: run scripts/setup.sh or pass --python")

    tool = cfg["mutation"]["tool"]
    ensure_tool_venv(tool)
    scratch = Path(tempfile.mkdtemp(prefix="adjointdpm-mutation-"))
    print(f"scratch copy: {scratch}", flush=True)
    scratch_copy(scratch)
    os.chdir(scratch)  # mutants are made and tests run with paths relative to the scratch copy
    os.environ["PYTHONPATH"] = os.pathsep.join([str(scratch / "server"), str(scratch / "sdk")])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results, interrupted = [], False
    try:
        for name in args.groups.split(","):
            run_group(name, cfg["groups"][name], cfg["mutation"], args, scratch, results)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if results:
            write_report(args.out, results, args, tool, interrupted)
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
