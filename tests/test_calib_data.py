"""Calibration data as real input pipelines yield it: samples of different sizes, DataLoaders of tuples or dicts,
files with one array per sample, image folders at native size; the same statistics as the samples fed one by one,
and the same fit on both backends."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import separify
from separify.calibration import as_batches, observe
from separify.calibration.reconstruct import last_input
from separify.calibration.refit import solve
from separify.errors import SeparifyError


class Recogniser(nn.Module):
    """A small fully convolutional text-line recogniser: any width in, (N, classes, W/2) out."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, (3, 5), padding=(1, 2)), nn.ReLU())
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        return self.head(self.body(x)).mean(2)


def _words(n: int = 12, seed: int = 0) -> list[torch.Tensor]:
    """Word images (1, 16, W) of different widths W, a few of them equal."""
    g = torch.Generator().manual_seed(seed)
    widths = [24, 40, 24, 56, 32, 40, 48, 24, 64, 36, 40, 28][:n]
    return [torch.rand(1, 16, w, generator=g) for w in widths]


@pytest.fixture(scope="module")
def recogniser():
    torch.manual_seed(0)
    return Recogniser().eval()


EXAMPLE = torch.rand(1, 1, 16, 48)


def _convert(model, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return separify.convert(model, example_inputs=EXAMPLE, objective="flops", calibration=data,
                                **{"rank": 3, **kw})


# ------------------------------------------------------------------------------------------- normalisation


def test_samples_of_different_sizes_are_grouped_by_shape():
    words = _words()
    batches = as_batches(words, ndim=4)
    assert [tuple(b.shape) for b in batches] == [(3, 1, 16, 24), (3, 1, 16, 40), (1, 1, 16, 56), (1, 1, 16, 32),
                                                 (1, 1, 16, 48), (1, 1, 16, 64), (1, 1, 16, 36), (1, 1, 16, 28)]
    flat = {tuple(w.shape): [] for w in words}
    for w in words:
        flat[tuple(w.shape)].append(w)
    for b in batches:
        torch.testing.assert_close(b, torch.stack(flat[tuple(b.shape[1:])]), rtol=0, atol=0)


def test_loaders_of_tuples_and_dicts_and_generators():
    x = torch.randn(20, 1, 16, 32)
    pairs = DataLoader(list(zip(x, torch.zeros(20, dtype=torch.long))), batch_size=8)
    assert torch.equal(torch.cat(as_batches(pairs, ndim=4)), x)
    dicts = DataLoader([{"pixels": s, "mask": torch.ones(3), "label": 0} for s in x], batch_size=6)
    assert torch.equal(torch.cat(as_batches(dicts, ndim=4, input_key="pixels")), x)
    with pytest.raises(SeparifyError, match="cannot tell which entry.*input_key"):
        as_batches(dicts, ndim=4)
    one_float = [{"image": s, "label": 1} for s in x]
    assert torch.equal(torch.cat(as_batches(one_float, ndim=4)), x)
    with pytest.raises(SeparifyError, match="no key 'img'"):
        as_batches(one_float, ndim=4, input_key="img")
    read = []

    def stream():  # an endless stream: only what the limit needs is read
        while True:
            read.append(1)
            yield torch.randn(4, 1, 16, 32)

    assert sum(len(b) for b in as_batches(stream(), limit=10, ndim=4)) == 10 and len(read) == 3
    assert torch.equal(torch.cat(as_batches([s.numpy() for s in x], ndim=4)), x)  # NumPy samples


@pytest.mark.parametrize("data, match", [
    ([], "empty"),
    (iter(()), "empty"),
    (["a", "b"], "must be tensors or arrays"),
    ([torch.randn(16, 32)], "rank 4 .a batch. or 3"),
    ([torch.zeros(1, 16, 32, dtype=torch.uint8)], "floating point"),
    (42, "must be a tensor, an array or an iterable"),
], ids=["empty-list", "empty-iterator", "strings", "wrong-rank", "integers", "a-number"])
def test_bad_calibration_data_gives_one_message(data, match):
    with pytest.raises(SeparifyError, match=match):
        as_batches(data, ndim=4)


def test_memory_bound_on_the_samples_is_enforced():
    with pytest.raises(SeparifyError, match="more than .* GB.*--calib-limit 3"):
        as_batches([torch.randn(1, 1, 64, 64) for _ in range(5)], ndim=4, max_bytes=3 * 64 * 64 * 4)


def test_a_channel_count_that_does_not_fit_is_refused(recogniser):
    with pytest.raises(SeparifyError, match=r"shape \(3, 16, 40\) per sample does not fit the model"):
        _convert(recogniser, [torch.rand(1, 16, 24), torch.rand(3, 16, 40)])


# ------------------------------------------------------------------------------- statistics and the refit


def test_observed_statistics_equal_the_samples_fed_one_by_one(recogniser):
    words = _words()
    layers = {"body.0": "body.0", "body.2": "body.2", "body.5": "body.5"}
    model = recogniser.double()
    try:
        grouped = observe(model, layers, [b.double() for b in as_batches(words, ndim=4)])
        single = observe(model, layers, [w.double()[None] for w in words])
    finally:
        recogniser.float()
    for name in layers:
        torch.testing.assert_close(grouped.covariances[name].channel, single.covariances[name].channel,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grouped.covariances[name].spatial, single.covariances[name].spatial,
                                   rtol=1e-12, atol=1e-12)
        assert grouped.pixels(name) == single.pixels(name) == sum(w.shape[-1] * 16 for w in words) // (
            4 if name == "body.5" else 1)


def test_refit_over_different_sizes_equals_the_fit_on_each_sample(recogniser):
    """One converted layer, no ALS: its last 1×1 conv fitted on all words of all widths at once equals the
    least-squares fit fed one word at a time."""
    words = _words()
    one = nn.Sequential(recogniser.body[0]).eval()
    cal = _convert(one, words, calib_als=0, calib_ridge=0.0, calib_steps=0)
    plain = _convert(one, None)
    mod = plain.model.get_submodule("0")
    zs = [last_input(mod, w[None]) for w in words]
    ys = [one(w[None]).detach() for w in words]
    solve(mod._last(), zs, ys, 0.0, "0")
    got = cal.model.get_submodule("0")._last()
    torch.testing.assert_close(got.weight.contiguous(), mod._last().weight.contiguous(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.bias, mod._last().bias, rtol=1e-4, atol=1e-5)


def test_dataloader_and_list_give_the_same_conversion(recogniser):
    words = [w for w in _words() if w.shape[-1] == 40]  # one width: batches from a DataLoader
    a = _convert(recogniser, words)
    b = _convert(recogniser, DataLoader([(w, 0) for w in words], batch_size=2))
    assert len(a.converted) == len(b.converted) == 3
    for ra, rb in zip(a.converted, b.converted):
        assert ra.calib_error_after == pytest.approx(rb.calib_error_after, rel=1e-5)


@pytest.fixture(scope="module")
def recogniser_onnx(recogniser, tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "rec.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(recogniser, (EXAMPLE,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n", 3: "w"}, "y": {0: "n", 2: "w2"}}, dynamo=False)
    return path


@pytest.mark.parametrize("method", ["dw-pw", "pw-dw-pw"])
def test_both_backends_fit_variable_sizes_alike(recogniser, recogniser_onnx, method):
    """The torch backend runs the shape groups side by side in one pass; the ONNX backend streams them layer by
    layer through onnxruntime. Same data, same fits (ALS on)."""
    words = _words()
    a = _convert(recogniser, words, method=method)
    b = _convert(str(recogniser_onnx), words, method=method)
    got = [(r.status, r.calib_error_before, r.calib_error_after) for r in a.layers]
    want = [(r.status, r.calib_error_before, r.calib_error_after) for r in b.layers]
    assert [g[0] for g in got] == [w[0] for w in want] == ["converted"] * 3 + ["skipped"]
    for g, w in zip(got[:3], want[:3]):
        assert g[1] == pytest.approx(w[1], rel=1e-3) and g[2] == pytest.approx(w[2], rel=1e-3)
        assert g[2] < g[1]
    x = torch.rand(2, 1, 16, 44)  # a width never seen in calibration
    assert torch.isfinite(a.model(x)).all()


def test_reconstruction_over_different_sizes(recogniser):
    res = _convert(recogniser, _words(), calib_steps=20)
    assert all(r.calib_error_after < r.calib_error_before for r in res.converted)


def _word_error(model, reference, words) -> float:
    with torch.no_grad():
        err = sum(float((model(w[None]) - reference(w[None])).square().sum()) for w in words)
        return err / sum(float(reference(w[None]).square().sum()) for w in words)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_output_reconstruction_over_different_sizes(recogniser, recogniser_onnx, backend):
    """48 words of 10 widths, one in 8 held out across the shape groups: the steps lower the output error on
    words never seen, through either backend (the ONNX graph's factors rewritten and run in onnxruntime)."""
    from separify.backends.onnx.graph import OrtModule

    words = [w for seed in range(4) for w in _words(seed=seed)]
    unseen = [w for seed in (10, 11) for w in _words(seed=seed)]
    model = recogniser if backend == "torch" else str(recogniser_onnx)
    off = _convert(model, words, method="dw-pw", rank=1, calib_output_steps=0)
    on = _convert(model, words, method="dw-pw", rank=1)
    assert on.output_fit.kept and on.output_fit.held == len(words) // 8
    run = (lambda r: r.model) if backend == "torch" else (lambda r: OrtModule(r.model))
    assert _word_error(run(on), recogniser, unseen) < 0.9 * _word_error(run(off), recogniser, unseen)


# ---------------------------------------------------------------------------------------------- files, CLI


def test_cli_npz_with_one_array_per_sample(recogniser_onnx, tmp_path):
    from typer.testing import CliRunner

    from separify.cli import app

    words = _words()
    np.savez(tmp_path / "words.npz", *[w.numpy() for w in words])
    np.savez(tmp_path / "keyed.npz", lines=np.stack([w.numpy() for w in words if w.shape[-1] == 24]),
             other=np.zeros(3, np.float32))
    run = CliRunner().invoke
    common = ["convert", str(recogniser_onnx), "--input-shape", "1,1,16,48", "--objective", "flops", "--rank", "3",
              "--no-timing", "--no-layers"]
    res = run(app, [*common, "-o", str(tmp_path / "a.onnx"), "--calib", str(tmp_path / "words.npz")])
    assert res.exit_code == 0, res.output
    assert "12 arrays of 8 shape(s)" in res.stdout
    res = run(app, [*common, "-o", str(tmp_path / "b.onnx"), "--calib", str(tmp_path / "keyed.npz"),
                    "--calib-key", "lines"])
    assert res.exit_code == 0, res.output
    assert "3 samples of shape (1, 16, 24)" in res.stdout
    res = run(app, [*common, "-o", str(tmp_path / "c.onnx"), "--calib", str(tmp_path / "keyed.npz"),
                    "--calib-key", "nope"])
    assert res.exit_code != 0 and "no array named 'nope'" in res.output and "Traceback" not in res.output
    res = run(app, [*common, "-o", str(tmp_path / "d.onnx"), "--calib-key", "lines"])
    assert res.exit_code != 0 and "--calib-key needs --calib" in res.output


def test_image_folder_at_native_size(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from separify.io.data import load_image_folder

    for i, (h, w) in enumerate([(16, 40), (16, 24), (16, 40)]):
        Image.fromarray((np.arange(h * w) % 255).astype(np.uint8).reshape(h, w)).save(tmp_path / f"{i}.png")
    images, labels, classes = load_image_folder(tmp_path, size=None, channels=1, mean=(0.5,), std=(0.5,))
    assert [tuple(x.shape) for x in images] == [(1, 16, 40), (1, 16, 24), (1, 16, 40)] and labels is None
    assert [tuple(b.shape) for b in as_batches(images, ndim=4)] == [(2, 1, 16, 40), (1, 1, 16, 24)]
    with pytest.raises(SeparifyError, match="not resized"):
        load_image_folder(tmp_path, size=None, channels=1, resize=32, mean=(0.5,), std=(0.5,))
