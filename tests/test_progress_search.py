"""Progress with a time left on every long step: the ``max_drop`` search's overall bar stays drawn above each try's
own bars (one display: rich draws one live display per terminal), the loss-aware weights get a bar over their
passes, and the steps of unknown length (loading, reading, writing) show their elapsed time."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

import separify
from separify.calibration import sensitivity
from separify.core import progress
from timers import flops_timer

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=200)


def _frames(console: Console) -> list[list[str]]:
    """Each redraw of a live display on ``console``, as its lines (rich starts a redraw with a carriage return)."""
    plain = ANSI.sub("", console.file.getvalue())
    return [[line.rstrip() for line in frame.split("\n") if line.strip()] for frame in plain.split("\r")]


@pytest.fixture
def terminal(monkeypatch) -> Console:
    """Every display the progress helpers make without a console of their own draws on one emulated terminal."""
    console = _terminal()
    real = progress._new
    monkeypatch.setattr(progress, "_new", lambda cols, auto, con: real(cols, auto, con if con is not None else console))
    return console


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


X = torch.randn(1, 3, 12, 12)
CALIB = torch.randn(24, 3, 12, 12, generator=torch.Generator().manual_seed(2))


# --- the overall bar


def test_bars_opened_inside_the_overall_bar_are_rows_of_its_display(terminal):
    with progress.overall_bar("searching", 3) as overall:
        overall.show("searching: try 1 of at most 3")
        inner = progress.progress_bar(total=True)
        assert not isinstance(inner, Progress)  # no display of its own
        with inner:
            task = inner.add_task("timing candidates", total=2)
            inner.refresh()
            inner.advance(task)
            inner.refresh()
        overall.done()
        overall.show("searching: try 2 of at most 3")
        with progress.step("evaluating the plan"):
            pass
    assert progress._SHARED.get() is None
    frames = _frames(terminal)
    both = [f for f in frames if any(line.startswith("timing candidates") for line in f)]
    assert both and all(f[0].startswith("searching: try 1 of at most 3") and " 0/3 " in f[0] for f in both)
    assert any(f[1].startswith("evaluating the plan") and "1/3" in f[0] for f in frames if len(f) == 2)
    assert all(len(f) <= 2 for f in frames)
    assert "0:00:00" in both[-1][1]  # the inner bar keeps its elapsed time (its own row)


def test_bars_outside_an_overall_bar_are_displays_of_their_own():
    assert isinstance(progress.progress_bar(total=True), Progress)
    with progress.overall_bar("searching", 2, on=False):
        assert progress._SHARED.get() is None and isinstance(progress.progress_bar(), Progress)


def test_a_live_row_redraws_the_shared_display_until_it_ends(terminal):
    import time

    with progress.overall_bar("searching", 1):
        with progress.step("evaluating"):
            time.sleep(0.35)
        drawn = len(_frames(terminal))
        time.sleep(0.25)
        assert len(_frames(terminal)) == drawn  # the row's thread stopped with it
    assert drawn >= 4  # drawn at the start and about 10 times a second while the row was open


def test_the_search_shows_tries_done_of_at_most_tries_above_each_try(terminal):
    seen = []

    def evaluate(model) -> float:
        import time

        display = progress._SHARED.get()
        seen.append([(t.description, t.completed, t.total) for t in display.tasks])
        if not any(isinstance(m, separify.SeparableConv2d) for m in model.modules()):
            return 1.0
        time.sleep(0.2)  # each try longer than rich's time-left column is cached (0.5 s over the last three)
        return 0.5

    with pytest.warns(UserWarning, match="no layer was converted"):
        separify.convert(_net(), example_inputs=X, timer=flops_timer(), latency_cache=False, max_drop=0.0,
                         evaluate=evaluate, objective="latency", progress=True)
    assert seen[0] == [("max-drop search: the original model", 0, 5), ("evaluating the original model", 0, None)]
    for i, tasks in enumerate(seen[1:]):  # every plan drops: all five tries, each evaluated under the search's bar
        assert tasks[0][0].startswith(f"max-drop search: try {i + 1} of at most 5, latency budget ")
        assert tasks[0][1:] == (i, 5) and tasks[1][0].startswith("evaluating the plan at latency budget ")
    assert len(seen) == 6
    frames = _frames(terminal)
    rows = [f for f in frames if len(f) > 1]
    assert any(line.startswith("timing candidates") for f in rows for line in f[1:])
    assert all(f[0].startswith("max-drop search") for f in rows)
    assert any(re.search(r" 3/5 +\d+:\d\d:\d\d ETA \d+:\d\d:\d\d$", f[0]) for f in frames if f)  # from try 2 on


def test_the_search_draws_nothing_off_a_terminal(capsys):
    separify.convert(_net(), example_inputs=X, timer=flops_timer(), latency_cache=False, max_drop=0.5,
                     evaluate=lambda m: 1.0, objective="latency", progress=True, calibration=CALIB)
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == ""


def test_a_callable_progress_gets_layer_names_only_in_a_search():
    names = []
    separify.convert(_net(), example_inputs=X, timer=flops_timer(), latency_cache=False, max_drop=0.5,
                     evaluate=lambda m: 1.0, objective="latency", progress=names.append, calibration=CALIB)
    assert names and all(isinstance(n, str) for n in names)
    assert progress._SHARED.get() is None


# --- the loss-aware weights


def test_sensitivity_reports_its_passes_and_measures_the_same():
    net, targets = _net(), {"0": "0", "2": "2"}
    xs = [CALIB[:8], CALIB[8:12]]
    calls = []
    with_bar = sensitivity(net, targets, xs, probes=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(7)]  # before the first pass, then after each forward and backward
    assert with_bar == sensitivity(net, targets, xs, probes=2)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_the_loss_aware_weights_have_a_bar_over_their_passes(terminal, backend, tmp_path):
    net = _net()
    if backend == "torch":
        separify.convert(net, example_inputs=X, flops=0.5, calibration=CALIB, progress=True)
    else:
        pytest.importorskip("onnx2torch")
        path = tmp_path / "net.onnx"
        torch.onnx.export(net, (X,), str(path), dynamo=False, dynamic_axes={"input": {0: "n"}},
                          input_names=["input"])
        separify.convert_onnx(path, input_shapes=tuple(X.shape), flops=0.5, calibration=CALIB, progress=True)
    rows = [line for f in _frames(terminal) for line in f if line.startswith("calibration: each layer's effect")]
    assert any(re.search(r" 0/3 +0:00:\d\d", r) for r in rows)  # the total known before the first pass
    assert any(re.search(r" 3/3 +0:00:\d\d ETA 0:00:00$", r) for r in rows)


def test_no_loss_aware_bar_when_nothing_is_measured(terminal):
    separify.convert(_net(), example_inputs=X, flops=0.5, calibration=CALIB, progress=True, calib_loss_aware=False)
    assert "each layer's effect" not in ANSI.sub("", terminal.file.getvalue())


# --- steps of unknown length


def test_a_step_shows_its_elapsed_time_on_its_console():
    import time

    console = _terminal()
    with progress.step("loading the model", console=console):
        time.sleep(0.3)
        console.print("Loaded model.pt2")
    plain = ANSI.sub("", console.file.getvalue())
    assert re.search(r"loading the model 0:00:00", plain) and "Loaded model.pt2" in plain
    cols = progress._step_columns()
    assert [type(c) for c in cols if isinstance(c, (SpinnerColumn, TimeElapsedColumn))] == [SpinnerColumn,
                                                                                           TimeElapsedColumn]
    assert not any(isinstance(c, TimeRemainingColumn) for c in cols)  # nothing to estimate it from


def test_a_step_draws_nothing_off_a_terminal():
    console = Console(file=io.StringIO(), force_terminal=False)
    with progress.step("loading the model", console=console):
        pass
    assert console.file.getvalue() == ""


def test_the_cli_steps_show_their_elapsed_time():
    """``separify convert``'s loading, reading and writing are :func:`progress.step` s (spinner, elapsed time), not
    ``console.status`` (a spinner alone)."""
    import inspect

    from separify.cli import _convert

    source = inspect.getsource(_convert)
    assert "console.status(" not in source
    assert len(re.findall(r"with step\(", source)) == 6


@pytest.mark.parametrize("tracer", ["fx", "module"])
def test_tracing_reports_module_calls_up_to_its_total(tracer):
    from separify.backends.torch.backend import TorchBackend
    from separify.config import ConvertConfig

    calls: list[tuple[int, int]] = []
    TorchBackend(_net(), ConvertConfig(tracer=tracer), torch.randn(1, 3, 16, 16),
                 progress=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert calls[0][0] == 0 and len({t for _, t in calls}) == 1
    assert done == sorted(done) and len(calls) > 4
    assert done[-1] <= calls[0][1] and done[-1] >= calls[0][1] // 2  # the trace and the forward, or the forward


def test_the_tracing_bar_counts_module_calls(terminal):
    separify.convert(_net(), example_inputs=torch.randn(1, 3, 16, 16), objective="flops", flops=0.5, progress=True)
    text = "\n".join("\n".join(f) for f in _frames(terminal))
    assert re.search(r"tracing the model, counting FLOPs .*\d+/\d+", text)
