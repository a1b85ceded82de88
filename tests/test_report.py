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
    result = separify.convert(model, example_inputs=x, method="dw-pw", rank=2)
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
