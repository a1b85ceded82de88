"""A quiet terminal: third-party warnings and log lines hidden in CLI runs unless ``-v/--verbose`` (before or after the
command's name), separify's own warnings always shown, the library untouched; every progress bar with a known total
shows the time left."""

from __future__ import annotations

import logging
import warnings

import pytest
from typer.testing import CliRunner

from separify.cli import _convert, app
from separify.cli._quiet import LOGGERS, Quiet
from separify.errors import SeparifyError

THIRD_PARTY = "No complete tensor found in the group! Returning the first one."
OURS = "the latency cache could not be written"
LOGGED = "No CUDA runtime is found, using CUDA_HOME='/usr/local'"


def _chatter() -> None:
    """What torch and separify say during a run: a third-party warning and log line, a separify warning."""
    warnings.warn_explicit(THIRD_PARTY, UserWarning, "torch/export/pt2_archive/_package.py", 415,
                           module="torch.export.pt2_archive._package")
    warnings.warn_explicit(OURS, UserWarning, "separify/planning/latency.py", 343, module="separify.planning.latency")
    logging.getLogger("torch.utils.cpp_extension").warning(LOGGED)


@pytest.fixture
def chatty(monkeypatch):
    """``separify convert`` whose first step says everything of :func:`_chatter` and then stops with an error."""

    def check_output_path(*args, **kwargs):
        _chatter()
        raise SeparifyError("stop here")

    monkeypatch.setattr(_convert, "check_output_path", check_output_path)


@pytest.mark.parametrize("args, shown", [
    (["convert"], False),
    (["-v", "convert"], True),
    (["--verbose", "convert"], True),
    (["convert", "-v"], True),
])
def test_third_party_chatter_only_with_verbose(chatty, args, shown):
    with warnings.catch_warnings(record=True) as caught:  # what the terminal would show
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, [*args, "-o", "out.pt2"])
    said = [str(w.message) for w in caught]
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 1 and "stop here" in text
    assert OURS in said  # separify's own warning, always
    assert (THIRD_PARTY in said) is shown
    assert (LOGGED in text) is shown  # torch's logger writes to the (captured) stderr


def test_quiet_hides_third_party_warnings_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Quiet():
            _chatter()
            warnings.warn_explicit("torch C++ says (Triggered internally at /pytorch/aten/x.cpp:1.)", UserWarning,
                                   "separify/core/decompose.py", 1, module="separify.core.decompose")
            warnings.warn_explicit("a user's module", UserWarning, "mine.py", 1, module="separify_plugin")
        after = len(caught)
        _chatter()  # outside: as before
    assert [str(w.message) for w in caught[:after]] == [OURS]
    assert THIRD_PARTY in [str(w.message) for w in caught[after:]]


def test_verbose_changes_nothing():
    before = list(warnings.filters)
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Quiet(verbose=True):
            assert {name: logging.getLogger(name).level for name in LOGGERS} == levels
            _chatter()
    assert THIRD_PARTY in [str(w.message) for w in caught]
    assert warnings.filters == before


def test_third_party_loggers_at_error_inside_only():
    ours = logging.getLogger("separify")
    ours_level, ours_effective = ours.level, ours.getEffectiveLevel()
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    filters = list(warnings.filters)
    with Quiet():
        for name in (*LOGGERS, "torch.utils.cpp_extension", "torch.onnx._internal.exporter._registration",
                     "onnxscript.version_converter", "onnx_ir"):
            assert logging.getLogger(name).getEffectiveLevel() >= logging.ERROR, name
        assert ours.level == ours_level and ours.getEffectiveLevel() == ours_effective < logging.ERROR
        assert logging.getLogger("separify.pipeline").isEnabledFor(logging.WARNING)
    assert {name: logging.getLogger(name).level for name in LOGGERS} == levels
    assert warnings.filters == filters


def test_lift_restores_at_once():
    quiet = Quiet()
    with quiet:
        quiet.lift()
        assert logging.getLogger("torch").isEnabledFor(logging.WARNING)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _chatter()
        assert THIRD_PARTY in [str(w.message) for w in caught]


def test_importing_the_cli_changes_no_filter():
    """Only a CLI run enters :class:`Quiet`; this module imported the CLI (and so torch) already."""
    from separify.cli._quiet import THIRD_PARTY as pattern

    assert not any(getattr(f[3], "pattern", None) == pattern for f in warnings.filters)
    assert logging.getLogger("torch").level < logging.ERROR


# --- progress: the time left wherever the total is known

def test_progress_bar_has_time_left_with_a_total():
    from rich.progress import TimeRemainingColumn

    from separify.core.progress import columns, progress_bar

    assert any(isinstance(c, TimeRemainingColumn) for c in columns(total=True))
    assert not any(isinstance(c, TimeRemainingColumn) for c in columns(total=False))
    assert any(isinstance(c, TimeRemainingColumn) for c in progress_bar(total=True).columns)


def test_bars_draw_the_time_left_from_the_start():
    import io
    import re
    import time

    from rich.console import Console

    from separify.core.progress import progress_bar

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with progress_bar(console=console) as bar:
        task = bar.add_task("timing candidates", total=4)
        bar.refresh()  # drawn before the first (long) step
        first = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())
        for _ in range(3):
            time.sleep(0.05)
            bar.advance(task)
            bar.refresh()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())
    assert "timing candidates" in first and "0/4" in first and "ETA -:--:--" in first
    assert re.search(r"3/4 \d+:\d\d:\d\d ETA \d+:\d\d:\d\d", plain)


def test_report_bar_has_time_left():
    from contextlib import ExitStack

    from rich.progress import TimeRemainingColumn

    from separify.reporting.progress import progress_bar

    with ExitStack() as stack:
        bar = progress_bar(stack, True)
        assert any(isinstance(c, TimeRemainingColumn) for c in bar._p.columns)
        bar.step("counting")
        bar.total(3)
        assert bar._p.tasks[0].total == 3 and bar._p.tasks[0].completed == 0


def test_filters_added_during_a_quiet_run_stay_after_it():
    import warnings

    from separify.cli._quiet import Quiet

    with warnings.catch_warnings():
        before = len(warnings.filters)
        with Quiet():
            warnings.filterwarnings("once", message="a library's own filter")  # e.g. added on import
        assert len(warnings.filters) == before + 1 and warnings.filters[0][1].pattern == "a library's own filter"
