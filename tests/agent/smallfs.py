"""A real full disk for tests: a small tmpfs mounted over a test folder, and a filler file that takes every
free byte of it (ENOSPC from the kernel, not a mock).

Mounting needs root. Elsewhere, :func:`needs_mount` runs the test again in a child pytest inside a new
user and mount namespace (``unshare --user --map-root-user --mount``), where an unprivileged user may
mount a tmpfs; the outer test passes or fails with the child. Imported by tests/agent and tests/integration.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
_INSIDE = "EDGEOPT_TEST_IN_MOUNT_NAMESPACE"


def needs_mount(test):
    """Decorator: run ``test`` as is when it may mount, else in a child pytest under ``unshare``."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        if os.geteuid() == 0:
            return test(*args, **kwargs)
        assert not os.environ.get(_INSIDE), "unshare --map-root-user did not make this process root"
        node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0]
        out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-m", "pytest",
                              "-q", "-p", "no:cacheprovider", node], cwd=ROOT, capture_output=True, text=True,
                             timeout=900, env={**os.environ, _INSIDE: "1"})
        assert out.returncode == 0, f"{node} in a user+mount namespace:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
    return run


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[Path]:
    """A ``size_mb`` MiB tmpfs mounted at ``path`` for the duration."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Take all free space of ``folder``'s filesystem but ``leave`` bytes, in a file that is returned
    (delete it to give the space back)."""
    filler = folder / f"filler-{len(list(folder.glob('filler-*')))}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size, written = 1 << 20, 0
        while size:
            try:
                written += os.write(fd, bytes(size))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2  # full at this size: smaller pieces, down to one byte
        if leave:
            os.ftruncate(fd, max(0, written - leave))
    finally:
        os.close(fd)
    return filler


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
