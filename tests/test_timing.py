"""Implausible readings: what :func:`separify.core.measure.implausible` calls implausible, and how ``time_torch`` and
``time_onnxruntime`` time such readings again once and mark them ``suspect``. Block readings are injected: no
assertion depends on this machine's speed."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch
from torch import nn

from separify.core import measure
from separify.core.measure import CLOCK_RESOLUTION_MS, Timing, implausible

STEADY = [1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01]  # spread ~2%
VARIED = [1.0, 1.2, 0.9, 1.3, 0.8, 1.1, 1.0]  # spread ~25%
FROZEN = [2.0] * 7


def test_timing_keeps_its_positional_fields_and_suspect_defaults_to_false():
    t = Timing("torch-cpu", 1.0, 0.1, 10, 10, 1, 1)
    assert t.suspect is False and dataclasses.asdict(t)["suspect"] is False
    assert dataclasses.fields(Timing)[-1].name == "suspect"
    assert Timing(**dataclasses.asdict(t)) == t  # a cached timing reads back


def test_a_frozen_reading_beside_a_varying_one_is_implausible():
    assert implausible([FROZEN, VARIED], CLOCK_RESOLUTION_MS) == [True, False]
    assert implausible([FROZEN, STEADY], CLOCK_RESOLUTION_MS) == [False, False]  # the partner is steady too
    assert implausible([FROZEN], CLOCK_RESOLUTION_MS) == [False]  # nothing to compare with
    assert implausible([[2.0] * 4, VARIED], CLOCK_RESOLUTION_MS) == [False, False]  # too few blocks to say


def test_readings_at_the_clocks_resolution_are_implausible():
    resolution = 0.001  # ms
    assert implausible([[0.0050, 0.0050, 0.0050]], resolution) == [True]  # 5 µs per call, all the same
    assert implausible([[0.0050, 0.0052, 0.0049]], resolution) == [False]  # they differ
    assert implausible([[0.0500, 0.0500, 0.0500]], resolution) == [False]  # 10× the resolution and more


def _blocks(*runs):
    """A stand-in for ``measure._time_blocks`` that returns ``runs`` in turn (one list of block readings per model)
    and counts its calls."""
    calls = []

    def fake(fns, **kwargs):
        calls.append(len(fns))
        return [(list(b), 10 * len(b)) for b in runs[len(calls) - 1]]

    return fake, calls


@pytest.mark.parametrize("second, suspect", [([FROZEN, VARIED], [True, False]), ([STEADY, VARIED], [False, False])])
def test_time_torch_times_implausible_readings_again_once_and_marks_them(monkeypatch, second, suspect):
    fake, calls = _blocks([FROZEN, VARIED], second)
    monkeypatch.setattr(measure, "_time_blocks", fake)
    conv = nn.Conv2d(3, 4, 3)
    timings = measure.time_torch([conv, conv], (torch.randn(1, 3, 8, 8),), threads=1, min_run_time=0.01)
    assert len(calls) == 2
    assert [t.suspect for t in timings] == suspect
    assert timings[0].median_ms == statistics.median(second[0])  # the second run's figures are kept


def test_plausible_readings_are_timed_once(monkeypatch):
    fake, calls = _blocks([STEADY, VARIED])
    monkeypatch.setattr(measure, "_time_blocks", fake)
    conv = nn.Conv2d(3, 4, 3)
    timings = measure.time_torch([conv, conv], (torch.randn(1, 3, 8, 8),), threads=1, min_run_time=0.01)
    assert len(calls) == 1 and not any(t.suspect for t in timings)


def test_time_onnxruntime_marks_readings_implausible_twice(monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime")
    conv, x = nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    path = tmp_path / "c.onnx"
    measure.export_onnx(conv, (x,), path)
    fake, calls = _blocks([FROZEN, VARIED], [FROZEN, VARIED])
    monkeypatch.setattr(measure, "_ort_turns", fake)
    timings = measure.time_onnxruntime([path, path], (x,), threads=1, min_run_time=0.01)
    assert len(calls) == 2 and [t.suspect for t in timings] == [True, False]
    fake, calls = _blocks([FROZEN, VARIED], [FROZEN, VARIED])
    monkeypatch.setattr(measure, "_time_blocks", fake)  # spinning off: interleaved block by block
    timings = measure.time_onnxruntime([path, path], (x,), threads=1, min_run_time=0.01, spinning=False)
    assert len(calls) == 2 and [t.suspect for t in timings] == [True, False]


def test_real_timings_run_and_carry_the_flag():
    conv = nn.Conv2d(3, 4, 3)
    t = measure.time_torch(conv, (torch.randn(2, 3, 8, 8),), threads=1, min_run_time=0.01, warmup=1)
    assert isinstance(t.suspect, bool) and t.median_ms > 0 and t.blocks >= 7
