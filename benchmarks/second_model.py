"""A second, real pretrained CNN for separify benchmarks: the ddddocr "beta" text recogniser (CRNN-style).

Model
    ``common.onnx`` from the PyPI wheel ``ddddocr`` 1.6.1 (MIT licence, https://github.com/sml2h3/ddddocr; the
    weight file is inside the wheel, nothing is downloaded at run time). It is the float32 OCR model that
    ``ddddocr.DdddOcr(beta=True)`` uses: a captcha/text-line recogniser with a Fused-MBConv (EfficientNetV2-style)
    backbone of 21 convs, 11 of them dense 3×3 with groups=1 (1→24 stem, 2× 24→24, 24→96 /2, 3× 48→192 and one
    48→192 /2, 3× 64→256), SiLU activations and residual adds, followed by a bidirectional LSTM (hidden 512) and a
    linear layer over 8210 classes (CTC blank = index 0, then ``CHARSET_BETA`` from ``ddddocr/charsets.py``).
    Input: (N, 1, 64, W) grayscale in [0, 1] (ddddocr divides uint8 pixels by 255; white background ≈ 1.0).
    Output here: (N, W/8, 8210) logits, batch first.

    (The wheel's other recogniser, ``common_old.onnx``, is dynamically quantised — ``ConvInteger`` — and so has no
    float ``Conv`` layers to convert; ``common_det.onnx`` is a detector.)

How it becomes a torch module
    The backbone (ONNX graph ``input1`` → tensor ``208``) is cut out with ``onnx.utils.Extractor`` and converted by
    ``onnx2torch`` 1.5.15 (Apache-2.0) into a ``torch.fx.GraphModule`` whose convs are plain ``torch.nn.Conv2d``.
    onnx2torch has no converter for the ONNX ``LSTM`` op, so the head is written here in PyTorch (``nn.LSTM`` +
    ``nn.Linear``) and loaded from the ONNX initializers (gate order i,o,f,c → PyTorch's i,f,g,o; input and
    recurrent biases kept separate). ``check_against_onnxruntime()`` compares the result with onnxruntime on the
    original file (max |Δlogit| over 8 eval images: 1.8e-5 on the development machine).

Evaluation data (generated, deterministic)
    Captcha-like text lines rendered with PIL (Pillow) using the six fonts of Debian's ``fonts-dejavu-core``
    (DejaVu Sans / Sans Bold / Sans Mono / Sans Mono Bold / Serif / Serif Bold, from /usr/share/fonts/truetype/dejavu
    or found by ``fc-match``). Each string is 4-6 characters from ``ALPHABET`` (lower-case letters and digits
    without the look-alikes 0/o, 1/l/i), with no two equal neighbours (the model's 8-pixel CTC stride cannot always
    emit doubled letters of a tightly set word). Random font, size, position, ink and background grey levels,
    pixel noise and two thin random lines; fixed 64×192 canvas so that batches can be stacked. The eval set uses
    ``numpy.random.default_rng(EVAL_SEED)``; the calibration set uses a different seed and excludes every eval
    string.

Metric
    Word accuracy: greedy CTC decoding (argmax over all 8210 classes per time step, merge repeats, drop blanks),
    lower-cased, exact match against the rendered string. ``evaluate(model, n)`` uses the first ``n`` strings of
    the fixed eval stream, so ``n=500`` is always the same 500 images.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import nn

import separify

NAME = "ddddocr common.onnx (beta OCR: Fused-MBConv backbone + BiLSTM + CTC), backbone via onnx2torch"
METRIC = ("case-insensitive word accuracy (greedy CTC) on 500 captcha-like 4-6 character strings rendered "
          "with the DejaVu core fonts (64x192 grayscale, seeded)")
# pip packages, then apt packages ("apt:" prefix). ddddocr is only used for its data files (common.onnx,
# charsets.py); `pip install --no-deps ddddocr==1.6.1` avoids pulling in opencv-python-headless.
REQUIREMENTS = ["ddddocr==1.6.1", "onnx2torch==1.5.15", "onnx", "onnxruntime", "Pillow", "apt:fonts-dejavu-core"]

ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
HEIGHT, WIDTH = 64, 192
EVAL_SEED = 20240611
CALIB_SEED = 777
BATCH = 50
FONT_FILES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
              "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"]
_BACKBONE_OUT = "208"  # last tensor before the Transpose that feeds the LSTM


# ----------------------------------------------------------------------------------------------- files

def _ddddocr_dir() -> Path:
    """The installed ddddocr package directory, found without importing ddddocr (which imports OpenCV)."""
    spec = importlib.util.find_spec("ddddocr")
    if spec is None or spec.origin is None:
        raise RuntimeError("ddddocr is not installed: pip install --no-deps ddddocr==1.6.1")
    return Path(spec.origin).parent


@functools.lru_cache(maxsize=1)
def charset() -> list[str]:
    """``CHARSET_BETA`` from ddddocr/charsets.py (read with ast, not imported); index 0 is the CTC blank ''."""
    tree = ast.parse((_ddddocr_dir() / "charsets.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CHARSET_BETA" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("CHARSET_BETA not found in ddddocr/charsets.py")


@functools.lru_cache(maxsize=1)
def _font_dir() -> Path:
    for d in (Path("/usr/share/fonts/truetype/dejavu"),):
        if all((d / f).is_file() for f in FONT_FILES):
            return d
    if shutil.which("fc-match"):
        out = subprocess.run(["fc-match", "-f", "%{file}", "DejaVu Sans"], capture_output=True, text=True)
        d = Path(out.stdout.strip()).parent
        if all((d / f).is_file() for f in FONT_FILES):
            return d
    raise RuntimeError("DejaVu fonts not found: apt-get install fonts-dejavu-core")


# ----------------------------------------------------------------------------------------------- model

class _CTCHead(nn.Module):
    """(N, C, H, W) features → (N, W, classes) logits: columns become time steps, BiLSTM, linear."""

    def __init__(self, in_features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_features, hidden, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        n, c, h, w = f.shape
        seq = f.permute(3, 0, 1, 2).reshape(w, n, c * h)  # ONNX: Transpose(3,0,1,2) + Reshape(W, N, C*H)
        y, _ = self.lstm(seq)  # (T, N, 2*hidden), forward half first as in ONNX's (T, 2, N, H) → (T, N, 2H)
        return self.fc(y).transpose(0, 1)  # (N, T, classes)


class DdddOcrBeta(nn.Module):
    def __init__(self, backbone: nn.Module, head: _CTCHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _onnx_gates_to_torch(w: np.ndarray, hidden: int) -> np.ndarray:
    i, o, f, c = (w[k * hidden:(k + 1) * hidden] for k in range(4))  # ONNX order i, o, f, c
    return np.concatenate([i, f, c, o], axis=0)  # PyTorch order i, f, g(=c), o


def _backbone_proto(full):
    """The ONNX graph from ``input1`` up to tensor ``208`` (every node before the head's Transpose)."""
    import onnx

    nodes = []
    for node in full.graph.node:
        nodes.append(node)
        if _BACKBONE_OUT in node.output:
            break
    else:
        raise RuntimeError(f"tensor {_BACKBONE_OUT} not produced in common.onnx")
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(
        nodes, "ddddocr_beta_backbone", [i for i in full.graph.input if i.name == "input1"],
        [onnx.helper.make_tensor_value_info(_BACKBONE_OUT, onnx.TensorProto.FLOAT, ["N", 64, 8, "W"])],
        initializer=[t for t in full.graph.initializer if t.name in used])
    proto = onnx.helper.make_model(graph, opset_imports=list(full.opset_import))
    proto.ir_version = full.ir_version
    onnx.checker.check_model(proto)
    return proto


def load_model() -> nn.Module:
    """The recogniser as a float32 CPU module in eval mode (a fresh copy on every call)."""
    import onnx
    from onnx import numpy_helper
    from onnx2torch import convert

    path = _ddddocr_dir() / "common.onnx"
    full = onnx.load(str(path))
    backbone = convert(_backbone_proto(full))

    inits = {t.name: np.array(numpy_helper.to_array(t)) for t in full.graph.initializer}  # writable copies
    lstm_node = next(n for n in full.graph.node if n.op_type == "LSTM")
    gemm_node = next(n for n in full.graph.node if n.op_type == "Gemm")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lstm_node.attribute}
    assert attrs.get("direction") == b"bidirectional", attrs
    assert set(attrs) <= {"direction", "hidden_size"}, attrs  # default activations, no clip, no input_forget
    assert lstm_node.input[4] == "", "sequence_lens must be absent"
    hidden = int(attrs["hidden_size"])
    w, r, b = (inits[lstm_node.input[k]] for k in (1, 2, 3))  # (2, 4H, In), (2, 4H, H), (2, 8H)
    fc_w, fc_b = inits[gemm_node.input[1]], inits[gemm_node.input[2]]
    gemm_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm_node.attribute}
    assert gemm_attrs.get("transB") == 1 and gemm_attrs.get("alpha", 1.0) == 1.0, gemm_attrs

    head = _CTCHead(w.shape[2], hidden, fc_w.shape[0])
    with torch.no_grad():
        for d, suffix in ((0, ""), (1, "_reverse")):
            getattr(head.lstm, "weight_ih_l0" + suffix).copy_(torch.from_numpy(_onnx_gates_to_torch(w[d], hidden)))
            getattr(head.lstm, "weight_hh_l0" + suffix).copy_(torch.from_numpy(_onnx_gates_to_torch(r[d], hidden)))
            getattr(head.lstm, "bias_ih_l0" + suffix).copy_(
                torch.from_numpy(_onnx_gates_to_torch(b[d, :4 * hidden], hidden)))
            getattr(head.lstm, "bias_hh_l0" + suffix).copy_(
                torch.from_numpy(_onnx_gates_to_torch(b[d, 4 * hidden:], hidden)))
        head.fc.weight.copy_(torch.from_numpy(fc_w))
        head.fc.bias.copy_(torch.from_numpy(fc_b))
    return DdddOcrBeta(backbone, head).float().eval()


def check_against_onnxruntime(model: nn.Module | None = None, n: int = 8) -> float:
    """Max |torch − onnxruntime| over the logits of ``n`` eval images (batch 1, as the ONNX file declares)."""
    import onnxruntime as ort

    model = load_model() if model is None else model
    ort.set_default_logger_severity(3)  # the file declares its output as (1, T); it is (T, 1, classes): silence that
    sess = ort.InferenceSession(str(_ddddocr_dir() / "common.onnx"), providers=["CPUExecutionProvider"])
    x, _ = _dataset(EVAL_SEED, n)
    worst = 0.0
    with torch.no_grad():
        for k in range(n):
            ref = sess.run(None, {"input1": x[k:k + 1].numpy()})[0]  # (T, 1, classes)
            got = model(x[k:k + 1])[0].numpy()  # (T, classes)
            worst = max(worst, float(np.abs(ref[:, 0, :] - got).max()))
    return worst


# ----------------------------------------------------------------------------------------------- data

def _random_string(rng: np.random.Generator) -> str:
    length = int(rng.integers(4, 7))
    out: list[str] = []
    while len(out) < length:
        ch = ALPHABET[int(rng.integers(len(ALPHABET)))]
        if not out or out[-1] != ch:
            out.append(ch)
    return "".join(out)


def _render(text: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font_path = _font_dir() / FONT_FILES[int(rng.integers(len(FONT_FILES)))]
    size = int(rng.integers(30, 43))
    font = ImageFont.truetype(str(font_path), size)
    bg = int(rng.integers(200, 256))
    ink = int(rng.integers(0, 90))
    img = Image.new("L", (WIDTH, HEIGHT), bg)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    if tw > WIDTH - 8:  # shrink to fit the fixed canvas
        font = ImageFont.truetype(str(font_path), max(12, int(size * (WIDTH - 8) / tw)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
    x0 = int(rng.integers(2, max(3, WIDTH - tw - 2))) - left
    y0 = int(rng.integers(2, max(3, HEIGHT - th - 2))) - top
    draw.text((x0, y0), text, font=font, fill=ink)
    for _ in range(2):  # two thin distractor lines
        pts = [(int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))) for _ in range(2)]
        draw.line(pts, fill=int(rng.integers(60, 180)), width=1)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, 12.0, arr.shape).astype(np.float32)
    return np.clip(arr, 0.0, 255.0) / 255.0


def _dataset(seed: int, n: int, exclude: frozenset[str] = frozenset()) -> tuple[torch.Tensor, list[str]]:
    """Strings come from one generator and rendering randomness from another, so labels alone are cheap."""
    text_rng = np.random.default_rng([seed, 0])
    image_rng = np.random.default_rng([seed, 1])
    images, labels = [], []
    while len(labels) < n:
        text = _random_string(text_rng)
        if text in exclude:
            continue
        images.append(_render(text, image_rng))
        labels.append(text)
    return torch.from_numpy(np.stack(images)[:, None]), labels


def _labels(seed: int, n: int) -> frozenset[str]:
    rng = np.random.default_rng([seed, 0])
    return frozenset(_random_string(rng) for _ in range(n))


@functools.lru_cache(maxsize=4)
def eval_set(n: int = 500) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The first ``n`` images/labels of the fixed eval stream, shape (n, 1, 64, 192), values in [0, 1]."""
    x, y = _dataset(EVAL_SEED, n)
    return x, tuple(y)


def example_input() -> torch.Tensor:
    return eval_set(1)[0].clone()


def calibration_set(n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` images and their strings from another seed; strings among the first 10,000 eval strings are skipped."""
    return _dataset(CALIB_SEED, n, _labels(EVAL_SEED, 10_000))


def calibration_inputs(n: int) -> torch.Tensor:
    """The images of :func:`calibration_set`."""
    return calibration_set(n)[0]


def ctc_targets(strings: list[str]) -> torch.Tensor:
    """CTC targets ``(B, S)``: each string's charset indices, padded with the blank (0)."""
    index = {c: i for i, c in enumerate(charset())}
    out = torch.zeros(len(strings), max(len(t) for t in strings), dtype=torch.long)
    for row, text in enumerate(strings):
        out[row, : len(text)] = torch.tensor([index[c] for c in text])
    return out


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CTC loss of ``(B, T, classes)`` logits against :func:`ctc_targets` (blank 0), summed over each string and
    averaged over the batch: :func:`separify.ctc_loss`."""
    return separify.ctc_loss(logits, targets, blank=0)


# ----------------------------------------------------------------------------------------------- metric

def decode(logits: torch.Tensor) -> list[str]:
    """Greedy CTC over (N, T, classes): argmax, merge repeats, drop blank (0); lower-cased."""
    cs = charset()
    out = []
    for row in logits.argmax(-1).tolist():
        chars, prev = [], None
        for idx in row:
            if idx != prev and idx != 0:
                chars.append(cs[idx] if idx < len(cs) else "?")
            prev = idx
        out.append("".join(chars).lower())
    return out


def word_accuracy(model: nn.Module, x: torch.Tensor, labels) -> float:
    """The fraction of images ``x`` whose greedy decoding by ``model`` (eval mode) is their string in ``labels``."""
    model.eval()
    hits = 0
    with torch.no_grad():
        for k in range(0, len(x), BATCH):
            preds = decode(model(x[k:k + BATCH]))
            hits += sum(p == t for p, t in zip(preds, labels[k:k + BATCH]))
    return hits / len(x)


def evaluate(model: nn.Module, n: int = 500) -> float:
    """Word accuracy of ``model`` on the first ``n`` eval strings (see METRIC)."""
    x, labels = eval_set(n)
    return word_accuracy(model, x, labels)


if __name__ == "__main__":
    import time

    m = load_model()
    print(NAME)
    print("max |torch - onnxruntime| logit difference:", check_against_onnxruntime(m))
    t = time.perf_counter()
    acc = evaluate(m)
    print(f"{METRIC}: {acc:.4f}  ({time.perf_counter() - t:.1f} s incl. rendering)")
    t = time.perf_counter()
    acc = evaluate(m)
    print(f"again (images cached): {acc:.4f}  ({time.perf_counter() - t:.1f} s)")

