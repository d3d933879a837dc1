"""What a native runtime writes straight to file descriptor 2, turned into log records.

ONNX Runtime's and LiteRT's C++ code write their log lines to the process's stderr themselves (LiteRT's
"INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on every interpreter), above the CLI's progress and
one-line errors and outside the agent's log format. :func:`native_stderr_to_log` points fd 2 at a temporary
file for the duration of a call into the runtime and hands each line to the project's logging: the runtime's
INFO/VERBOSE lines at DEBUG (shown with ``-v``), its WARNING lines at WARNING, its ERROR lines at WARNING, or
at DEBUG when the call raised (the exception carries the error, which stays one line). A line that is not in
the runtime's format (another thread of this process writing to stderr in the same window) is written back to
the real stderr unchanged, so nothing is lost. Captures are serialised by one lock (fd 2 is process-wide) and
bounded (:data:`MAX_CAPTURED` bytes are read back; more is dropped with a count).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

__all__ = ["native_stderr_to_log", "MAX_CAPTURED"]

MAX_CAPTURED = 64 * 1024
_LOCK = threading.RLock()
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# LiteRT / TFLite: "INFO: ...", "WARNING: ...", "ERROR: ..."; ONNX Runtime: "2026-12-03 06:40:03.1 [W:onnxruntime:...]"
_TFLITE = re.compile(r"^(INFO|VERBOSE|WARNING|ERROR): ?(.*)$")
_ORT = re.compile(r"^\S+ \S+ \[([VIWEF]):onnxruntime:[^\]]*\]\s*(.*)$")
_LEVEL = {"INFO": "I", "VERBOSE": "V", "WARNING": "W", "ERROR": "E"}


def _classify(line: str) -> tuple[str, str] | None:
    """(severity letter V/I/W/E/F, message) for a runtime's own line, None for anything else."""
    m = _TFLITE.match(line)
    if m:
        return _LEVEL[m.group(1)], m.group(2)
    m = _ORT.match(line)
    if m:
        return m.group(1), m.group(2)
    return None


def _emit(logger: logging.Logger, runtime: str, text: str, raised: bool, real_fd: int) -> None:
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).strip()
        if not line:
            continue
        found = _classify(line)
        if found is None:
            os.write(real_fd, (raw + "\n").encode(errors="replace"))
            continue
        severity, message = found
        if severity in ("V", "I") or (severity in ("E", "F") and raised):
            logger.debug("%s: %s", runtime, message)
        else:
            logger.warning("%s: %s", runtime, message)


def _flush_stderr() -> None:
    """Python's buffered stderr out before fd 2 changes hands (sys.stderr may be gone or closed)."""
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass


@contextlib.contextmanager
def native_stderr_to_log(logger: logging.Logger, runtime: str) -> Iterator[None]:
    """Inside the block, what native code writes to fd 2 becomes records of ``logger`` (see the module doc)."""
    with _LOCK, tempfile.TemporaryFile() as tmp:
        _flush_stderr()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        raised = False
        try:
            yield
        except BaseException:
            raised = True
            raise
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            try:
                size = os.fstat(tmp.fileno()).st_size
                tmp.seek(0)
                text = tmp.read(MAX_CAPTURED).decode(errors="replace")
                _emit(logger, runtime, text, raised, saved)
                if size > MAX_CAPTURED:
                    logger.debug("%s: %d more bytes of its log output dropped", runtime, size - MAX_CAPTURED)
            finally:
                os.close(saved)
