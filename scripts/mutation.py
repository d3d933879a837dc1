"""Mutation testing of the critical modules with mutmut 2 (see docs/mutation.md); run it as scripts/mutation.sh.

Each module is mutated with only the fast tests that cover it (``MODULES``), never the whole suite. The work
happens in a scratch copy of the repository (``test-artifacts/mutation/work``): mutmut writes each mutant into
the file it mutates, and a copy means an interrupted run can never leave a mutant in the working tree. The
copy is imported as ``edgeopt`` through ``PYTHONPATH`` (a folder of links, searched before the editable
install), so the tests and the processes they start run the mutated file.

Results are kept per module in ``test-artifacts/mutation/<key>.mutmut-cache``: a second run re-tests only
the mutants that survived (mutmut keeps killed ones killed), so ``--tests-from REV`` (the tests of an older
revision) followed by a plain run measures the score before and after new tests. Mutants judged equivalent
(no test can tell them from the original) are listed with their reason in ``scripts/mutation_equivalent.toml``
and left out of the score's denominator.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10 (pyproject installs tomli there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test-artifacts" / "mutation"
WORK = OUT / "work"
EQUIVALENT = ROOT / "scripts" / "mutation_equivalent.toml"
POSTGRES_URL: str | None = None  # --postgres: the PostgreSQL variants of the dashboard tests run too
PACKAGES = {"sdk": "sdk", "agent": "agent", "dashboard": "dashboard", "hardware_profiles": "hardware_profiles"}

# key -> (files to mutate, the fast tests that cover them). Paths relative to the repository root.
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "accuracy": (["sdk/pipeline/accuracy.py", "sdk/pipeline/tasks/base.py", "sdk/pipeline/tasks/generic.py",
                  "sdk/pipeline/tasks/classify.py", "sdk/pipeline/tasks/embed.py", "sdk/pipeline/tasks/segment.py",
                  "sdk/pipeline/tasks/custom.py",
                  # the detect and vad tasks the gate also chooses (issue 15: added after the first figures)
                  "sdk/pipeline/tasks/detect.py", "sdk/pipeline/tasks/detect_heads.py", "sdk/pipeline/tasks/vad.py"],
                 ["tests/sdk/test_tasks_unit.py", "tests/sdk/test_detect_unit.py", "tests/sdk/test_budget_rules.py",
                  "tests/sdk/test_tasks.py"]),
    "float-search": (["sdk/pipeline/evaluation.py"], ["tests/sdk/test_float_search_unit.py",
                                                      "tests/sdk/test_float_search.py"]),
    # test_telemetry_unit.py (exact bounds, keys and texts) first: a mutant dies at the first test that sees it
    "telemetry": (["sdk/telemetry.py"], ["tests/sdk/test_telemetry_unit.py", "tests/sdk/test_telemetry_payloads.py",
                                         "tests/sdk/test_latency_sketch.py"]),
    "security": (["dashboard/security.py"], ["tests/dashboard/test_security_unit.py", "tests/dashboard/test_role_matrix.py"]),
    # test_package_errors.py (the CLI on real models) is left out: seconds a run, and the unit tests cover its
    # uses of this module
    "package": (["sdk/package.py"], ["tests/sdk/test_package_unit.py", "tests/sdk/test_package_format.py",
                                     "tests/agent/test_install_hostile.py"]),
    # test_kill.py (the SIGKILL at every write) takes minutes a run: too slow to run once per mutant
    "store": (["agent/store.py"], ["tests/agent/test_store_unit.py", "tests/agent/test_install_store.py"]),
    "installer": (["agent/installer.py"], ["tests/agent/test_installer_unit.py", "tests/agent/test_install.py",
                                           "tests/agent/test_install_hostile.py"]),
    "commands": (["agent/commands.py", "agent/control.py"], ["tests/agent/test_commands_unit.py",
                                                             "tests/agent/test_mqtt_commands.py"]),
    "ingest-writer": (["dashboard/ingest_writer.py"], ["tests/dashboard/test_ingest_writer_unit.py",
                                                       "tests/dashboard/test_ingest_writer.py",
                                                       "tests/dashboard/test_ingest_unit.py"]),
}

MUTMUT_CONFIG = '''\
"""Written by scripts/mutation.py: mutants on logging lines are not made (log text is not behaviour), nor,
with --lines, those outside the range it names."""
import os

_LINES = os.environ.get("EDGEOPT_MUTATION_LINES")


def pre_mutation(context):
    line = context.current_source_line.strip()
    if line.startswith(("log.", "logger.", "_log.")) or "logging.getLogger" in line:
        context.skip = True
    if _LINES:
        first, last = map(int, _LINES.split("-"))
        if not first <= context.current_line_index + 1 <= last:
            context.skip = True
'''


def _copy_tree(rev: str | None, paths: list[str], dest: Path) -> None:
    """The tracked files under ``paths`` at ``rev`` (the working tree when None) into ``dest``."""
    if rev is None:
        files = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for f in filter(None, files):
            src, dst = ROOT / f, dest / f
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        return
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "--", *paths], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def prepare(tests_from: str | None) -> None:
    """A fresh scratch copy: sources of the working tree, tests of ``tests_from`` (or the working tree)."""
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    _copy_tree(None, [*PACKAGES, "pyproject.toml", "setup.py", "scripts"], WORK)
    _copy_tree(tests_from, ["tests"], WORK)
    if (ROOT / ".cache").exists():  # downloaded and generated test assets
        (WORK / ".cache").symlink_to((ROOT / ".cache").resolve())
    pkg = WORK / ".pypath" / "edgeopt"
    pkg.mkdir(parents=True)
    for folder in PACKAGES:
        (pkg / folder).symlink_to(WORK / folder)
    (WORK / "mutmut_config.py").write_text(MUTMUT_CONFIG)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(WORK / ".pypath") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # The SQLite variants only by default: a mutant run is about the module's logic, and PostgreSQL doubles the
    # time. --postgres keeps them, for code that only runs on PostgreSQL (ingest_writer's COPY path).
    env.pop("EDGEOPT_TEST_POSTGRES_URL", None)
    if POSTGRES_URL:
        env["EDGEOPT_TEST_POSTGRES_URL"] = POSTGRES_URL
    env.pop("CI", None)
    return env


def check_import() -> None:
    out = subprocess.run([sys.executable, "-c", "import edgeopt.sdk, sys; print(edgeopt.sdk.__file__)"],
                         cwd=WORK, env=_env(), capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(WORK)):
        raise SystemExit(f"mutation: edgeopt imports from {out}, not from the scratch copy {WORK}")


def run_module(key: str, timeout_base: float, fork_server: bool = True) -> int:
    files, tests = MODULES[key]
    tests = [t for t in tests if (WORK / t).exists()]
    if not tests:
        print(f"mutation: {key}: none of its tests exist in this revision; skipped", flush=True)
        return 0
    cache = OUT / f"{key}.mutmut-cache"
    if POSTGRES_URL:
        cache = _seed_postgres_cache(key)
    if cache.exists():
        shutil.copy2(cache, WORK / ".mutmut-cache")
    else:
        (WORK / ".mutmut-cache").unlink(missing_ok=True)
    if os.environ.get("EDGEOPT_MUTATION_LINES") and (WORK / ".mutmut-cache").exists():
        # mutants skipped by an earlier --lines range are looked at again (mutmut keeps a skip like a result)
        con = sqlite3.connect(WORK / ".mutmut-cache")
        con.execute("UPDATE Mutant SET tested_against_hash = '' WHERE status = 'skipped'")
        con.commit()
        con.close()
    _keep_equivalents(files)
    pytest_args = ["-x", "-q", "-p", "no:cacheprovider", "--timeout", "300", *tests]
    server = None
    if fork_server:
        sock = f"/tmp/edgeopt-mutation-{key}-{os.getpid()}.sock"
        server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "mutation_forkserver.py"), sock, str(WORK),
                                   "--", *pytest_args], cwd=WORK, env={**_env(), "PYTHONDONTWRITEBYTECODE": "1"})
        deadline = time.monotonic() + 120
        while not os.path.exists(sock):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mutation: {key}: the fork server did not start")
            time.sleep(0.1)
        runner = f"{sys.executable} -S {ROOT / 'scripts' / 'mutation_forkserver.py'} --client {sock}"
    else:
        # mutmut 2 counts only exit status 1 as "tests failed": a mutant that breaks the import (pytest's
        # status 2, collection errors) or leaves no test to run (5) would "survive". Any failure is a kill.
        runner = f"bash -c {shlex.quote(' '.join([sys.executable, '-m', 'pytest', *pytest_args]) + ' || exit 1')}"
    print(f"mutation: {key}: {', '.join(files)} with {', '.join(tests)}", flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--paths-to-mutate", ",".join(files),
                               "--runner", runner, "--tests-dir", "tests", "--simple-output", "--no-progress",
                               "--test-time-base", str(timeout_base)], cwd=WORK, env=_env())
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.copy2(WORK / ".mutmut-cache", cache)  # kept when stopped too: the next run goes on from it
    print(f"mutation: {key}: mutmut exit {proc.returncode} after {time.monotonic() - started:.0f} s", flush=True)
    # mutmut's exit code is a bit set (2 survived, 4 timeout, 8 suspicious); 1 is a failure of its own
    return 1 if proc.returncode & 1 else 0


def _seed_postgres_cache(key: str) -> Path:
    """The cache of a --postgres run (``<key>+pg``), kept apart from the SQLite one. Its first run starts from
    the SQLite results: mutants killed there stay killed, and every other one is tested again (its test hash
    is cleared), so only the survivors pay for the PostgreSQL variants."""
    cache = OUT / f"{key}+pg.mutmut-cache"
    plain = OUT / f"{key}.mutmut-cache"
    if not cache.exists() and plain.exists():
        shutil.copy2(plain, cache)
        con = sqlite3.connect(cache)
        con.execute("UPDATE Mutant SET tested_against_hash = '' WHERE status != 'ok_killed'")
        con.commit()
        con.close()
    return cache


def _keep_equivalents(files: list[str]) -> None:
    """Mark the listed equivalent survivors (and listed mutants not yet run) as tested against the current tests,
    so mutmut does not run them (again): they are out of the score either way, and each would run every mapped
    test. A listed mutant that was never run is reported as equivalent on the strength of its reason alone."""
    from mutmut.cache import hash_of_tests

    if not (WORK / ".mutmut-cache").exists():
        return
    current = hash_of_tests([str(WORK / "tests")])  # what mutmut computes for --tests-dir tests (file contents)
    wanted = {(e["file"], e["line"].strip(), e["index"]) for e in _equivalents() if e["file"] in files}
    con = sqlite3.connect(WORK / ".mutmut-cache")
    # Untested ones too (a resumed run): each costs a full run of the mapped tests and is out of the score anyway.
    rows = con.execute("SELECT m.id, s.filename, l.line, m.\"index\" FROM Mutant m JOIN Line l ON m.line = l.id "
                       "JOIN SourceFile s ON l.sourcefile = s.id "
                       "WHERE m.status IN ('bad_survived', 'untested')").fetchall()
    ids = [(current, mid) for mid, f, line, index in rows if (f, line.strip(), index) in wanted]
    con.executemany("UPDATE Mutant SET tested_against_hash = ?, status = 'bad_survived' WHERE id = ?", ids)
    con.commit()
    con.close()


def _equivalents() -> list[dict]:
    if not EQUIVALENT.exists():
        return []
    return tomllib.loads(EQUIVALENT.read_text()).get("mutant", [])


def _mutated_line(path: str, line: str, index: int) -> str:
    from mutmut import Context, RelativeMutationID, mutate

    source = (ROOT / path).read_text()  # the scratch copy may still hold a mutant if a run was interrupted
    lines = source.splitlines()
    number = next((i for i, l in enumerate(lines) if l == line), None)
    if number is None:
        return "(line changed since the run)"
    ctx = Context(source=source + "\n", mutation_id=RelativeMutationID(line, index, number), filename=path)
    mutated, count = mutate(ctx)
    return mutated.splitlines()[number].strip() if count else "(no mutation)"


def summarize(key: str) -> dict:
    """Counts and survivors of one module from its cache (``<key>+pg``: its --postgres run)."""
    cache = OUT / f"{key}.mutmut-cache"
    if not cache.exists():
        return {}
    con = sqlite3.connect(cache)
    rows = con.execute("SELECT s.filename, l.line, l.line_number, m.\"index\", m.status FROM Mutant m "
                       "JOIN Line l ON m.line = l.id JOIN SourceFile s ON l.sourcefile = s.id").fetchall()
    con.close()
    equivalent = {(e["file"], e["line"].strip(), e["index"]): e["reason"] for e in _equivalents()}
    counts = {"mutants": 0, "killed": 0, "survived": 0, "equivalent": 0, "untested": 0}
    survivors, equivalents = [], []
    for filename, line, number, index, status in rows:
        if status == "skipped":  # not made (mutmut_config.py: logging lines)
            continue
        counts["mutants"] += 1
        reason = equivalent.get((filename, line.strip(), index))
        if status in ("ok_killed", "bad_timeout"):  # a timeout is a detected mutant too
            counts["killed"] += 1
        elif reason is not None:
            counts["equivalent"] += 1
            equivalents.append({"file": filename, "line": number + 1, "source": line.strip(), "index": index,
                                "reason": reason})
        elif status == "untested":
            counts["untested"] += 1
        else:
            counts["survived"] += 1
            survivors.append({"file": filename, "line": number + 1, "source": line.strip(), "index": index,
                              "mutant": _mutated_line(filename, line, index), "status": status})
    judged = counts["killed"] + counts["survived"]
    counts["score"] = round(100.0 * counts["killed"] / judged, 1) if judged else None
    return {"counts": counts, "survivors": survivors, "equivalents": equivalents}


def report(label: str, keys: list[str]) -> None:
    summaries = {k: summarize(k) for k in [*MODULES, *(f"{k}+pg" for k in MODULES)]}
    path = OUT / f"summary-{label}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update({k: v["counts"] for k, v in summaries.items() if v and k in keys})
    path.write_text(json.dumps(old, indent=1, sort_keys=True))
    before = json.loads((OUT / "summary-before.json").read_text()) if (OUT / "summary-before.json").exists() else {}
    lines = ["# Mutation testing report", "",
             "Generated by scripts/mutation.sh (mutmut 2.5.1). Score = killed / (killed + survived); equivalent "
             "mutants (scripts/mutation_equivalent.toml) are left out of it.", "",
             "| module | files | mutants | killed | survived | equivalent | untested | score before | score now |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, s in summaries.items():
        if not s:
            continue
        c = s["counts"]
        b = before.get(key, {}).get("score")
        lines.append(f"| {key} | {', '.join(MODULES[key.removesuffix('+pg')][0])} | {c['mutants']} | {c['killed']} | {c['survived']} | "
                     f"{c['equivalent']} | {c['untested']} | {'—' if b is None else f'{b}%'} | "
                     f"{'—' if c['score'] is None else str(c['score']) + '%'} |")
    for key, s in summaries.items():
        if not s or not (s["survivors"] or s["equivalents"]):
            continue
        lines += ["", f"## {key}", ""]
        if s["survivors"]:
            lines += ["Survivors:", ""]
            lines += [f"- `{v['file']}:{v['line']}` (#{v['index']}, {v['status']}): `{v['source']}` → `{v['mutant']}`"
                      for v in s["survivors"]]
        if s["equivalents"]:
            lines += ["", "Equivalent (not counted):", ""]
            lines += [f"- `{v['file']}:{v['line']}` (#{v['index']}): `{v['source']}` — {v['reason']}"
                      for v in s["equivalents"]]
    (OUT / "REPORT.md").write_text("\n".join(lines) + "\n")
    print(f"mutation: report in {OUT / 'REPORT.md'}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", help=f"module keys (default: all): {', '.join(MODULES)}")
    ap.add_argument("--tests-from", metavar="REV", help="run with the tests of this git revision (a 'before' score)")
    ap.add_argument("--label", help="summary label (default: 'before' with --tests-from, else 'after')")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results of these modules")
    ap.add_argument("--no-fork-server", action="store_true", help="start Python and pytest afresh for every mutant "
                                                                   "(slower; see scripts/mutation_forkserver.py)")
    ap.add_argument("--postgres", metavar="URL", help="keep the PostgreSQL variants of the tests (EDGEOPT_TEST_POSTGRES_URL "
                    "for this run); results go to <key>+pg, started from the SQLite run's")
    ap.add_argument("--lines", metavar="FIRST-LAST", help="with --postgres: mutate only these lines (1-based, "
                    "inclusive), e.g. the PostgreSQL-only code; the others count as not made in <key>+pg")
    ap.add_argument("--report-only", action="store_true", help="only rewrite REPORT.md from the kept results")
    ap.add_argument("--timeout-base", type=float, default=20.0, help="seconds added to 2x the baseline time "
                                                                    "before a mutant counts as a timeout")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # so a stopped run still stops its fork server
    keys = args.modules or list(MODULES)
    unknown = [k for k in keys if k not in MODULES]
    if unknown:
        ap.error(f"unknown module {', '.join(unknown)}; expected some of {', '.join(MODULES)}")
    label = args.label or ("before" if args.tests_from else "after")
    OUT.mkdir(parents=True, exist_ok=True)
    global WORK, POSTGRES_URL
    POSTGRES_URL = args.postgres
    if args.lines:
        if not args.postgres:  # a skip is stored in the cache: never in the main one
            ap.error("--lines goes with --postgres")
        os.environ["EDGEOPT_MUTATION_LINES"] = args.lines
    if args.modules:  # a scratch copy per set of modules, so runs of different modules can go side by side
        WORK = OUT / f"work-{'+'.join(keys)}{'-pg' if POSTGRES_URL else ''}"
    rc = 0
    if not args.report_only:
        prepare(args.tests_from)
        check_import()
        for key in keys:
            if args.fresh:
                (OUT / f"{key}.mutmut-cache").unlink(missing_ok=True)
            rc |= run_module(key, args.timeout_base, not args.no_fork_server)
    report(label, [f"{k}+pg" for k in keys] if POSTGRES_URL else keys)
    return rc


if __name__ == "__main__":
    sys.exit(main())
