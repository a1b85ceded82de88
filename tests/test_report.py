"""The before/after report: closed-form FLOPs, accuracy by hand, JSON against its schema, the HTML page, the
commands, and the errors users can hit. Timing code runs with tiny repeat counts; no timing is asserted."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import separify
from separify.cli import app
from separify.errors import SeparifyError
from separify.reporting.html import render_html, write_png
from separify.core.measure import (Timing, agreement, count_flops, module_flops, time_onnxruntime, time_torch,
                              topk_accuracy, export_onnx)
from separify.reporting import NotMeasured, print_report, schema

FAST = dict(min_run_time=0.01, layer_min_run_time=0.005)


def _conv_out(size, k, stride, pad, dil=1):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


@pytest.mark.parametrize("n,m,k,stride,pad,hw", [(8, 4, 3, 1, 1, 10), (16, 8, 5, 2, 0, 17), (3, 6, 1, 1, 0, 7)],
                         ids=["3x3", "5x5-stride2", "1x1"])
def test_dense_conv_flops_match_the_closed_form(n, m, k, stride, pad, hw):
    conv = nn.Conv2d(m, n, k, stride=stride, padding=pad)
    ho = _conv_out(hw, k, stride, pad)
    # FLOPs = 2 × MACs = 2 · N · M · kh · kw · Ho · Wo per image (bias additions are not counted)
    assert count_flops(conv, torch.randn(2, m, hw, hw)) == 2 * 2 * n * m * k * k * ho * ho


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_and_separable_flops_match_the_closed_form(mult):
    m, n, k, hw = 6, 10, 3, 9
    dw = nn.Conv2d(m, m * mult, k, padding=1, groups=m)
    assert module_flops(dw, [(1, m, hw, hw)]) == 2 * m * mult * k * k * hw * hw
    sep = separify.DwPwConv2d.from_conv(nn.Conv2d(m, n, k, padding=1), rank=mult)
    # depthwise k·k·M·K plus pointwise M·K·N MACs per pixel
    assert module_flops(sep, [(1, m, hw, hw)]) == 2 * (k * k * m * mult + m * mult * n) * hw * hw


class _Table(nn.Module):
    """Logits looked up by the integer in the input's first element: a model whose predictions are known."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def test_topk_accuracy_equals_the_hand_count():
    logits = torch.tensor([[5., 4, 3, 2, 1, 0, -1],    # ranks: 0 1 2 3 4 5 6
                           [0., 1, 2, 3, 4, 5, 6],     # ranks: 6 5 4 3 2 1 0
                           [1., .5, .1, .2, .3, .4, 9]])  # ranks: 6 0 1 5 4 3 2
    x = torch.tensor([[0.], [1.], [2.], [0.]])
    y = torch.tensor([0, 2, 1, 5])
    # sample 0: label 0 is top-1 → top-1 and top-5 hits; sample 1: label 2 is 5th largest → top-5 hit only;
    # sample 2: label 1 is 3rd → top-5 hit only; sample 3: label 5 is 6th → no hit.
    acc = topk_accuracy(_Table(logits), x, y, batch_size=3)
    assert acc == {1: 1 / 4, 5: 3 / 4}


def test_agreement_counts_matching_predictions_and_output_error():
    ref = _Table(torch.tensor([[1., 0], [0., 1]]))
    cand = _Table(torch.tensor([[1., 0], [1., 0]]))
    x = torch.tensor([[0.], [1.], [1.], [0.]])
    top1, rel = agreement(ref, cand, x, batch_size=3)
    assert top1 == 0.5
    assert rel == pytest.approx((2 * 2) ** 0.5 / 4 ** 0.5)


def test_timers_run_with_tiny_repeat_counts(tmp_path):
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    t = time_torch(conv, (x,), min_run_time=0.01, warmup=1, threads=1)
    assert t.backend == "torch-cpu" and t.median_ms > 0 and t.iqr_ms >= 0 and t.runs >= t.blocks >= 7
    assert t.threads == 1 and t.batch_size == 2
    path = tmp_path / "conv.onnx"
    export_onnx(conv, (x,), path)
    o = time_onnxruntime(path, (x,), min_run_time=0.01, warmup=1, threads=1)
    assert o.backend == "onnxruntime-cpu" and o.median_ms > 0 and o.threads == 1


def test_noisy_flags_a_wide_spread():
    assert Timing("torch-cpu", 1.0, 0.5, 10, 10, 1, 1).noisy
    assert not Timing("torch-cpu", 1.0, 0.05, 10, 10, 1, 1).noisy
    assert Timing("torch-cpu", 1.0, 0.0, 3, 3, 1, 1).noisy  # too few blocks to estimate the spread


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 7)).eval()


@pytest.fixture(scope="module")
def full_report():
    """One report with everything measured (tiny repeat counts), reused by the checks below."""
    model = _net()
    x = torch.randn(1, 3, 12, 12)
    result = separify.convert(model, example_inputs=x, method="dw-pw", rank=2, objective="flops")
    data = torch.randn(20, 3, 12, 12)
    labels = torch.randint(0, 7, (20,))
    rep = separify.report(model, result, example_inputs=x, data=data, labels=labels, data_name="20 samples",
                          metrics={"mean logit": lambda m: float(m(data).mean().detach())}, **FAST)
    return model, result, rep


def test_report_measures_both_models_and_every_layer(full_report):
    model, result, rep = full_report
    assert rep.original.flops == result.flops_before and rep.converted.flops == result.flops_after
    assert [lat.backend for lat in rep.latency] == ["torch-cpu", "onnxruntime-cpu"]
    assert all(isinstance(t, Timing) for lat in rep.latency for t in (lat.original, lat.converted))
    rows = {r.name: r for r in rep.layers}
    assert set(rows) == {"0", "3", "5"}
    assert rows["0"].status == rows["3"].status == "converted" and rows["0"].rank == 2
    assert rows["5"].status == "kept" and rows["5"].reason == "1×1 conv (already pointwise)"
    assert isinstance(rows["5"].latency_after, NotMeasured)
    assert all(isinstance(rows[n].latency_before, Timing) and isinstance(rows[n].latency_after, Timing)
               for n in ("0", "3"))
    # per-layer FLOPs at the layer's real input: 16→16 3×3 dw-pw K=2 on 12×12 = 2·(9·16·2 + 16·2·16)·144
    assert rows["3"].flops_after == 2 * (9 * 16 * 2 + 16 * 2 * 16) * 144
    metrics = {q.metric for q in rep.quality}
    assert {"top-1 accuracy", "top-5 accuracy", "top-1 agreement with the original",
            "relative output error vs the original", "mean logit"} <= metrics


def test_json_validates_against_the_schema(full_report, tmp_path):
    _, _, rep = full_report
    doc = json.loads(json.dumps(rep.to_dict()))
    jsonschema.validate(doc, schema())
    assert doc["schema"] == "separify-report" and doc["schema_version"] == 1
    assert doc["models"]["original"]["flops"]["unit"] == "FLOP"
    assert doc["latency"][0]["original"]["median"]["unit"] == "ms"
    # a report that skips latency says so instead of showing figures
    model = _net()
    x = torch.randn(1, 3, 12, 12)
    bare = separify.report(model, separify.convert(model, example_inputs=x, rank=2), example_inputs=x,
                           latency=False, per_layer=False)
    doc = json.loads(json.dumps(bare.to_dict()))
    jsonschema.validate(doc, schema())
    assert doc["latency"] == []
    assert {d["what"] for d in doc["not_measured"]} == {"whole-model latency", "per-layer latency"}
    assert all("not_measured" in r["latency_before"] for r in doc["layers"])
    with pytest.raises(jsonschema.ValidationError):  # the schema is not vacuous
        doc["models"]["original"]["flops"] = 12
        jsonschema.validate(doc, schema())


def test_html_has_the_plots_and_every_row_and_opens_offline(full_report, tmp_path):
    _, _, rep = full_report
    page = render_html(rep)
    assert page.count("<svg") == 3  # ratios, FLOPs per layer, latency per layer
    for r in rep.layers:
        assert f"<td class=\"text\">{r.name}</td>" in page
    for q in rep.quality:
        assert q.metric in page
    assert "<script" not in page and not re.search(r"(src|href)=['\"]https?:", page)
    write_png(rep, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_terminal_report_prints_the_tables(full_report, capsys):
    from rich.console import Console

    _, _, rep = full_report
    console = Console(width=200, record=True)
    print_report(rep, console)
    text = console.export_text()
    assert "Whole model" in text and "onnxruntime-cpu" in text and "1×1 conv (already pointwise)" in text


def test_comparison_draws_the_tradeoff(tmp_path):
    model = _net()
    x = torch.randn(1, 3, 12, 12)
    data, labels = torch.randn(16, 3, 12, 12), torch.randint(0, 7, (16,))
    comp = separify.compare(model, [dict(method="dw-pw", flops=0.6), dict(method="pw-dw-pw", flops=0.6)],
                            example_inputs=x, data=data, labels=labels, onnx=False, min_run_time=0.01)
    assert [label for label, _, _ in comp.runs] == ["method=dw-pw", "method=pw-dw-pw"]
    for _, _, rep in comp.runs:
        jsonschema.validate(json.loads(json.dumps(rep.to_dict())), schema())
    page = render_html(comp)
    assert page.count("<svg") >= 2 + 2  # two trade-off plots, then each run's own
    assert "top-1 accuracy against FLOPs" in page and "Measured latency against FLOPs" in page


def test_models_with_different_outputs_are_refused():
    model = _net()
    other = nn.Sequential(*list(_net())[:-1], nn.Linear(8, 5)).eval()
    with pytest.raises(SeparifyError, match="outputs differ in shape"):
        separify.report(model, other, example_inputs=torch.randn(1, 3, 12, 12), latency=False)


def test_data_that_does_not_fit_is_refused():
    model = _net()
    with pytest.raises(SeparifyError, match="does not fit"):
        separify.report(model, model, example_inputs=torch.randn(1, 3, 12, 12), data=torch.randn(4, 5, 12, 12),
                        latency=False, per_layer=False)
    with pytest.raises(SeparifyError, match="labels for"):
        separify.report(model, model, example_inputs=torch.randn(1, 3, 12, 12), data=torch.randn(4, 3, 12, 12),
                        labels=torch.zeros(3, dtype=torch.long), latency=False, per_layer=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_missing_gpu_is_an_error_unless_fallback_is_asked_for():
    model = _net()
    x = torch.randn(1, 3, 12, 12)
    with pytest.raises(SeparifyError, match="no CUDA GPU"):
        separify.report(model, model, example_inputs=x, device="cuda")
    rep = separify.report(model, model, example_inputs=x, device="cuda", fallback_to_cpu=True, onnx=False, **FAST)
    assert rep.settings["device"] == "cpu" and any("CUDA" in n for n in rep.settings["notes"])


# --------------------------------------------------------------------------------------------------------------
# Commands

runner = CliRunner()


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """The embedded model exported as a .pt2, and its conversion written by ``separify convert``."""
    from separify.io.embedded import load_default_model, load_eval_data

    folder = tmp_path_factory.mktemp("pair")
    x, _ = load_eval_data(limit=2)
    original = folder / "orig.pt2"
    torch.export.save(torch.export.export(load_default_model().eval(), (x[:1],)), str(original))
    converted = folder / "conv.pt2"
    res = runner.invoke(app, ["convert", str(original), "-o", str(converted), "--method", "dw-pw", "--rank", "1",
                              "--no-timing", "--no-layers"])
    assert res.exit_code == 0, res.output
    return original, converted


def test_report_command_pairs_layers_of_exported_models_and_writes_files(saved_pair, tmp_path):
    original, converted = saved_pair
    out = tmp_path / "r.json"
    page = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(original), str(converted), "--json", str(out), "--html", str(page),
                              "--min-time", "0.02", "--no-onnx"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, schema())
    layers = {r["name"]: r for r in doc["layers"]}
    # every 3×3 conv with groups 1 was converted (rank 1 dw-pw), 1×1 shortcuts kept
    assert {n for n, r in layers.items() if r["status"] == "converted"} == {
        "stem.0", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer3.conv1", "layer3.conv2"}
    assert all(r["method"] == "dw-pw" and r["rank"] == 1 for r in layers.values() if r["status"] == "converted")
    assert layers["layer2.shortcut.0"]["status"] == "kept"
    assert doc["models"]["original"]["file_size"]["value"] == original.stat().st_size
    assert "not_measured" not in doc["layers"][0]["latency_after"]
    assert page.read_text().count("<svg") == 3
    # an existing report file is not overwritten without --force
    res = runner.invoke(app, ["report", str(original), str(converted), "--json", str(out), "--no-timing"])
    assert res.exit_code == 1 and "exists; pass --force" in res.output


def test_report_command_bad_inputs_give_one_error_line(saved_pair, tmp_path):
    original, converted = saved_pair
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a model")
    for args, message in [
        ([str(original), str(garbage)], "unknown format"),
        ([str(original), str(converted), "--device", "tpu"], "device must be 'cpu' or 'cuda'"),
        ([str(original), str(converted), "--html", str(tmp_path / "r.txt")], "must end in .html"),
        ([str(original), str(converted), "--batch-size", "4"], "fixed batch"),
    ] + ([] if torch.cuda.is_available() else [([str(original), str(converted), "--device", "cuda"], "no CUDA GPU")]):
        res = runner.invoke(app, ["report", *args, "--no-onnx", "--no-layers", "--min-time", "0.01"])
        assert res.exit_code == 1, (args, res.output)
        assert message in res.output and "Traceback" not in res.output


def test_compare_command_on_the_embedded_model(tmp_path):
    page = tmp_path / "c.html"
    res = runner.invoke(app, ["compare", "--flops", "0.5", "--method", "dw-pw", "--no-onnx", "--min-time", "0.02",
                              "--html", str(page), "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert "Conversions compared" in res.stdout and "flops=0.5" in res.stdout
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["schema"] == "separify-comparison" and len(doc["runs"]) == 1
    jsonschema.validate(doc["runs"][0]["report"], schema())
    assert "top-1 accuracy against FLOPs" in page.read_text()


# --------------------------------------------------------------------------------------------------------------
# The max-drop search, the conversion's own timings, implausible readings (fake results: nothing timed for real)

from rich.console import Console  # noqa: E402

from separify.config import ConvertConfig, LatencyTarget  # noqa: E402
from separify.records import ConvertResult, Search, SearchTry  # noqa: E402
from separify.reporting import Latency, LayerFigures, ModelFigures, Report, ReportSettings  # noqa: E402
from separify.reporting.progress import Bar  # noqa: E402
from separify.reporting.data import FROM_CHECK, conversion_doc  # noqa: E402
from separify.reporting.layers import flag_shared  # noqa: E402
from separify.reporting.search import search_chosen, search_rows, search_title  # noqa: E402

TARGET = "torch-cpu float32, batch 1, 1 threads"


def _search(chosen: int | None = 1) -> Search:
    tries = [SearchTry(0.5, 0.41, 0.62, 0.70, False, 12), SearchTry(0.7, 0.55, 0.78, 0.745, True, 9),
             SearchTry(0.85, 0.8, None, 0.752, True, 4)]
    if chosen is not None:
        tries[chosen].chosen = True
    return Search("top-1 accuracy (100 held-out images)", 0.755, 0.02, TARGET, tries)


def _fake_result(search: Search | None = None, **latency) -> ConvertResult:
    cfg = ConvertConfig(objective="latency", target=LatencyTarget("cpu", threads=1))
    return ConvertResult(model=None, layers=[], path="fx", config=cfg, flops_before=100, flops_after=55,
                         latency_target=TARGET, search=search, **latency)


def _fake_report(result: ConvertResult, latency=(), layers=()) -> Report:
    env = {"separify": "0", "torch": torch.__version__, "python": "3", "platform": "p", "cpu": "c", "cpu_count": 2,
           "threads": 1, "onnxruntime": None, "gpu": None}
    settings = {"device": "cpu", "batch_size": 1, "threads": 1, "input_shapes": [[1, 3, 12, 12]],
                "min_run_time": {"value": 0.01, "unit": "s"}, "layer_min_run_time": {"value": 0.01, "unit": "s"},
                "notes": []}
    return Report(ModelFigures(100, 10, 1000), ModelFigures(55, 6, 600), tuple(latency), (), tuple(layers), settings,
                  env, conversion_doc(result))


def _printed(rep: Report) -> str:
    console = Console(width=220, record=True)
    print_report(rep, console)
    return console.export_text()


def test_search_rows_say_every_try_and_which_was_chosen():
    doc = conversion_doc(_fake_result(_search()))["search"]
    assert search_title(doc) == f"max-drop search on {TARGET}: top-1 accuracy (100 held-out images)"
    assert search_rows(doc) == [
        ["original", "1.000", "1.000", "0.755", "", "", ""],
        ["0.5", "0.410", "0.620", "0.7", "-0.055", "over", ""],
        ["0.7", "0.550", "0.780", "0.745", "-0.01", "within", "chosen"],
        ["0.85", "0.800", "—", "0.752", "-0.003", "within", ""],
    ]
    assert doc["chosen"] == 1 and doc["floor"]["value"] == pytest.approx(0.735)
    assert search_chosen(doc).startswith("chosen: latency budget 0.7, the fastest try within the allowed drop: "
                                         "time ratio 0.780")
    none = conversion_doc(_fake_result(_search(chosen=None)))["search"]
    assert none["chosen"] is None and "the original model was kept" in search_chosen(none)


def test_search_in_the_terminal_json_and_html(tmp_path):
    rep = _fake_report(_fake_result(_search()))
    text = _printed(rep)
    doc = rep.conversion["search"]
    assert search_title(doc) in text and search_chosen(doc) in text
    for head in ("latency budget", "FLOPs ratio", "time ratio", "change vs original", "max drop"):
        assert head in text
    assert re.search(r"0\.7 +│ +0\.550 +│ +0\.780 +│ +0\.745 +│ +-0\.01 +│ +within +│ +chosen", text)
    jsonschema.validate(json.loads(json.dumps(rep.to_dict())), schema())
    page = render_html(rep)
    assert f"<h2>{search_title(doc)}</h2>" in page and search_chosen(doc) in page
    assert "<th>latency budget</th>" in page and '<td class="chosen">chosen</td>' in page
    assert page.count("<td>over</td>") + page.count('<td class="worse">over</td>') == 1
    search_part = page[page.index(f"<h2>{search_title(doc)}</h2>"):page.index("<h2>Plots</h2>")]
    assert search_part.count("<svg") == 1 and "original − max drop" in search_part  # the plot, embedded
    write_png(rep, tmp_path / "s.png")
    # without a search there is neither table nor plot
    bare = _fake_report(_fake_result())
    assert "max-drop search" not in _printed(bare) and "max-drop search" not in render_html(bare)
    assert "search" not in bare.conversion


def _no_timing(monkeypatch):
    """Make every whole-model and layer timer fail: a report that times anything fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("timed again")

    import separify.planning.latency as latency
    import separify.reporting.layers as layers
    import separify.reporting.measure as report_measure

    monkeypatch.setattr(latency, "time_model", fail)
    monkeypatch.setattr(separify.core.measure, "time_torch", fail)
    monkeypatch.setattr(layers, "time_torch", fail)
    monkeypatch.setattr(report_measure, "time_onnxruntime", fail)
    monkeypatch.setattr(report_measure, "_onnxruntime", fail)
    return latency


def _with_check(result, backend="cpu", threads=1, blocks=7, names=("torch-cpu",) * 2):
    before = Timing(names[0], 4.0, 0.2, 70, blocks, threads, 1)
    after = Timing(names[1], 3.0, 0.1, 90, blocks, threads, 1)
    result.latency_spec = LatencyTarget(backend, threads=threads)
    result.latency_before, result.latency_after = before, after
    return before, after


def test_the_conversions_check_is_reused_not_timed_again(monkeypatch):
    model, x = _net(), torch.randn(1, 3, 12, 12)
    result = separify.convert(model, example_inputs=x, method="dw-pw", rank=2, objective="flops")
    before, after = _with_check(result)
    _no_timing(monkeypatch)
    rep = separify.report(model, result, example_inputs=x, threads=1, onnx=False, per_layer=False)
    (lat,) = rep.latency
    assert lat.backend == "torch-cpu" and lat.source == FROM_CHECK
    assert lat.original is before and lat.converted is after and lat.ratio == 0.75
    doc = json.loads(json.dumps(rep.to_dict()))
    jsonschema.validate(doc, schema())
    assert doc["latency"][0]["source"] == "conversion check" and doc["latency"][0]["original"]["median"]["value"] == 4
    assert "torch-cpu (median ±IQR, 1 threads), from the conversion's check" in _printed(rep)
    assert "from the conversion&#x27;s check" in render_html(rep)


def test_an_onnxruntime_check_fills_the_onnxruntime_row_and_torch_is_timed_by_time_model(monkeypatch):
    model, x = _net(), torch.randn(1, 3, 12, 12)
    result = separify.convert(model, example_inputs=x, method="dw-pw", rank=2, objective="flops")
    before, after = _with_check(result, backend="onnxruntime", names=("onnxruntime-cpu",) * 2)
    latency = _no_timing(monkeypatch)
    calls = []

    def time_model(models, inputs, target, *, run_time=None, scale=1.0, either_format=()):
        calls.append((target, run_time, tuple(inputs[0].shape)))
        return [Timing("torch-cpu", 2.0, 0.1, 50, 7, target.threads, target.batch_size) for _ in models]

    monkeypatch.setattr(latency, "time_model", time_model)
    rep = separify.report(model, result, example_inputs=x, threads=1, per_layer=False, min_run_time=0.03)
    torch_row, ort_row = rep.latency
    assert torch_row.source == "report" and torch_row.original.median_ms == 2.0
    (target, run_time, shape), = calls
    assert (target.backend, target.threads, target.batch_size, target.dtype, target.runs_channels_last) == \
        ("cpu", 1, 1, "float32", True)
    assert run_time == 0.03 and shape == (1, 3, 12, 12)
    assert ort_row.backend == "onnxruntime-cpu" and ort_row.source == FROM_CHECK
    assert ort_row.original is before and ort_row.converted is after


@pytest.mark.parametrize("change", ["threads", "input", "injected", "channels_last"])
def test_a_check_on_another_target_is_not_reused(monkeypatch, change):
    model, x = _net(), torch.randn(1, 3, 12, 12)
    result = separify.convert(model, example_inputs=x, method="dw-pw", rank=2, objective="flops")
    _with_check(result, threads=2 if change == "threads" else 1, blocks=1 if change == "injected" else 7)
    if change == "channels_last":
        result.latency_spec = LatencyTarget("cpu", threads=1, channels_last=False)  # the report times channels-last
    latency = _no_timing(monkeypatch)
    monkeypatch.setattr(latency, "time_model", lambda models, inputs, target, **kw: [
        Timing("torch-cpu", 9.0, 0.1, 50, 7, 1, 1) for _ in models])
    x_report = torch.randn(1, 3, 16, 16) if change == "input" else x
    rep = separify.report(model, result, example_inputs=x_report, threads=1, onnx=False, per_layer=False)
    assert rep.latency[0].source == "report" and rep.latency[0].original.median_ms == 9.0


def test_suspect_timings_show_in_every_form():
    sus = Timing("torch-cpu", 32.0, 0.0, 7, 7, 2, 1, suspect=True)
    ok = Timing("torch-cpu", 30.0, 3.0, 7, 7, 2, 1)
    rep = _fake_report(_fake_result(), latency=[Latency("torch-cpu", sus, ok)])
    text = _printed(rep)
    assert "32 ±0% suspect" in text and "30 ±10% suspect" not in text and "1 timing(s) marked suspect" in text
    doc = json.loads(json.dumps(rep.to_dict()))
    jsonschema.validate(doc, schema())
    assert doc["latency"][0]["original"]["suspect"] is True and doc["latency"][0]["converted"]["suspect"] is False
    page = render_html(rep)  # the terminal's words, marked for the page's style
    assert '<td class="suspect"><span title="its readings were implausible' in page and "32 ±0% suspect</span>" in page


def _layer(name, conv, shape, before, after=None, rank=4):
    t = (lambda ms: Timing("torch-cpu", ms, 0.0, 7, 7, 2, 1) if ms is not None else NotMeasured("layer unchanged"))
    return LayerFigures(name, conv, "converted" if after is not None else "kept", shape, 10, 5, t(before), t(after),
                        method="pw-dw-pw" if after is not None else None, rank=rank if after is not None else None,
                        selected_ms_before=1.67, selected_ms_after=0.972)


def test_layers_of_different_shapes_reading_one_figure_are_suspect():
    # the user's report: nine converted resnet18 convs of four shapes, every one "32 → 96 ms ±0%"
    shapes = [("64→64 3×3", (1, 64, 56, 56))] * 3 + [("128→128 3×3", (1, 128, 28, 28))] * 2 + \
             [("256→256 3×3", (1, 256, 14, 14))] * 2 + [("512→512 3×3", (1, 512, 7, 7))] * 2
    rows = flag_shared([_layer(f"l{i}", c, s, 32.0, 96.0) for i, (c, s) in enumerate(shapes)])
    assert all(r.latency_before.suspect and r.latency_after.suspect for r in rows)
    rep = _fake_report(_fake_result(), layers=rows)
    assert "32 suspect → 96 suspect" in _printed(rep)
    jsonschema.validate(json.loads(json.dumps(rep.to_dict())), schema())
    # real readings: identical layers may agree, different ones do not
    real = flag_shared([_layer("a", *shapes[0], 1.50, 1.21), _layer("b", *shapes[1], 1.50, 1.21),
                        _layer("c", *shapes[3], 1.46, 1.03), _layer("d", *shapes[5], 1.58, 0.844),
                        _layer("e", "64→128 1×1 /2", (1, 64, 56, 56), 0.284)])
    assert not any(t.suspect for r in real for t in (r.latency_before, r.latency_after) if isinstance(t, Timing))


def test_layer_rows_name_the_selections_target_and_flag_a_disagreeing_dense_time(monkeypatch):
    import separify.reporting.layers as layers

    model, x = _net(), torch.randn(1, 3, 12, 12)
    result = separify.convert(model, example_inputs=x, method="dw-pw", rank=2, objective="flops")
    _with_check(result)
    result.latency_target = TARGET
    for rec in result.converted:
        rec.plan.time_before_ms, rec.plan.time_after_ms = 1.67, 0.972
    readings = iter([20.0, 40.0, 1.7, 1.0, 0.5])  # layer 0 measured 12× the selection's dense time, layer 3 not

    def fake_time_torch(models, inputs, **kw):
        one = isinstance(models, nn.Module)
        out = [Timing("torch-cpu", next(readings), 0.1, 70, 7, 1, 1) for _ in ([models] if one else models)]
        return out[0] if one else out

    _no_timing(monkeypatch)
    monkeypatch.setattr(layers, "time_torch", fake_time_torch)
    settings = ReportSettings(threads=1, layer_min_run_time=0.01).resolved()[0]
    rows = {r.name: r for r in layers.torch_layers(model, result.model, (x,), result, settings, Bar(None))}
    assert f"selected on {TARGET}: 1.67 → 0.972 ms" in rows["0"].note
    assert "timed here at 12× what the selection measured" in rows["0"].note
    assert "timed here" not in rows["3"].note
