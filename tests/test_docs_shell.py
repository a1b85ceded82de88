"""The shell examples of the documentation run as written.

Every ``separify convert|report|compare`` command in a ```bash/sh/shell/console block of README.md and docs/*.md
(continuation lines joined, comments dropped, the ``separify ...`` part of ``a && b`` lines) runs in-process through
the typer app with its arguments as written, in a fresh temporary working directory that holds stand-ins for the
input files the commands name (:func:`make_stand_ins` says what each is). Each must exit 0 and write the outputs it
names (``-o/--output``, ``--json``, ``--html``, ``--png``): models that load (ONNX files pass the checker), a JSON
report valid against its schema, an HTML page. The test id is ``FILE:LINE`` of the command's first line.

The commands run under the library's default objective (timing on the target), as they do for a user, with one
torch thread (as test_docs runs the Python blocks) and a timing cache of this module's own, shared by its tests as a
user's cache would be. A command that reads a file an earlier command of its block wrote (docs/onnx.md: ``report``
of what ``convert`` wrote) gets that file. Shell variables (``"$OCR"``) are expanded by bash, after the block's
assignment lines before the command. ``pip install`` and ``python`` lines are not separify commands and are not run.

Skipped, each with its reason: ``--target cuda``/``--device cuda`` without a GPU; the docs/onnx.md OCR file without
``ddddocr`` (in the ``bench`` extras only); and, unless ``SEPARIFY_SLOW_DOCS=1``, the commands on the embedded model
or on ResNet-18 at 224², which take 40-150 s each on the 2-core development machine (the stand-ins cannot be made
smaller: the model is the embedded one or ``--arch torchvision.models:resnet18``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from test_docs import DOCS, ROOT, blocks

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
COMMANDS = ("convert", "report", "compare")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    ident: str          # FILE:LINE of the command's first line
    block: str          # FILE:LINE of the block's opening fence
    text: str           # the command as written, continuation lines joined
    assignments: tuple  # the block's shell assignments before it (NAME=...)


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line).strip()


def shell_commands() -> list[Command]:
    found = []
    for block_id, _, code in blocks(DOCS, SHELL_LANGUAGES):
        path, fence = block_id.rsplit(":", 1)
        lines = code.splitlines()
        assignments: list[str] = []
        i = 0
        while i < len(lines):
            first = i
            logical = lines[i]
            while logical.endswith("\\") and i + 1 < len(lines):
                i += 1
                logical = logical[:-1] + " " + lines[i].strip()
            i += 1
            logical = _strip_comment(logical)
            if not logical:
                continue
            if ASSIGNMENT.match(logical):
                assignments.append(logical)
                continue
            for part in re.split(r"&&|\|\||;|\|", logical):
                part = part.strip()
                words = part.split()
                if len(words) >= 2 and words[0] == "separify" and words[1] in COMMANDS:
                    line = int(fence) + 1 + first
                    found.append(Command(f"{path}:{line}", block_id, part, tuple(assignments)))
    return found


SHELL = shell_commands()


def argv(cmd: Command) -> list[str]:
    """The words after ``separify``, as the shell reads them."""
    if "$" not in cmd.text:
        return shlex.split(cmd.text)[1:]
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    script = "\n".join([*cmd.assignments, "set -- " + cmd.text, 'shift', 'printf "%s\\0" "$@"'])
    proc = subprocess.run(["bash", "-euc", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\0")[:-1]


def parsed(words: list[str]) -> dict:
    """The parameters the command's parser reads from ``words`` (the words after ``separify``)."""
    import typer.main

    from separify.cli import app

    command = typer.main.get_command(app).commands[words[0]]
    return command.make_context(words[0], list(words[1:]), resilient_parsing=True).params


def outputs(words: list[str]) -> list[str]:
    """The files the command names as its outputs (for ``convert`` without ``-o`` on the embedded model, the
    default)."""
    from separify.cli import DEFAULT_OUTPUT

    params = parsed(words)
    found = [str(params[p]) for p in ("output", "json_out", "html_out", "png_out") if params.get(p) is not None]
    if words[0] == "convert" and params.get("output") is None and params.get("model") is None:
        found.append(str(DEFAULT_OUTPUT))
    return found


SLOW = "SEPARIFY_SLOW_DOCS"


def skip_reason(cmd: Command) -> str | None:
    words = shlex.split(cmd.text)[1:]
    params = parsed(words)
    if "cuda" in (params.get("target"), params.get("device")):
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU (--target/--device cuda) and torch.cuda.is_available() is False"
    if "$OCR" in cmd.text and importlib.util.find_spec("ddddocr") is None:
        return "needs ddddocr (pip install -e '.[bench]') for its common.onnx"
    if os.environ.get(SLOW) != "1":
        if words[0] in ("convert", "compare") and params.get("model") is None:
            return (f"the embedded model: 40-150 s per command on the 2-core development machine (its 1,000 "
                    f"evaluation images, 64-256 channels); {SLOW}=1 runs it")
        if params.get("arch", "") and "resnet18" in params["arch"]:
            return f"ResNet-18 at 224²: 40-90 s per command on the 2-core development machine; {SLOW}=1 runs it"
    return None


def needs_earlier(cmd: Command) -> list[tuple[str, str]]:
    """``(name, id)`` of each file ``cmd`` reads that an earlier command of its block writes."""
    words = shlex.split(cmd.text)[1:]
    mine = set(outputs(words))
    found = []
    for other in SHELL:
        if other == cmd:
            break
        if other.block == cmd.block:
            found += [(name, other.ident) for name in outputs(shlex.split(other.text)[1:])
                      if name in words and name not in mine]
    return found


# --- stand-ins for the input files the commands name


def _config_toml() -> str:
    """The example config file of docs/cli.md, as written there."""
    for _, _, code in blocks([ROOT / "docs" / "cli.md"], {"toml"}):
        if code.startswith("# separify.toml"):
            return code
    raise AssertionError("docs/cli.md has no ```toml block starting '# separify.toml'")


def _save_images(folder: Path, images, names) -> None:
    from PIL import Image

    for img, name in zip(images, names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def _small_net():
    """A small random CNN with the layer names the example config file's rules use (``stem.*``, ``layer3.*``,
    ``layer4.*``): input (N, 3, 32, 32), 10 outputs."""
    from collections import OrderedDict

    from torch import nn

    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(OrderedDict(stem=block(3, 16), layer1=block(16, 32), layer2=block(32, 64, 2),
                                     layer3=block(64, 64), layer4=block(64, 64, 2), pool=nn.AdaptiveAvgPool2d(1),
                                     flatten=nn.Flatten(), fc=nn.Linear(64, 10))).eval()


def _ocr_stand_ins(d: Path) -> None:
    """``ocr.pt2`` (test_cli's small random CTC recogniser, class 0 the blank: input (N, 1, 16, 48), logits
    (N, 24, 6)), ``ocr_calib.npy``, ``ocr_tune.npy`` (no labels) and ``ocr_eval.npz`` (labels: the recogniser's own
    greedy decodings, padded with the blank)."""
    import numpy as np
    import torch
    from test_cli import _Recogniser

    import separify

    net, x = _Recogniser().eval(), torch.rand(96, 1, 16, 48)
    program = torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, d / "ocr.pt2")
    with torch.no_grad():
        targets = separify.ctc_greedy_targets(net(x[64:]))
    np.save(d / "ocr_calib.npy", x[:16].numpy())
    np.save(d / "ocr_tune.npy", x[:64].numpy())
    np.savez(d / "ocr_eval.npz", images=x[64:].numpy(), labels=targets.numpy())


def make_stand_ins(d: Path) -> Path:
    """Write into ``d`` stand-ins for the input files the examples name:

    * ``model.pt2``, ``model.onnx``, ``original.pt2``: a small random CNN (:func:`_small_net`), batch dynamic;
      ``converted.pt2`` a conversion of it (dw-pw, rank 2). The generic examples say nothing of the model, and the
      embedded model takes minutes through the timed commands and the ``--max-drop`` search on this machine.
    * ``calib.npy`` (unlabeled), ``held_out.npz``, ``val.npz`` (``images`` and ``labels``: the small CNN's own
      predictions, so that its top-1 accuracy is 1 and every drop is the conversion's).
    * ``resnet18.pt``: a state dict of torchvision's ResNet-18 with random weights, as ``--arch
      torchvision.models:resnet18`` needs; ``calib_images/``: a flat folder of 4 small random RGB images.
    * ``calib/`` (flat) and ``tune/`` (one subfolder per class, named as examples/cli_embedded.sh names them): PNG
      files of the embedded model's shipped held-out Fashion-MNIST images, 16 and 64 of them.
    * ``separify.toml``: the example config file of docs/cli.md, as written there.
    * ``ocr.pt2`` and its data files: :func:`_ocr_stand_ins`.
    """
    import numpy as np
    import torch
    import torchvision

    import separify
    from separify.io.embedded import CLASSES, EVAL_FILE

    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    net = _small_net()
    x = torch.randn(264, 3, 32, 32)
    with torch.no_grad():
        y = net(x).argmax(1).numpy()
    batch = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
    program = torch.export.export(net, (x[:2],), **batch)
    torch.export.save(program, d / "model.pt2")
    torch.export.save(program, d / "original.pt2")
    torch.onnx.export(net, (x[:1],), str(d / "model.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    converted = separify.convert(net, example_inputs=x[:1], method="dw-pw", rank=2, objective="flops").model
    torch.export.save(torch.export.export(converted, (x[:2],), **batch), d / "converted.pt2")
    np.save(d / "calib.npy", x[:32].numpy())
    np.savez(d / "held_out.npz", images=x[:200].numpy(), labels=y[:200])
    np.savez(d / "val.npz", images=x[200:].numpy(), labels=y[200:])

    torch.save(torchvision.models.resnet18().state_dict(), d / "resnet18.pt")
    _save_images(d / "calib_images", rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8),
                 [f"{i}.png" for i in range(4)])

    with (resources.files("separify") / "assets" / EVAL_FILE).open("rb") as f, np.load(f) as data:
        raw, labels = data["images"], data["labels"]
    _save_images(d / "calib", raw[:16], [f"{i:05d}.png" for i in range(16)])
    _save_images(d / "tune", raw[100:164],
                 [f"{c}_{CLASSES[c].replace('/', '-')}/{i:05d}.png" for i, c in enumerate(labels[100:164])])

    (d / "separify.toml").write_text(_config_toml(), encoding="utf-8")
    _ocr_stand_ins(d)
    return d


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    return make_stand_ins(tmp_path_factory.mktemp("stand_ins"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("latency_cache")


WRITTEN: dict[str, dict[str, Path]] = {}  # block id -> outputs its commands wrote so far, by the name used


def _check_output(path: Path, command: str) -> None:
    assert path.is_file() and path.stat().st_size > 0, f"{path.name} was not written"
    if path.suffix == ".json":
        doc = json.loads(path.read_text(encoding="utf-8"))
        if command != "compare":  # a report: valid against its schema
            import jsonschema

            from separify.reporting import schema

            jsonschema.validate(doc, schema())
    elif path.suffix == ".html":
        assert "<html" in path.read_text(encoding="utf-8")[:2000].lower()
    elif path.suffix == ".pt2":
        import torch

        torch.export.load(str(path))
    elif path.suffix == ".onnx":
        import onnx

        onnx.checker.check_model(str(path))


@pytest.mark.default_objective
@pytest.mark.parametrize("cmd", [pytest.param(c, id=c.ident) for c in SHELL])
def test_shell_example_runs(cmd: Command, stand_ins: Path, cache_dir: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    reason = skip_reason(cmd)
    if reason:
        pytest.skip(reason)
    written = WRITTEN.setdefault(cmd.block, {})
    for name, ident in needs_earlier(cmd):
        if name not in written:
            pytest.skip(f"needs {name}, which {ident} did not write")
        (tmp_path / name).symlink_to(written[name])
    for entry in stand_ins.iterdir():
        (tmp_path / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    words = argv(cmd)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("SEPARIFY_CACHE_DIR", str(cache_dir))

    import torch
    from typer.testing import CliRunner

    from separify.cli import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in test_docs: more threads than free cores on a shared 2-core machine slow it down
    try:
        result = CliRunner().invoke(app, words)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, f"separify {shlex.join(words)}\n{result.output}\n{result.exception!r}"
    for name in outputs(words):
        _check_output(tmp_path / name, words[0])
        written[name] = tmp_path / name


def test_every_doc_command_is_collected() -> None:
    """Guards the parser: the shell commands test_docs finds are the ones this module runs."""
    from test_docs import SHELL as OPTIONS_CHECKED

    assert len(SHELL) == len(OPTIONS_CHECKED) >= 10
    assert {c.text.split()[1] for c in SHELL} == set(COMMANDS)
