"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def cp_sweeps(monkeypatch) -> list:
    """The ``max_iter`` of every CP decomposition made while the test runs, in order."""
    import separify.core.decompose as dec

    seen: list = []
    real = dec.cp_decompose

    def recording(*args, **kwargs):
        seen.append(kwargs["max_iter"])
        return real(*args, **kwargs)

    monkeypatch.setattr(dec, "cp_decompose", recording)
    return seen


@pytest.fixture
def few_held_samples(monkeypatch) -> None:
    """Fine-tuning's first batches hold 8 samples instead of 256 (but still at least 4 batches): the tests of what
    the held-out batches do run on small data."""
    import separify.tuning.finetune as ft

    monkeypatch.setattr(ft, "HELD_SAMPLES", 8)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "default_objective: run with the library's default objective (latency, "
                                       "timing on the target) instead of the FLOPs objective the other tests use")


@pytest.fixture(autouse=True, scope="session")
def _flops_objective_by_default():
    """Most tests check the decomposition, calibration and bookkeeping, which do not depend on this machine's
    speed: they run under the FLOPs objective (module-scoped fixtures included), so that nothing they assert depends
    on a timing. Tests of the default behaviour (timing on the target, never slower) are marked
    ``default_objective`` and use injected timers where they assert on a choice."""
    import separify.config

    saved, separify.config.DEFAULT_OBJECTIVE = separify.config.DEFAULT_OBJECTIVE, "flops"
    yield
    separify.config.DEFAULT_OBJECTIVE = saved


@pytest.fixture(autouse=True)
def _default_objective_when_marked(request, monkeypatch) -> None:
    if request.node.get_closest_marker("default_objective") is not None:
        import separify.config

        monkeypatch.setattr(separify.config, "DEFAULT_OBJECTIVE", "latency")
