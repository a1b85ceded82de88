"""``separify convert``: a round trip for every input format, and every bad input gives one clear error, a non-zero
exit, and leaves the input file byte-identical; ``--config FILE`` with options that override it; the help (panels,
examples, flags, defaults) at 80 and 120 columns."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import separify
from separify.cli import app
from separify.io.embedded import FashionResNet, load_default_model

ARCH = "separify.io.embedded:FashionResNet"
SHAPE = "1,1,28,28"
runner = CliRunner()


def _run(*args: str, timing: bool = False):
    """``separify convert ARGS``; the report's timings are off unless ``timing`` (test_report covers them)."""
    extra = [] if timing else ["--no-timing", "--no-layers"]
    return runner.invoke(app, ["convert", *map(str, args), *extra])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    model = load_default_model()
    x = torch.randn(1, 1, 28, 28)
    out = {"state": d / "state.pt", "pickle": d / "whole.pt", "pt2": d / "model.pt2"}
    torch.save(model.state_dict(), out["state"])
    torch.save(model, out["pickle"])
    torch.export.save(torch.export.export(model, (x,)), out["pt2"])
    return out


def _check_converted(path: Path, reference: nn.Module, max_rel: float = 0.5, batch: int = 3) -> None:
    x = torch.randn(batch, 1, 28, 28)
    if path.suffix == ".pt2":
        model = torch.export.load(str(path)).module()
    else:
        model = torch.load(path, weights_only=False)
    n_sep = sum(type(m).__name__ in ("DwPwConv2d", "PwDwPwConv2d") for m in model.modules()) if path.suffix != ".pt2" \
        else None
    with torch.no_grad():
        ref, out = reference(x), model(x)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < max_rel
    if n_sep is not None:
        assert n_sep > 0


@pytest.mark.parametrize("kind, extra, suffix", [
    ("pt2", [], ".pt2"),
    ("state", ["--arch", ARCH, "--input-shape", SHAPE], ".pt2"),
    ("state", ["--arch", ARCH, "--input-shape", SHAPE], ".pt"),
    ("pickle", ["--allow-pickle", "--input-shape", SHAPE], ".pt2"),
    ("pickle", ["--allow-pickle", "--input-shape", SHAPE], ".pth"),
], ids=["pt2-to-pt2", "state-dict-to-pt2", "state-dict-to-pt", "pickle-to-pt2", "pickle-to-pth"])
def test_round_trip(files, tmp_path, kind, extra, suffix):
    src = files[kind]
    digest = _digest(src)
    out = tmp_path / f"converted{suffix}"
    res = _run(src, "-o", out, "--method", "pw-dw-pw", "--flops", "0.5", *extra)
    assert res.exit_code == 0, res.output
    assert "Whole model" in res.stdout and "converted via fx" in res.stdout
    assert "layer1.conv1" in res.stdout  # the per-layer table names the layers
    assert _digest(src) == digest
    # a .pt2 exported at batch 1 stays static; from a module, the batch dimension of a .pt2 output is dynamic
    _check_converted(out, load_default_model(), batch=1 if kind == "pt2" else 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _run("--method", "pw-dw-pw")
    assert res.exit_code == 0, res.output
    assert "top-1 accuracy (1000 held-out" in res.stdout
    assert (tmp_path / "fashion_separable.pt2").is_file()
    _check_converted(tmp_path / "fashion_separable.pt2", load_default_model())
    res = _run("--method", "pw-dw-pw")  # a second run must not overwrite silently
    assert res.exit_code == 1 and "exists; pass --force" in res.stderr


def test_console_script_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("separify")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "separify.cli"]
    proc = subprocess.run([*cmd, "convert", "/nonexistent/model.pt2", "-o", str(tmp_path / "o.pt2")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: /nonexistent/model.pt2: no such file"]
    assert "Traceback" not in proc.stderr + proc.stdout


def _bad(files_or_path, *args, match: str, code: int = 1):
    res = _run(*args)
    assert res.exit_code == code, res.output
    text = res.stderr if code == 1 else res.output
    assert match in text, text
    assert "Traceback" not in res.output
    return res


def test_missing_file_and_directory(tmp_path):
    _bad(None, tmp_path / "nope.pt2", "-o", tmp_path / "o.pt2", match="no such file")
    _bad(None, tmp_path, "-o", tmp_path / "o.pt2", match="is a directory")


def test_truncated_and_unknown_files(files, tmp_path):
    for kind in ("pt2", "state"):
        cut = tmp_path / f"cut_{kind}{files[kind].suffix}"
        data = files[kind].read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        digest = _digest(cut)
        _bad(None, cut, "-o", tmp_path / "o.pt2", "--arch", ARCH, match="corrupt or truncated")
        assert _digest(cut) == digest
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, this is not a model")
    _bad(None, junk, "-o", tmp_path / "o.pt2", match="unknown format")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _bad(None, empty, "-o", tmp_path / "o.pt2", match="empty file")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x04test")
    _bad(None, onnx, "-o", tmp_path / "o.onnx", match="is not an ONNX model")
    _bad(None, onnx, "-o", tmp_path / "o.pt2", match="written as ONNX")


def test_pt2_input_needs_pt2_output(files, tmp_path):
    _bad(None, files["pt2"], "-o", tmp_path / "o.pt", match="can only be written as .pt2")


def test_pickle_needs_opt_in(files, tmp_path):
    digest = _digest(files["pickle"])
    res = _bad(None, files["pickle"], "-o", tmp_path / "o.pt2", match="--allow-pickle")
    assert "runs code" in res.stderr
    assert _digest(files["pickle"]) == digest and not (tmp_path / "o.pt2").exists()


def test_state_dict_needs_matching_arch(files, tmp_path):
    src, out = files["state"], tmp_path / "o.pt2"
    _bad(None, src, "-o", out, match="pass --arch")
    _bad(None, src, "-o", out, "--arch", "no_such_package_xyz:net", match="cannot import 'no_such_package_xyz'")
    _bad(None, src, "-o", out, "--arch", "separify.io.embedded:NoSuchNet", match="has no attribute 'NoSuchNet'")
    _bad(None, src, "-o", out, "--arch", "separify.io.embedded", match="must look like")
    _bad(None, src, "-o", out, "--arch", "torchvision.models:resnet18", match="does not match --arch")
    assert not out.exists()


def test_arch_takes_literal_keyword_arguments(tmp_path):
    """A fine-tuned torchvision network with its own number of classes: the head does not match the default
    architecture, the message says how to pass arguments, and with them the state dict loads."""
    from separify.errors import ModelLoadError
    from separify.io.models import load_model

    torch.manual_seed(0)
    src = tmp_path / "net.pth"
    torch.save(FashionResNet(widths=(8, 16, 32), num_classes=3).state_dict(), src)
    _bad(None, src, "-o", tmp_path / "o.pt2", "--arch", ARCH, match=f"pass them: --arch '{ARCH}(num_classes=...)'")
    loaded = load_model(src, arch="separify.io.embedded:FashionResNet(widths=(8, 16, 32), num_classes=3)")
    assert loaded.model.fc.out_features == 3
    for bad, match in [("separify.io.embedded:FashionResNet(3)", "positional"),
                       ("separify.io.embedded:FashionResNet(num_classes=print('x'))", "keyword=literal"),
                       ("separify.io.embedded:FashionResNet(num_classes=3", "keyword=literal"),
                       ("separify.io.embedded:FashionResNet(**{'a': 1})", "keyword=literal"),
                       ("separify.io.embedded:FashionResNet(num_classes=3)(widths=1)", "keyword=literal")]:
        with pytest.raises(ModelLoadError, match=match):
            load_model(src, arch=bad)


@pytest.mark.parametrize("args, match, code", [
    (["--rank", "0"], "rank must be a positive integer", 1),
    (["--rank", "-3"], "rank must be a positive integer", 1),
    (["--rank", "1.5"], "Invalid value for '--rank'", 2),
    (["--energy", "0"], "energy must be a number in (0, 1]", 1),
    (["--energy", "1.2"], "energy must be a number in (0, 1]", 1),
    (["--flops", "0"], "the FLOPs target must be a number in (0, 1]", 1),
    (["--flops", "3"], "the FLOPs target must be a number in (0, 1]", 1),
    (["--rank", "2", "--flops", "0.5"], "give only one of", 1),
    (["--method", "tucker"], "unknown method", 1),
    (["--input-shape", "1,x,28"], "--input-shape must be positive integers", 1),
    (["--input-shape", "1,0,28"], "--input-shape must be positive integers", 1),
    (["--input-shape", "1,3,224,224"], "does not run on the example input", 1),
    (["--calib-steps", "10"], "--calib-steps needs --calib DATA", 1),
    (["--calib-steps", "-1", "--calib", "x.npy"], "calib_steps must be a non-negative integer", 1),
    (["--calib-als", "5"], "--calib-als needs --calib DATA", 1),
    (["--calib-als", "-1", "--calib", "x.npy"], "calib_als must be a non-negative integer", 1),
    (["--calib-loss", "mse"], "--calib-loss needs --calib DATA", 1),
    (["--calib-loss", "kl", "--calib", "x.npy"], "--calib-loss must be fisher, mse or off", 1),
    (["--calib-precision", "float32"], "--calib-precision needs --calib DATA", 1),
    (["--calib-precision", "float16", "--calib", "x.npy"], "--calib-precision must be auto, float32 or bfloat16", 1),
    (["--json", "report.txt"], "must end in .json", 1),
    (["--threads", "0"], "--threads must be a positive integer", 1),
    (["--report-batch-size", "0"], "batch size must be a positive integer", 1),
], ids=["rank0", "rank-neg", "rank-float", "energy0", "energy>1", "flops0", "flops>1", "two", "method", "shape-bad", "shape-zero",
        "shape-mismatch", "calib-steps-no-data", "calib-steps-neg", "calib-als-no-data", "calib-als-neg",
        "calib-loss-no-data", "calib-loss-bad", "calib-precision-no-data", "calib-precision-bad", "json-suffix",
        "threads0", "report-batch0"])
def test_bad_options(files, tmp_path, args, match, code):
    digest = _digest(files["pt2"])
    _bad(None, files["pt2"], "-o", tmp_path / "o.pt2", *args, match=match, code=code)
    assert _digest(files["pt2"]) == digest and not (tmp_path / "o.pt2").exists()


def test_exclusions_leaving_nothing_warn_but_succeed(files, tmp_path):
    res = _run(files["pt2"], "-o", tmp_path / "o.pt2", "--exclude", "*")
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stdout and "no layer was converted" in res.stdout
    assert "excluded by pattern '*'" in res.stdout


def test_model_without_convs(tmp_path):
    src = tmp_path / "mlp.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).state_dict(), src)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), src)
    _bad(None, src, "-o", tmp_path / "o.pt", "--allow-pickle", "--input-shape", "1,3,2,2", match="no Conv2d layers")
    assert not (tmp_path / "o.pt").exists()


def test_nan_weights(tmp_path):
    model = FashionResNet()
    with torch.no_grad():
        model.layer2.conv2.weight[0, 0, 1, 1] = float("nan")
    src = tmp_path / "nan.pt"
    torch.save(model.state_dict(), src)
    _bad(None, src, "-o", tmp_path / "o.pt2", "--arch", ARCH, "--input-shape", SHAPE,
         match="layer 'layer2.conv2': the conv weight contains 1 NaN or inf value(s)")


def test_output_checks(files, tmp_path, monkeypatch):
    src = files["pt2"]
    digest = _digest(src)
    _bad(None, src, "-o", src, "--force", match="is the input file")
    existing = tmp_path / "exists.pt2"
    existing.write_bytes(b"keep me")
    _bad(None, src, "-o", existing, match="exists; pass --force")
    assert existing.read_bytes() == b"keep me"
    _bad(None, src, "-o", tmp_path / "missing_dir" / "o.pt2", match="does not exist")
    _bad(None, src, "-o", tmp_path / "o.txt", match="use a .pt2")
    # root ignores permission bits, so make the folder look unwritable to the check itself
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr("separify.io.files.os.access",
                        lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    _bad(None, src, "-o", locked / "o.pt2", match="is not writable")
    assert _digest(src) == digest
    res = _run(src, "-o", existing, "--force", "--rank", "2")
    assert res.exit_code == 0 and existing.read_bytes() != b"keep me"


def test_failed_write_leaves_no_partial_output(files, tmp_path, monkeypatch):
    out = tmp_path / "o.pt"

    def boom(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("separify.io.models.torch.save", boom)
    res = _run(files["state"], "-o", out, "--rank", "2", "--arch", ARCH, "--input-shape", SHAPE)
    assert res.exit_code == 1 and "disk full" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_calibration_file(files, tmp_path):
    from separify.io.embedded import load_eval_data

    images, _ = load_eval_data(limit=64)
    calib = tmp_path / "calib.npy"
    import numpy as np

    np.save(calib, images.numpy())
    digest = _digest(calib)
    out = tmp_path / "o.pt2"
    res = _run(files["state"], "-o", out, "--arch", ARCH, "--input-shape", SHAPE, "--calib", calib,
               "--calib-limit", "32", "--flops", "0.3")
    assert res.exit_code == 0, res.output
    assert "Calibration data:" in res.stdout and "32 samples" in res.stdout and "→" in res.stdout
    assert _digest(calib) == digest and out.is_file()


def test_bad_calibration_files(files, tmp_path):
    import numpy as np

    src, out = files["state"], tmp_path / "o.pt2"
    common = ("-o", out, "--arch", ARCH, "--input-shape", SHAPE)
    _bad(None, src, *common, "--calib", tmp_path / "missing.npy", match="no such file")
    np.save(tmp_path / "u8.npy", np.zeros((4, 1, 28, 28), dtype=np.uint8))
    _bad(None, src, *common, "--calib", tmp_path / "u8.npy", match="floating point, normalised")
    np.save(tmp_path / "shape.npy", np.zeros((4, 3, 32, 32), dtype=np.float32))
    _bad(None, src, *common, "--calib", tmp_path / "shape.npy", match="does not fit the model")
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 28, 28), dtype=np.float32))
    _bad(None, src, *common, "--calib", tmp_path / "empty.npy", match="expected samples of shape")
    (tmp_path / "c.txt").write_text("1 2 3")
    _bad(None, src, *common, "--calib", tmp_path / "c.txt", match="must be a .npy, .npz or .pt")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    _bad(None, src, *common, "--calib", tmp_path / "bad.npy", match="cannot read")
    assert not out.exists()


def test_finetune_from_the_command_line(files, tmp_path, few_held_samples):
    import numpy as np

    from separify.io.embedded import load_eval_data

    images, labels = load_eval_data(limit=64)
    data = tmp_path / "tune.npz"
    np.savez(data, images=images.numpy(), labels=labels.numpy())
    out, ckpt = tmp_path / "o.pt2", tmp_path / "tune.ckpt"
    args = (files["state"], "-o", out, "--arch", ARCH, "--input-shape", SHAPE, "--flops", "0.3", "--finetune", data,
            "--steps", "3", "--finetune-batch-size", "16", "--checkpoint", ckpt)
    res = _run(*args)
    assert res.exit_code == 0, res.output
    assert "Fine-tuning on" in res.stdout and "with labels" in res.stdout and "fine-tuned 3 steps" in res.stdout
    assert out.is_file() and ckpt.is_file()
    res = _run(*args[:-2], "--force")  # no checkpoint: starts afresh
    assert res.exit_code == 0, res.output
    res = _run(*args[:-6], "--steps", "2", "--finetune-batch-size", "2", "--force")  # 32 batches: 4 held out
    assert res.exit_code == 0 and "4 batches held out for the check" in " ".join(res.stdout.split()), res.output
    _bad(None, files["state"], "-o", tmp_path / "x.pt2", "--arch", ARCH, "--input-shape", SHAPE, "--epochs", "2",
         match="need --finetune")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=images.numpy(), labels=np.arange(64) + 5)
    _bad(None, files["state"], "-o", tmp_path / "x.pt2", "--arch", ARCH, "--input-shape", SHAPE, "--finetune", bad,
         "--steps", "1", match="labels must be in [0, 9]")
    _bad(None, files["state"], "-o", tmp_path / "x.pt2", "--arch", ARCH, "--input-shape", SHAPE, "--finetune", data,
         "--steps", "1", "--temperature", "0", match="--temperature must be a positive number")


class _Recogniser(nn.Module):
    """A tiny CTC text recogniser: (N, 1, 16, W) images → (N, W/2, 6) logits, class 0 the blank."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        return self.head(self.body(x).mean(2).transpose(1, 2))  # (N, 16, W/2) → (N, W/2, 6)


def test_ctc_recogniser_from_the_command_line(tmp_path, monkeypatch):
    """``--ctc-blank``: fine-tuning data without labels is labelled by the original's greedy decodings and trained
    on their CTC loss over the last axis; the report scores the sequence accuracy on --data's padded targets."""
    import json

    import numpy as np

    import separify.tuning.finetune as tuning
    from separify.io.models import save_model

    torch.manual_seed(0)
    model, x = _Recogniser().eval(), torch.rand(48, 1, 16, 24)
    save_model(model, tmp_path / "ocr.pt2", (x[:2],))
    with torch.no_grad():
        logits = model(x)
    np.save(tmp_path / "tune.npy", x.numpy())
    np.savez(tmp_path / "eval.npz", images=x.numpy(), labels=separify.ctc_greedy_targets(logits).numpy())
    seen, real = {}, tuning.finetune
    monkeypatch.setattr(tuning, "finetune", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    common = (tmp_path / "ocr.pt2", "-o", tmp_path / "o.pt2", "--flops", "0.6", "--data", tmp_path / "eval.npz")
    res = _run(*common, "--ctc-blank", "0", "--finetune", tmp_path / "tune.npy", "--steps", "2",
               "--finetune-batch-size", "16", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "labelled by the original's greedy CTC decodings" in " ".join(res.stdout.split())
    assert seen["class_dim"] == -1 and seen["label_loss"].keywords == {"blank": 0}
    torch.testing.assert_close(seen["pseudo_labels"](logits), separify.ctc_greedy_targets(logits))
    rows = {q["metric"]: q for q in json.loads((tmp_path / "r.json").read_text())["quality"]}
    assert rows["sequence accuracy (greedy CTC)"]["original"]["value"] == 1.0
    res = runner.invoke(app, ["report", str(tmp_path / "ocr.pt2"), str(tmp_path / "o.pt2"), "--ctc-blank", "0",
                              "--data", str(tmp_path / "eval.npz"), "--no-timing", "--no-layers"])
    assert res.exit_code == 0 and "sequence accuracy (greedy CTC)" in res.stdout, res.output
    _bad(None, *common, "--ctc-blank", "0", "--class-dim", "1", match="--ctc-blank reads (B, T, C) logits")
    _bad(None, *common, "--ctc-blank", "-1", match="--ctc-blank must be a class index")
    _bad(None, *common, "--ctc-blank", "6", "--finetune", tmp_path / "tune.npy", "--steps", "1", "--force",
         match="the blank among the C classes")
    np.savez(tmp_path / "classes.npz", images=x.numpy(), labels=np.zeros(48, dtype=np.int64))
    _bad(None, *common[:-2], "--data", tmp_path / "classes.npz", "--ctc-blank", "0", "--force",
         match="labels must be integers of shape (48, S)")


def _image_folder(root: Path, classes=("bags", "shoes"), per_class: int = 4, size=(28, 28)) -> Path:
    import numpy as np
    from PIL import Image

    for c, name in enumerate(classes):
        for i in range(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(10 * c + i).integers(0, 256, size, dtype=np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")
    return root


def test_calibration_image_folder_embedded(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    folder = _image_folder(tmp_path / "imgs")
    res = _run("--calib", folder, "--calib-limit", "6", "--rank", "2", "--method", "dw-pw", "-o", "o.pt")
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("Calibration data:"))
    assert "6 images in 2 classes" in line and "centre crop 28×28" in line and "grayscale" in line
    assert "mean (0.286)" in line and "std (0.353)" in line  # the embedded model's statistics
    assert (tmp_path / "o.pt").is_file()


@pytest.mark.parametrize("check, want", [("label loss", "its loss on the labels of the 4 batches held out of "
                                                       "fine-tuning was 1.25, the fine-tuned one's 1.5"),
                                         ("agreement", "it agreed with the original on 90.0% of the samples of the 4 "
                                                       "batches held out of fine-tuning, the fine-tuned one on 80.0%")])
def test_the_kept_state_is_explained_by_the_score_the_check_used(check, want):
    from separify.cli._convert import kept_note

    scores = [(0, -1.25), (10, -1.5)] if check == "label loss" else [(0, 0.9), (10, 0.8)]
    res = separify.FinetuneResult(10, scores=scores, kept_step=0, held_out=4, check=check)
    assert kept_note(res) == want
    assert kept_note(separify.FinetuneResult(10, scores=scores, kept_step=10, held_out=4, check=check)) is None


def test_finetune_image_folder_and_options(files, tmp_path):
    pytest.importorskip("torchvision")
    folder = _image_folder(tmp_path / "imgs", size=(40, 36))
    out = tmp_path / "o.pt"
    res = _run(files["state"], "-o", out, "--arch", ARCH, "--input-shape", SHAPE, "--rank", "2", "--method", "dw-pw",
               "--finetune", folder, "--steps", "2", "--finetune-batch-size", "4", "--temperature", "1", "--image-size", "28", "--resize", "32",
               "--mean", "0.3", "--std", "0.35")
    assert res.exit_code == 0, res.output
    assert "Fine-tuning data:" in res.stdout and "8 images in 2 classes" in res.stdout
    assert "resize 32, centre crop 28×28" in res.stdout and "with labels" in res.stdout
    assert "fine-tuned 2 steps" in res.stdout and out.is_file()


def test_bad_image_folders(files, tmp_path):
    pytest.importorskip("torchvision")
    common = (files["state"], "-o", tmp_path / "o.pt2", "--arch", ARCH, "--input-shape", SHAPE, "--rank", "2",
              "--method", "dw-pw")
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _bad(None, *common, "--calib", empty, match="no image files (accepted extensions:")
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error:")
    corrupt = _image_folder(tmp_path / "corrupt", per_class=2)
    (corrupt / "shoes" / "1.png").write_bytes(b"garbage, not a png")
    res = _bad(None, *common, "--calib", corrupt, match="cannot read image shoes/1.png")
    assert len(res.stderr.strip().splitlines()) == 1
    many = _image_folder(tmp_path / "many", classes=[f"c{i:02d}" for i in range(11)], per_class=1)
    _bad(None, *common, "--finetune", many, match="has 11 class folders but the model has 10 outputs")
    good = _image_folder(tmp_path / "good", per_class=1)
    _bad(None, *common, "--calib", good, "--mean", "0.1,0.2", match="mean needs 1 value")
    _bad(None, *common, "--calib", good, "--image-size", "1,2,3", match="--image-size must be H,W")
    _bad(None, *common, "--resize", "32", match="apply to image folders")
    assert not (tmp_path / "o.pt2").exists()


def test_calibration_image_folder_rgb_model(tmp_path):
    pytest.importorskip("torchvision")
    import numpy as np
    from PIL import Image

    src = tmp_path / "rgb.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)), src)
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB").save(
            folder / f"{i}.jpg")
    res = _run(src, "-o", tmp_path / "o.pt", "--allow-pickle", "--input-shape", "1,3,16,16", "--rank", "2",
               "--calib", folder)
    assert res.exit_code == 0, res.output
    assert "3 images;" in res.stdout and "resize 16, centre crop 16×16, RGB, mean (0.485, 0.456, 0.406)" in res.stdout


def test_outputs_get_a_normal_file_mode(tmp_path):
    """Atomic writes go through a private temporary file; the result must not stay private (0600)."""
    from separify.io.files import atomic_write

    out = tmp_path / "r.json"
    atomic_write(out, lambda tmp: Path(tmp).write_text("{}"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


# --- separify convert --config FILE: the file's settings, overridden by the options given explicitly

def _config_used(monkeypatch, tmp_path, *args):
    """The ConvertConfig that ``separify convert ARGS`` (embedded model) passes to the conversion, which stops."""
    from separify.errors import SeparifyError

    seen = []

    def stop(model, cfg, **kwargs):
        seen.append(cfg)
        raise SeparifyError("stopped before converting")

    monkeypatch.setattr("separify.cli._convert.convert_model", stop)
    res = runner.invoke(app, ["convert", "-o", str(tmp_path / "o.pt2"), *map(str, args)])
    assert res.exit_code == 1 and "stopped before converting" in res.stderr, res.output
    return seen[0]


CONV_TOML = '[ranks]\nmethod = "dw-pw"\nflops = 0.3\n\n[calibration]\nlimit = 32\nsteps = 4\n'


def test_config_file_settings_and_overrides(tmp_path, monkeypatch):
    conf = tmp_path / "conv.toml"
    conf.write_text(CONV_TOML, encoding="utf-8")
    cfg = _config_used(monkeypatch, tmp_path, "--config", conf)
    assert (cfg.method, cfg.selection, cfg.ranks.flops) == ("dw-pw", "flops", 0.3)
    assert (cfg.calibration.limit, cfg.calibration.steps) == (32, 4)
    cfg = _config_used(monkeypatch, tmp_path, "--config", conf, "--flops", "0.4")
    assert (cfg.method, cfg.ranks.flops, cfg.calibration.limit) == ("dw-pw", 0.4, 32)
    cfg = _config_used(monkeypatch, tmp_path, "--config", conf, "--rank", "2", "-m", "pw-dw-pw")
    assert (cfg.method, cfg.selection, cfg.ranks.rank) == ("pw-dw-pw", "rank", 2)
    # given explicitly, an option wins even when it equals its default
    cfg = _config_used(monkeypatch, tmp_path, "--config", conf, "--calib-limit", "1000", "--method", "pw-dw-pw")
    assert (cfg.calibration.limit, cfg.method, cfg.calibration.steps) == (1000, "pw-dw-pw", 4)
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32))
    cfg = _config_used(monkeypatch, tmp_path, "--calib", tmp_path / "x.npy", "--calib-loss", "off")
    assert not cfg.calibration.loss_aware
    cfg = _config_used(monkeypatch, tmp_path, "--calib", tmp_path / "x.npy", "--calib-loss", "mse", "--class-dim", "1")
    assert (cfg.calibration.loss_aware, cfg.calibration.loss, cfg.calibration.class_dim) == (True, "mse", 1)
    cfg = _config_used(monkeypatch, tmp_path, "--calib", tmp_path / "x.npy", "--calib-precision", "float32")
    assert cfg.calibration.precision == "float32"
    cfg = _config_used(monkeypatch, tmp_path, "--calib", tmp_path / "x.npy", "--calib-seconds", "12.5")
    assert cfg.calibration.seconds == 12.5
    assert _config_used(monkeypatch, tmp_path, "--calib-seconds", "0").calibration.seconds is None  # no budget
    assert _config_used(monkeypatch, tmp_path, "--calib-class-dim", "2").calibration.class_dim == 2  # the old name
    _bad(None, "-o", tmp_path / "o.pt2", "--class-dim", "1", "--calib-class-dim", "1",
         match="give --class-dim or --calib-class-dim, not both")
    # without --config: the library's defaults
    from separify.config import ConvertConfig

    assert _config_used(monkeypatch, tmp_path) == ConvertConfig()


def test_config_file_latency_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SEPARIFY_CACHE_DIR", str(tmp_path / "cache"))
    conf = tmp_path / "lat.toml"
    conf.write_text('[latency]\nobjective = "latency"\nmargin = 0.2\n\n[latency.target]\nbackend = "cpu"\n'
                    'threads = 1\nbatch_size = 4\n', encoding="utf-8")
    cfg = _config_used(monkeypatch, tmp_path, "--config", conf, "--dtype", "bfloat16")
    assert cfg.objective == "latency" and cfg.latency.margin == 0.2
    assert (cfg.target.dtype, cfg.target.threads, cfg.target.batch_size) == ("bfloat16", 1, 4)
    cfg = _config_used(monkeypatch, tmp_path, "--config", conf, "--latency", "0.6", "--no-latency-cache")
    assert cfg.ranks.latency == 0.6 and cfg.latency.cache is False and cfg.target.threads == 1
    cfg = _config_used(monkeypatch, tmp_path, "--config", conf, "--objective", "flops")
    assert cfg.objective == "flops" and cfg.target is None
    # on the command line alone: --target implies the latency objective, --margin needs it
    cfg = _config_used(monkeypatch, tmp_path, "--target", "cpu", "--target-batch-size", "2", "--threads", "1")
    assert cfg.objective == "latency" and (cfg.target.batch_size, cfg.target.threads) == (2, 1)
    res = _run("-o", tmp_path / "x.pt2", "--margin", "0.05")
    assert res.exit_code == 1 and "--margin apply to --objective latency" in res.stderr


def test_config_file_end_to_end(files, tmp_path):
    import numpy as np

    from separify.io.embedded import load_eval_data

    images, _ = load_eval_data(limit=64)
    np.save(tmp_path / "calib.npy", images.numpy())
    conf = tmp_path / "conv.toml"
    conf.write_text(CONV_TOML.replace("steps = 4", "steps = 0"), encoding="utf-8")
    out = tmp_path / "o.pt"
    res = _run(files["state"], "-o", out, "--arch", ARCH, "--input-shape", SHAPE, "--calib", tmp_path / "calib.npy",
               "--config", conf)
    assert res.exit_code == 0, res.output
    assert "32 samples" in res.stdout and out.is_file()
    model = torch.load(out, weights_only=False)
    assert any(type(m).__name__ == "DwPwConv2d" for m in model.modules())  # the file's method


@pytest.mark.parametrize("text, match", [
    ("[ranks\nflops = 0.5\n", "is not valid TOML"),
    ("[ranks]\nflop = 0.5\n", "unknown key(s) in [ranks]: flop"),
    ("flop = 0.5\n", "unknown config key(s): flop"),
    ("[ranks]\nflops = 2\n", "the FLOPs target must be a number in (0, 1]"),
    (None, "does not exist"),
], ids=["syntax", "section-key", "top-key", "value", "missing"])
def test_bad_config_file(files, tmp_path, text, match):
    conf = tmp_path / "conv.toml"
    if text is not None:
        conf.write_text(text, encoding="utf-8")
    res = _run(files["pt2"], "-o", tmp_path / "o.pt2", "--config", conf)
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "o.pt2").exists()


# --- the help: panels, examples, flags, defaults

@functools.lru_cache(maxsize=None)
def _help(command: str, columns: int = 80) -> str:
    """``COLUMNS=columns separify COMMAND --help``, as a user's terminal shows it."""
    exe = Path(sys.executable).with_name("separify")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "separify.cli"]
    env = dict(os.environ, COLUMNS=str(columns), TERM="dumb", NO_COLOR="1")
    env.pop("TERMINAL_WIDTH", None)
    proc = subprocess.run([*cmd, command, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


PANELS = {
    "convert": ["What to convert", "Rank selection", "Calibration", "Latency", "Fine-tuning", "Report and output"],
    "report": ["What to measure", "Latency", "Report and output"],
    "compare": ["What to convert", "Rank selection", "Calibration", "Latency", "Report and output"],
}


def _panels(text: str) -> dict[str, str]:
    """Panel title → the text of its box."""
    out, title = {}, None
    for line in text.splitlines():
        if line.startswith("╭─ "):
            title = line[3:].split(" ─")[0]
            out[title] = ""
        elif title is not None:
            out[title] += line + "\n"
    return out


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", ["convert", "report", "compare"])
def test_help_renders_in_panels(command, columns):
    text = _help(command, columns)
    assert max(len(line) for line in text.splitlines()) <= columns
    assert "…" not in text  # nothing cut off, at 80 columns either
    titles = [line[3:].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
    assert titles == ["Arguments", "Options", *PANELS[command]]  # each panel once, in this order
    assert "<bool>" not in text


def test_convert_help_panels_hold_their_options():
    panels = _panels(_help("convert", 120))
    expect = {
        "What to convert": "--output -o --to --arch --allow-pickle --input-shape --exclude --fold-bn --config",
        "Rank selection": "--method --rank --energy --flops --cp-iters --seed",
        "Calibration": "--calib --calib-limit --calib-steps --calib-als --calib-precision --image-size --resize --mean "
                       "--std",
        "Latency": "--objective --target --latency --batch-size --dtype --channels-last --contiguous --margin "
                   "--latency-cache "
                   "--no-latency-cache --threads",
        "Fine-tuning": "--finetune --epochs --steps --lr --temperature --finetune-batch-size --checkpoint",
        "Report and output": "--data --data-limit --json --html --png --timing --onnx --layers --min-time "
                             "--report-batch-size --force",
    }
    import re

    for title, names in expect.items():
        first_column = {m for m in re.findall(r"^│ (\S+)", panels[title], re.M)}
        assert set(names.split()) - {"-o"} <= {n.split(",")[0] for n in first_column}, (title, first_column)


def test_convert_help_starts_with_examples():
    text = _help("convert", 80)
    head = text.split("╭")[0]
    assert "Examples:" in head
    for example in ("  separify convert      # the embedded model → fashion_separable.pt2",
                    "--arch 'torchvision.models:resnet18(num_classes=10)'", "--input-shape 1,3,224,224 --flops 0.5 "
                    "--calib images/", "separify convert model.onnx -o fast.onnx --objective latency --latency 0.6",
                    "--config conv.toml"):
        assert example in head, example


def test_flags_render_as_flags():
    import re

    text = _help("convert", 120)
    for flag, words in [("--force", "Replace output files"), ("--allow-pickle", "Allow loading"),
                        ("--channels-last", "Run the converted model"), ("--contiguous", "Run and time"), ("--no-latency-cache", "Time every candidate")]:
        assert re.search(rf"│ {flag} +{words}", text), flag  # no value type between the flag and its help
    assert re.search(r"│ --fold-bn +--no-fold-bn +Fold BatchNorm", text)
    assert re.search(r"│ --calib-limit +<int> +Use at most", text)  # options with values keep their type


def test_help_states_the_library_defaults():
    from separify.cli import DEFAULT_OUTPUT
    from separify.config import CP_SWEEPS, CP_SWEEPS_BEFORE_ALS, Calibration, LatencySettings, RankSelection

    text = " ".join(_help("convert", 250).split())
    assert f"Default for the embedded model: {DEFAULT_OUTPUT}" in text
    assert f"[default: {RankSelection().method}]" in text and f"Default {RankSelection().flops} when no" in text
    assert f"[default: {Calibration().limit}]" in text and f"[default: {Calibration().als}]" in text
    assert f"[default: {LatencySettings().margin}]" in text
    assert f"(default {CP_SWEEPS}, or {CP_SWEEPS_BEFORE_ALS} for layers" in text
