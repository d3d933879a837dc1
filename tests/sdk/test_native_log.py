"""Native runtimes' own log lines go through logging, never raw onto the terminal (issue 16, item 5)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeopt.sdk.native_log import MAX_CAPTURED, native_stderr_to_log

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.DEBUG, logger="native-test")
    return caplog


def _logged(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "native-test"]


def test_runtime_lines_become_records_by_severity(records, capfd):
    log = logging.getLogger("native-test")
    with native_stderr_to_log(log, "litert"):
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nWARNING: odd op\n"
                    b"ERROR: no kernel\nVERBOSE: detail\n")
        os.write(2, b"2026-12-03 06:40:03.1 [W:onnxruntime:, session_state.cc:1166 Verify] \x1b[1;31mfell back\x1b[m\n")
    assert _logged(records) == [("DEBUG", "litert: Created TensorFlow Lite XNNPACK delegate for CPU."),
                                ("WARNING", "litert: odd op"), ("WARNING", "litert: no kernel"),
                                ("DEBUG", "litert: detail"), ("WARNING", "litert: fell back")]
    assert capfd.readouterr().err == ""  # nothing reached the terminal


def test_error_lines_of_a_call_that_raised_stay_at_debug(records, capfd):
    log = logging.getLogger("native-test")
    with pytest.raises(ValueError, match="boom"):
        with native_stderr_to_log(log, "litert"):
            os.write(2, b"ERROR: Didn't find op for builtin opcode\n")
            raise ValueError("boom")
    assert _logged(records) == [("DEBUG", "litert: Didn't find op for builtin opcode")]
    assert capfd.readouterr().err == ""


def test_other_lines_in_the_window_go_back_to_stderr_unchanged(records, capfd):
    log = logging.getLogger("native-test")
    with native_stderr_to_log(log, "litert"):
        os.write(2, b"2026-12-03 06:00:00 INFO edgeopt.agent: another thread\n")
    assert _logged(records) == []
    assert capfd.readouterr().err == "2026-12-03 06:00:00 INFO edgeopt.agent: another thread\n"
    os.write(2, b"after\n")  # fd 2 is the terminal again
    assert capfd.readouterr().err == "after\n"


def test_a_flood_is_bounded(records, capfd):
    log = logging.getLogger("native-test")
    line = b"INFO: " + b"x" * 1017 + b"\n"  # 1 KiB a line
    with native_stderr_to_log(log, "litert"):
        for _ in range(MAX_CAPTURED // len(line) + 10):
            os.write(2, line)
    got = _logged(records)
    assert len(got) == MAX_CAPTURED // len(line) + 1  # the 64 lines read back, then the count of what was dropped
    assert got[-1][1].startswith("litert: ") and got[-1][1].endswith("more bytes of its log output dropped")
    assert capfd.readouterr().err.count("x" * 100) <= 1  # at most the cut line's tail


def _load_in_child(model: Path, level: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.{level}, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
        from edgeopt.agent.runtimes.tflite import TFLiteRuntime
        m = TFLiteRuntime.load({str(model)!r})
        print("loaded", len(m.inputs))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_litert_delegate_line_is_a_debug_record_not_terminal_output(tflite_model):
    """LiteRT printed "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." at every load."""
    quiet = _load_in_child(tflite_model, "INFO")
    assert quiet.returncode == 0, quiet.stderr
    assert "loaded 1" in quiet.stdout and "XNNPACK" not in quiet.stdout + quiet.stderr
    verbose = _load_in_child(tflite_model, "DEBUG")
    assert verbose.returncode == 0, verbose.stderr
    assert ("DEBUG edgeopt.agent.runtimes.tflite litert: Created TensorFlow Lite XNNPACK delegate for CPU."
            in verbose.stdout)
    assert "XNNPACK" not in verbose.stderr
