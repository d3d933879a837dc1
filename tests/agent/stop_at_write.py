"""Test-only launcher: runs the ``edgeopt`` CLI with an audit hook that stops the process at one write of the
agent's state directory, so that a test can SIGKILL it exactly there.

    python stop_at_write.py agent install PKG --config agent.toml

Environment (read here only; the agent's own code knows nothing of it):

- ``EDGEOPT_TEST_STATE_DIR``: the state directory whose writes are points;
- ``EDGEOPT_TEST_STOP_AT``: ``census:FILE`` appends every point to FILE and stops nowhere; ``N:FILE``
  writes point N (0-based) to FILE and stops the process with SIGSTOP at it.

Points come from Python's audit events (PEP 578), which fire inside every ``open``, ``os.open``,
``os.rename``/``os.replace``, ``os.remove``/``os.unlink``, ``os.rmdir`` and ``os.mkdir`` whatever the caller,
so a new write in the store or the installer becomes a point without anyone listing it. Each such operation
on a path under the state directory gives two points: ``before`` (the operation not done yet, everything
written before it on disk) and ``after`` (the operation done: the hook performs it itself, with the same
arguments, then stops; the process is killed before the caller goes on, so it is never done twice). An open
for writing "done" is the created or truncated, still empty file: exactly what an in-place write leaves
when it is killed before its content reaches the file.
"""
from __future__ import annotations

import os
import re
import signal
import sys

STATE_ENV = "EDGEOPT_TEST_STATE_DIR"
STOP_ENV = "EDGEOPT_TEST_STOP_AT"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
_busy = False
_count = 0


def _path(raw, dir_fd=None) -> str | None:
    if isinstance(raw, int):
        return None  # an fd: opened earlier, that open was the point
    path = os.fsdecode(os.fspath(raw))
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.abspath(path)


def _describe(path: str, state: str) -> str:
    # Random parts (uuids of staging, tmp and trash names) vary between runs: the same point must have
    # the same name in the census and in the run that stops at it.
    return re.sub(r"[0-9a-f]{8,}", "*", os.path.relpath(path, state))


def install(state: str, spec: str) -> None:
    mode, _, out = spec.partition(":")
    census = mode == "census"
    stop_at = -1 if census else int(mode)
    state = os.path.realpath(state)

    def point(desc: str, do=None) -> None:
        global _count
        index, _count = _count, _count + 1
        if census:
            with open(out, "a") as fh:
                fh.write(f"{desc}\n")
            return
        if index != stop_at:
            return
        if do is not None:
            do()
        with open(out, "w") as fh:
            fh.write(f"{index}\t{desc}\n")
        os.kill(os.getpid(), signal.SIGSTOP)
        # Resumed instead of killed: a test bug. Leave at once, before the caller repeats the operation.
        os._exit(70)

    def ours(path: str | None) -> bool:
        return path is not None and (path + os.sep).startswith(state + os.sep) and \
            os.path.basename(path) != "lock"

    def hook(event: str, args) -> None:
        global _busy
        if _busy or event not in ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir"):
            return
        _busy = True
        try:
            if event == "open":
                raw, fmode, flags = args
                path = _path(raw)
                if not ours(path) or not (flags & _WRITE_FLAGS):
                    return
                name = _describe(path, state)
                point(f"before open-write {name}")
                point(f"after open-write {name}", lambda: os.close(os.open(path, flags & ~os.O_EXCL, 0o644)))
            elif event == "os.rename":
                src, dst, src_fd, dst_fd = args
                s, d = _path(src, src_fd), _path(dst, dst_fd)
                if not (ours(s) or ours(d)):
                    return
                name = f"{_describe(s, state)} -> {_describe(d, state)}"
                point(f"before rename {name}")
                point(f"after rename {name}", lambda: os.rename(s, d))
            elif event in ("os.remove", "os.rmdir"):
                path = _path(args[0], args[1])
                if not ours(path):
                    return
                verb = event.split(".")[1]
                point(f"before {verb} {_describe(path, state)}")
                point(f"after {verb} {_describe(path, state)}",
                      lambda: (os.remove if verb == "remove" else os.rmdir)(path))
            else:  # os.mkdir
                path = _path(args[0], args[2])
                if not ours(path) or os.path.isdir(path):
                    return
                point(f"before mkdir {_describe(path, state)}")
                point(f"after mkdir {_describe(path, state)}", lambda: os.mkdir(path))
        finally:
            _busy = False

    sys.addaudithook(hook)


def main() -> None:
    install(os.environ[STATE_ENV], os.environ[STOP_ENV])
    from edgeopt.sdk.cli import main as edgeopt_main

    sys.argv = ["edgeopt", *sys.argv[1:]]
    edgeopt_main()


if __name__ == "__main__":
    main()
