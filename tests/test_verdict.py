"""The report's verdict and one story in the terminal, the JSON and the HTML page."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from rich.console import Console

from separify.config import ConvertConfig, LatencyTarget
from separify.core.measure import Timing
from separify.records import ConvertResult
from separify.reporting import Latency, ModelFigures, Quality, Report
from separify.reporting.data import LayerFigures, NotMeasured, conversion_doc, schema
from separify.reporting.html import render_html
from separify.reporting.story import conversion_lines, note_lines, totals_rows
from separify.reporting.tables import print_report


def _report(*, ratio: float = 0.7, objective: str = "latency", accuracy=(0.928, 0.925), calibrated: bool = False,
            out: str | None = "fast.pt2") -> Report:
    cfg = ConvertConfig(objective=objective, **({"target": LatencyTarget("cpu", threads=2)}
                                                if objective == "latency" else {"flops": 0.5}))
    result = ConvertResult(model=None, layers=[], path="fx", config=cfg, flops_before=100, flops_after=40,
                           latency_target="torch-cpu float32, batch 1, 2 threads" if objective == "latency" else None)
    conv = conversion_doc(result)
    conv["calibrated"] = calibrated
    timing = (lambda ms: Timing("torch-cpu", ms, 0.05 * ms, 9, 9, 2, 1))
    layers = (LayerFigures("stem", "3→16 3×3", "kept", (1, 3, 8, 8), 10, 10, NotMeasured("kept"),
                           NotMeasured("kept"), reason="no replacement measured faster"),
              LayerFigures("body", "16→16 3×3", "converted", (1, 16, 8, 8), 90, 30, timing(1.0), timing(ratio),
                           method="pw-dw-pw", rank=4))
    quality = (Quality("top-1 accuracy", "100 held-out images", *accuracy),
               Quality("top-1 agreement with the original", "100 held-out images", None, 0.97))
    env = {"separify": "0", "torch": torch.__version__, "python": "3", "platform": "p", "cpu": "c", "cpu_count": 2,
           "threads": 2, "onnxruntime": None, "gpu": None}
    settings = {"device": "cpu", "batch_size": 1, "threads": 2, "input_shapes": [[1, 3, 8, 8]], "notes": [],
                "min_run_time": {"value": 0.01, "unit": "s"}, "layer_min_run_time": {"value": 0.01, "unit": "s"}}
    return Report(ModelFigures(100, 10, 1000, "in.pt2", 5000), ModelFigures(40, 6, 600, out, 3000),
                  (Latency("torch-cpu", timing(2.0), timing(2.0 * ratio)),), quality, layers, settings, env, conv)


def _printed(rep: Report) -> str:
    console = Console(width=200, record=True)
    print_report(rep, console)
    return console.export_text()


def test_the_verdict_says_what_was_gained_in_one_line_everywhere():
    rep = _report()
    v = rep.verdict()
    assert v.text() == ("0.40× the FLOPs, 0.70× the time on torch-cpu (1.43× faster), top-1 accuracy 0.928 → 0.925 "
                        "(−0.3 points); written to fast.pt2.")
    assert v.hint is None
    lines = _printed(rep).strip().splitlines()
    assert lines[-1] == f"Verdict: {v.text()}"  # the terminal ends with it
    doc = json.loads(json.dumps(rep.to_dict()))
    jsonschema.validate(doc, schema())
    assert doc["verdict"]["speed"] == {"backend": "torch-cpu", "time_ratio": pytest.approx(0.7)}
    page = render_html(rep)
    assert page.index("Verdict:") < page.index("Whole model")  # the top of the page
    assert v.text().replace("→", "&rarr;") in page or v.text() in page


@pytest.mark.parametrize("kind, expected", [
    (dict(ratio=1.1, objective="flops"), "--objective latency"),
    (dict(ratio=1.02), "--target"),
    (dict(accuracy=(0.93, 0.90)), "--calib"),
    (dict(accuracy=(0.93, 0.90), calibrated=True), "--finetune"),
], ids=["slower-flops-objective", "slower-latency-objective", "lost-uncalibrated", "lost-calibrated"])
def test_a_slower_or_worse_model_gets_the_one_option_most_likely_to_help(kind, expected):
    rep = _report(**kind)
    v = rep.verdict()
    assert v.hint is not None and expected in v.hint
    assert ("slower" in v.text()) == (kind.get("ratio", 0.7) > 1)
    assert _printed(rep).strip().splitlines()[-1].startswith("Next: ")
    assert "Next:</b>" in render_html(rep)


def test_the_html_page_holds_what_the_terminal_says_in_the_same_words():
    rep = _report()
    text, page = _printed(rep), render_html(rep)
    flat = re.sub(r"\s+", " ", text)
    for row in totals_rows(rep):  # file size included
        assert row[0].text in flat and row[0].text.replace("→", "&rarr;") in page
    for line in conversion_lines(rep.conversion) + note_lines(rep):
        assert line in flat and line in page.replace("&#x27;", "'")
    # a layer left alone reads "kept" with its reason in both; the converted one its method
    assert re.search(r"stem.*kept.*no replacement measured faster", flat)
    assert re.search(r"<td[^>]*>stem</td>.*?<td class=\"kept text\">kept</td>.*?no replacement measured faster", page)
    assert "file size (MB)" in flat and "file size (MB)" in page


def test_a_layer_far_slower_per_flop_than_the_others_is_suspect():
    from separify.reporting.layers import flag_slow

    def row(name, mflops, ms):
        t = Timing("torch-cpu", ms, 0.0, 9, 9, 2, 1)
        return LayerFigures(name, "64→64 3×3", "kept", (1, 64, 8, 8), int(mflops * 1e6), None, t, NotMeasured("kept"))

    # the user's report: a 0.5 MFLOPs stem conv reading 16 ms next to 58 MFLOPs convs at a third of a millisecond
    flagged = flag_slow([row("stem", 0.5, 16.0), row("a", 57.8, 0.34), row("b", 57.8, 0.36), row("c", 28.9, 0.23)])
    assert [r.latency_before.suspect for r in flagged] == [True, False, False, False]
    assert "16 suspect" in _printed(_report_with(flagged))
    # a stem conv that is merely inefficient (7× the others per FLOP, as measured on the embedded model) is not,
    # nor a squeeze-and-excitation 1×1 conv on a pooled map (microseconds for a few thousand FLOPs)
    rows = flag_slow([row("stem", 0.9, 0.038), row("se", 0.002, 0.0085), row("a", 57.8, 0.34), row("b", 57.8, 0.36)])
    assert not any(r.latency_before.suspect for r in rows)


def _report_with(layers) -> Report:
    rep = _report()
    return Report(rep.original, rep.converted, rep.latency, rep.quality, tuple(layers), rep.settings,
                  rep.environment, rep.conversion)


def test_a_report_of_two_files_claims_no_output_and_gives_no_conversion_advice():
    rep = _report(ratio=1.2, accuracy=(0.93, 0.80))
    rep = Report(rep.original, rep.converted, rep.latency, rep.quality, rep.layers, rep.settings, rep.environment,
                 None)  # separify report A B: no conversion ran
    v = rep.verdict()
    assert v.output is None and v.hint is None and "written to" not in v.text() and "1.20× slower" in v.text()


def test_the_hints_never_name_what_is_already_in_effect():
    hints = [_report(ratio=1.02).verdict().hint, _report(accuracy=(0.93, 0.90), calibrated=True).verdict().hint]
    assert all("--max-drop" not in h and "--latency" not in h for h in hints)


def test_a_converted_time_of_zero_is_no_ratio():
    rep = _report()
    zero = Timing("torch-cpu", 0.0, 0.0, 9, 9, 2, 1)
    rep = Report(rep.original, rep.converted, (Latency("torch-cpu", rep.latency[0].original, zero),), rep.quality,
                 rep.layers, rep.settings, rep.environment, rep.conversion)
    assert rep.latency[0].ratio is None and "speed not measured" in rep.verdict().text()
    jsonschema.validate(json.loads(json.dumps(rep.to_dict())), schema())
