"""--input-shape with huge dims is refused before anything is allocated (issue 9).

Before the bound, images:1000000000,1,8,8 built random data of that shape and ended in
"unexpected MemoryError" (exit 1) after trying to allocate hundreds of GiB.
"""
from __future__ import annotations

import pytest

from edgeopt.sdk.errors import ExitCode


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


HINT = "(check the dims (batch first); calibration and validation data are built from them)"


@pytest.mark.parametrize("shape, message", [
    ("images:1000000000,1,8,8", "error: --input-shape images:1000000000,1,8,8 is 64,000,000,000 elements, 59.6 GiB "
                                f"even at one byte per element: over the 2.0 GiB limit for one input {HINT}"),
    # under the element bound, over it once the input's dtype (float32) is known
    ("images:10000000,1,8,8", "error: --input-shape images:10000000,1,8,8 is 640,000,000 elements, 2.4 GiB as "
                              f"float32: over the 2.0 GiB limit for one input {HINT}"),
    # each tensor fits; the 16 random held-out samples together would not
    ("images:1000000,1,8,8", "error: random data for 16 samples of images [1000000, 1, 8, 8] would take 7.6 GiB, "
                             "over the 4.0 GiB limit (give smaller input shapes, or real data with --calib / --heldout)"),
])
def test_package_refuses_huge_input_shape(cli, digits_model, tmp_path, shape, message):
    out = tmp_path / "o.eopkg"
    code, _, err = cli("package", digits_model, "-p", "cpu", "--precision", "fp32", "--no-sign",
                       "--input-shape", shape, "-o", out)
    assert code == ExitCode.INPUT, err
    assert _error_lines(err) == [message]
    assert not out.exists()


def test_compare_refuses_huge_input_shape(cli, digits_model, tmp_path):
    code, _, err = cli("compare", digits_model, "--profiles", "cpu", "--input-shape", "images:1000000000,1,8,8")
    assert code == ExitCode.INPUT, err
    assert _error_lines(err) == [
        "error: --input-shape images:1000000000,1,8,8 is 64,000,000,000 elements, 59.6 GiB even at one byte per "
        f"element: over the 2.0 GiB limit for one input {HINT}"]


def test_a_normal_shape_still_passes_the_bound():
    from edgeopt.sdk.pipeline.shapes import parse_input_shape

    assert parse_input_shape("images:8,3,224,224") == ("images", [8, 3, 224, 224])
