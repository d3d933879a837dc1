"""A fork server for mutation runs: pytest and the heavy third-party libraries are imported once, and each
mutant's test run is a fork of that process (scripts/mutation.py starts it; see docs/mutation.md).

On 2 shared cores most of a mutant's time went to starting Python and importing pytest, pydantic,
cryptography, numpy and SQLAlchemy again for every mutant. The server imports none of edgeopt: each fork
imports it afresh from the scratch copy, so it sees the mutant mutmut has just written.

    python scripts/mutation_forkserver.py SOCKET WORKDIR -- PYTEST_ARGS...   serve
    python -S scripts/mutation_forkserver.py --client SOCKET                  one run; exit 1 if it failed

The client is mutmut's test command. If it goes away (mutmut's timeout), its fork is killed.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import sys


def client(path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"run\n")
    data = b""
    while chunk := s.recv(64):
        data += chunk
    # mutmut counts only status 1 as failed tests: every failure, a missing answer included, is 1
    return 0 if data.strip() == b"0" else 1


def _run_child(workdir: str, args: list[str]) -> None:
    """In the fork: run pytest quietly and leave with its status."""
    try:
        os.chdir(workdir)
        # EDGEOPT_MUTATION_LOG names a file for the forks' output (to see why a baseline run fails)
        out = os.open(os.environ.get("EDGEOPT_MUTATION_LOG", os.devnull), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd in (1, 2):
            os.dup2(out, fd)
        os.setsid()  # its own process group, so a kill reaches what the tests start too
        import pytest

        rc = int(pytest.main(args))
    except BaseException:  # noqa: BLE001 - any failure of the run is a failed run
        import traceback

        traceback.print_exc()
        rc = 3
    os._exit(rc)


def serve(path: str, workdir: str, args: list[str]) -> None:
    sys.dont_write_bytecode = True
    # Heavy imports the tests share; never edgeopt itself (each fork must import the mutant).
    import pytest  # noqa: F401
    import _pytest.assertion.rewrite  # noqa: F401
    for name in ("pydantic", "cryptography.hazmat.primitives.asymmetric.ed25519", "cryptography.x509", "numpy",
                 "sqlalchemy", "sqlalchemy.orm", "packaging.version", "click", "rich.console", "paho.mqtt.client",
                 "flask", "werkzeug"):  # not pytest plugins: pytest must import those itself (rewrite)
        try:
            __import__(name)
        except ImportError:
            pass
    if any(m == "edgeopt" or m.startswith("edgeopt.") for m in sys.modules):
        raise SystemExit("mutation fork server: edgeopt was imported before forking; mutants would not be seen")
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    parent = os.getppid()
    running: list[int] = []
    srv.settimeout(5.0)
    try:
        while True:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                if os.getppid() != parent:  # scripts/mutation.py is gone: so is the need for a server
                    return
                continue
            conn.settimeout(None)
            with conn:
                if not conn.recv(16):
                    continue
                pid = os.fork()
                if pid == 0:
                    srv.close()
                    conn.close()
                    _run_child(workdir, args)
                running.append(pid)
                rc = _wait(pid, conn)
                running.remove(pid)
                try:
                    conn.sendall(str(rc).encode())
                except OSError:
                    pass
    finally:
        for pid in running:  # a stopped server takes its fork (and what the tests started) with it
            for target in (-pid, pid):
                try:
                    os.kill(target, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        srv.close()
        if os.path.exists(path):
            os.unlink(path)


def _wait(pid: int, conn: socket.socket) -> int:
    """The fork's exit status; the fork (and its process group) is killed if the client hangs up first."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        readable, _, _ = select.select([conn], [], [], 0.05)
        if readable and not conn.recv(16, socket.MSG_PEEK):
            for target in (-pid, pid):
                try:
                    os.kill(target, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.waitpid(pid, 0)
            return -9


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        sys.exit(client(sys.argv[2]))
    split = sys.argv.index("--")
    serve(sys.argv[1], sys.argv[2], sys.argv[split + 1:])
