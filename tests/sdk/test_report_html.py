"""The HTML compare report: valid, self-contained, with the table and an inline SVG chart per profile."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest

from edgeopt.sdk.compare import CompareReport, compare_profile
from edgeopt.sdk.errors import InputError
from edgeopt.sdk.profile import load_profile
from edgeopt.sdk.report import render_html, write_html

from test_compare_select import fake  # tests/sdk is on sys.path (rootdir-relative imports)

VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "embed", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Checks that every element is closed in order (HTML5 void and SVG self-closing elements aside)."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: dict[str, int] = {}
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs.extend(attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs.extend(attrs)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
            return
        self.stack.pop()


def _doc():
    def evaluate(c):
        if c.precision == "int8" and c.runtime == "onnxruntime" and not c.accuracy_aware:
            return fake(p50=0.5, passed=False, cosine=0.7, cand=c)
        p50 = {"fp32": 2.0, "int8": 1.0, "int8-weight-only": 1.8, "fp16": 1.5}[c.precision]
        return fake(p50=p50 + (0.1 if c.runtime == "onnxruntime" else 0), cand=c)

    profiles = [compare_profile(load_profile("cpu"), evaluate, devices={}),
                compare_profile(load_profile("npu"), evaluate, devices={"openvino": ["CPU"]})]
    return CompareReport(model="models/<resnet>.onnx", profiles=profiles).to_dict()


def test_report_is_valid_self_contained_html_with_table_and_chart(tmp_path):
    doc = _doc()
    out = write_html(doc, tmp_path / "report.html")
    text = out.read_text()
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert text.startswith("<!DOCTYPE html>")
    assert checker.tags["table"] == 2 and checker.tags["svg"] == 2  # one table + one chart per profile
    assert checker.tags.get("script") is None  # nothing executable, nothing fetched
    for name, value in checker.attrs:
        if name in ("src", "href") and value:
            assert not value.startswith(("http:", "https:", "//")), value
    assert "models/&lt;resnet&gt;.onnx" in text  # escaped, not injected
    assert "★ openvino/int8/all" in text  # the pick is marked in the table
    assert "over budget: min cosine 0.7 &lt; 0.99" in text
    assert "Host-CPU proxy." in text and "no Intel NPU on this host" in text
    assert "LiteRT" not in text  # cpu and npu profiles list no LiteRT runtime
    assert not list(tmp_path.glob(".report.html.*"))  # temporary file renamed away


def test_chart_shows_the_budget_line_and_the_candidates():
    doc = _doc()
    html = render_html(doc)
    assert "budget: cosine &gt;= 0.99" in html  # matplotlib legend, text kept as SVG text
    assert "fp32 ONNX Runtime baseline" in html
    assert "<td>5</td><td>onnxruntime/fp32/basic</td>" in html  # the "#" column names the chart's points


def test_write_html_refuses_missing_folder_and_directory(tmp_path):
    doc = _doc()
    with pytest.raises(InputError) as exc:
        write_html(doc, tmp_path / "nope" / "r.html")
    assert exc.value.one_line() == (f"--html {tmp_path / 'nope' / 'r.html'}: folder {tmp_path / 'nope'} does not "
                                    "exist (create it first)")
    with pytest.raises(InputError) as exc:
        write_html(doc, tmp_path)
    assert exc.value.one_line() == f"--html {tmp_path}: is a directory (give a file name such as report.html)"
