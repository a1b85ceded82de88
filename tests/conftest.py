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
