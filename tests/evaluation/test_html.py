"""Tests for the shared HTML pieces and number formatting (medtransfer.evaluation.html)."""

from __future__ import annotations

import base64
import html.parser

import pytest
from PIL import Image

from medtransfer.evaluation import html as h
from medtransfer.rundir import SplitMetrics


@pytest.mark.parametrize(
    ("value", "ci", "kwargs", "expected"),
    [
        (0.9623, (0.948, 0.975), {}, "0.962 (95% CI 0.948\u20130.975)"),
        (0.9623, [0.948, 0.975], {"confidence": 0.9}, "0.962 (90% CI 0.948\u20130.975)"),
        (0.9623, None, {}, "0.962"),
        (0.9623, (0.948, float("nan")), {}, "0.962"),  # no finite interval: the value alone
        (0.9623, (0.948,), {}, "0.962"),
        (None, (0.9, 0.95), {}, "\u2013"),  # a missing value shows no interval either
        (float("inf"), None, {}, "\u2013"),
        (0.12, (0.05, 0.19), {"signed": True}, "+0.120 (95% CI +0.050 to +0.190)"),
        (-0.02, (-0.1, 0.06), {"signed": True}, "-0.020 (95% CI -0.100 to +0.060)"),
        (0.5, (-0.1, 0.6), {}, "0.500 (95% CI -0.100 to 0.600)"),  # no en dash next to a minus sign
        (0.96234, (0.9481, 0.97522), {"digits": 4}, "0.9623 (95% CI 0.9481\u20130.9752)"),
        (0.9, (0.8, 0.95), {"confidence": None}, "0.900 (95% CI 0.800\u20130.950)"),
    ],
)
def test_format_with_ci(value, ci, kwargs, expected):
    assert h.format_with_ci(value, ci, **kwargs) == expected


def test_split_value_uses_the_interval_and_confidence_of_the_split():
    split = SplitMetrics(auc=0.9623, f1=0.9, intervals={"auc": (0.948, 0.975)}, confidence=0.9)
    assert h.split_value(split, "auc") == "0.962 (90% CI 0.948\u20130.975)"
    assert h.split_value(split, "f1") == "0.900"
    assert h.split_value(split, "npv") == "\u2013"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(11177538, "11,177,538"), (0.43712, "0.437"), (True, "yes"), (False, "no"), (None, "\u2013"), (float("nan"), "\u2013"), ("bf16", "bf16")],
)
def test_format_number(value, expected):
    assert h.format_number(value) == expected


def test_format_percent():
    assert [h.format_percent(v) for v in (0.928, None, 0.5)] == ["92.8%", "\u2013", "50.0%"]


def test_table_escapes_every_cell_and_heads_each_row():
    text = h.table(["<a>", "b"], [("<script>", "x & y")], css="metrics")
    assert text.startswith('<table class="metrics"><thead><tr><th>&lt;a&gt;</th>')
    assert '<th scope="row">&lt;script&gt;</th><td>x &amp; y</td>' in text
    assert "<script>" not in text


def test_note_and_section_escape_their_text():
    assert h.note('a "b" <c>', css="warn") == '<p class="warn">a &quot;b&quot; &lt;c&gt;</p>'
    assert h.section("data", "A < B", "<p>x</p>") == '<section id="data">\n<h2>A &lt; B</h2>\n<p>x</p>\n</section>'


def test_figure_embeds_the_image_bytes(tmp_path):
    path = tmp_path / "roc.png"
    Image.new("RGB", (3, 2), (10, 20, 30)).save(path)
    text = h.figure(path, 'ROC "test"')
    uri = text.split('src="')[1].split('"')[0]
    assert base64.b64decode(uri.removeprefix("data:image/png;base64,")) == path.read_bytes()
    assert 'alt="ROC &quot;test&quot;"' in text and "<figcaption>ROC &quot;test&quot;</figcaption>" in text
    assert "not a PNG" in h.figure(tmp_path / "notes.txt", "x")


def test_figures_skip_missing_paths_and_carry_the_layout_class(tmp_path):
    path = tmp_path / "history.png"
    Image.new("RGB", (3, 2)).save(path)
    assert h.figures([(None, "absent")]) == ""
    wide = h.figures([(path, "curves"), (None, "absent")], css="wide")
    assert wide.startswith('<div class="figures wide">') and wide.count("<figure>") == 1
    assert h.figures([(path, "x")]).startswith('<div class="figures">')


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def test_page_is_self_contained_and_escapes_title_and_navigation():
    text = h.page("<i>Run</i>", "<p>body</p>", subtitle="made <here>", nav=[("summary", "Summary & more")])
    parser = _Collector()
    parser.feed(text)
    assert text.startswith("<!DOCTYPE html>") and "<title>&lt;i&gt;Run&lt;/i&gt;</title>" in text
    assert "<i>Run</i>" not in text and '<p class="note">made &lt;here&gt;</p>' in text
    assert '<a href="#summary">Summary &amp; more</a>' in text and "<p>body</p>" in text
    assert "script" not in parser.tags
    assert all(url.startswith(("data:", "#")) for url in parser.urls)
    assert "http" not in text and "url(" not in text
    assert "<nav>" not in h.page("t", "")  # no links, no empty bar


def test_metric_rows_name_every_split_metric_once():
    from medtransfer.rundir import METRIC_KEYS

    assert [key for key, _ in h.METRIC_ROWS] == list(METRIC_KEYS)
