"""One pipeline, two backends: the torch and the ONNX backend agree stage by stage on the same model, and the
package's imports point one way."""

import ast
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

import separify
from separify import pipeline
from separify.backends.onnx import OrtModule
from separify.pipeline import convert_onnx
from separify.records import NoteCode, Reason
from timers import onnx_timer

PACKAGE = pathlib.Path(separify.__file__).parent


class Small(nn.Module):
    """Three 3×3 convs of different widths (no BatchNorm: both backends then decompose the same kernels)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(24, 32, (3, 5), padding=(1, 2), bias=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    net = Small().eval()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path_factory.mktemp("pipeline") / "small.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(3, 2, generator=gen)  # correlated channels: the data-aware allocation then differs
    data = torch.einsum("cm,nmhw->nchw", mix, torch.randn(40, 2, 16, 16, generator=gen))
    data = data + 0.1 * torch.randn(data.shape, generator=gen)
    return net, path, x, data[:32], data[32:]


def _stages(res):
    """What each stage decided, per conv in graph order (names differ between the backends)."""
    return [(r.status, r.reason_code, r.method, r.rank, r.exact_rank, r.rank_source, r.layout,
             [n.code for n in r.notes]) for r in res.layers]


CASES = {
    "flops": dict(flops=0.5),
    "flops-calibrated-pw-dw-pw": dict(flops=0.5, calibrate=True),
    "flops-calibrated-dw-pw": dict(flops=0.4, method="dw-pw", calibrate=True),
    "latency-calibrated": dict(latency=0.6, method="dw-pw", calibrate=True, latency_cache=False),
    "latency-objective-fixed-rank": dict(rank=4, objective="latency", latency_cache=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_and_onnx_backends_give_the_same_plan_notes_and_factors(pair, case):
    net, path, x, calib, held = pair
    kw = dict(CASES[case])
    calibration = calib if kw.pop("calibrate", False) else None
    # the output reconstruction trains on minibatches of 8 here and of 1 on the ONNX file (exported with batch 1),
    # so its result differs; it is compared on a file of any batch in test_calib_data.py
    kw["calib_output_steps"] = 0
    if "latency" in kw or kw.get("objective") == "latency":
        kw.update(target="onnxruntime", timer=onnx_timer())
    with_torch = separify.convert(net, example_inputs=x, calibration=calibration, **kw)
    with_onnx = convert_onnx(path, input_shapes=tuple(x.shape), calibration=calibration, **kw)
    assert with_torch.converted, "nothing converted: the case tests nothing"
    assert _stages(with_torch) == _stages(with_onnx)
    assert [r.note for r in with_torch.layers] == [r.note for r in with_onnx.layers]
    for a, b in zip(with_torch.layers, with_onnx.layers):
        assert (a.flops_before, a.flops_after) == (b.flops_before, b.flops_after)
        if a.converted:
            assert a.rel_error == pytest.approx(b.rel_error, rel=1e-4, abs=1e-6)
        if a.calib_error_after is not None:
            assert a.calib_error_after == pytest.approx(b.calib_error_after, rel=0.05, abs=1e-5)
    # the factors: both converted models compute the same function
    y_torch = with_torch.model(held).detach()
    y_onnx = OrtModule(with_onnx.model)(held)
    torch.testing.assert_close(y_onnx, y_torch, rtol=1e-3, atol=1e-4 * float(y_torch.abs().max()))


def test_output_reconstruction_on_an_onnx_file_of_fixed_batch(pair):
    """The file fixes its batch to 1: the steps run on minibatches of one sample, and the held-out check one by one;
    the trained factors are written into the graph."""
    net, path, x, calib, held = pair
    kw = dict(input_shapes=tuple(x.shape), calibration=calib, flops=0.5)
    off = convert_onnx(path, **kw, calib_output_steps=0)
    on = convert_onnx(path, **kw)
    fit = on.output_fit
    assert (fit.steps, fit.held, fit.note) == (100, len(calib) // 8, None)
    assert fit.kept and fit.error_after < fit.error_before
    assert not torch.equal(OrtModule(on.model)(held), OrtModule(off.model)(held))


def test_output_reconstruction_of_an_onnx_file_in_bfloat16(pair):
    """``calib_precision="bfloat16"``: the imported models' steps run under bfloat16 autocast (the passes stay in
    onnxruntime's float32); the factors written back into the graph are float32 and lower the held-out error."""
    net, path, x, calib, held = pair
    res = convert_onnx(path, input_shapes=tuple(x.shape), calibration=calib, flops=0.5, calib_precision="bfloat16")
    fit = res.output_fit
    assert fit.precision == "bfloat16" and fit.kept and fit.error_after < fit.error_before
    weights = [v for name, v in res.model.graph.initializers.items() if name.endswith(".weight")]
    assert weights and all(v.const_value.numpy().dtype == np.float32 for v in weights)


def test_calibration_data_shapes_a_latency_plan_on_both_backends(pair):
    """The input moments feed the allocation under the latency objective on both backends (the ONNX pass used to
    collect them for FLOPs targets only)."""
    net, path, x, calib, _ = pair
    kw = dict(latency=0.6, method="dw-pw", target="onnxruntime", latency_cache=False, timer=onnx_timer(),
              calibration=calib)
    for res in (separify.convert(net, example_inputs=x, **kw), convert_onnx(path, input_shapes=tuple(x.shape), **kw)):
        planned = [r for r in res.layers if r.rank_source is not None]
        assert planned and all("calibration data" in r.rank_source for r in planned)


def test_progress_callable_is_called_per_layer_on_both_backends(pair):
    net, path, x, calib, _ = pair
    torch_names, onnx_names = [], []
    separify.convert(net, example_inputs=x, flops=0.5, progress=torch_names.append)
    res = convert_onnx(path, input_shapes=tuple(x.shape), flops=0.5, progress=onnx_names.append)
    assert len(onnx_names) == len(torch_names) == len(res.converted) > 0
    assert onnx_names[: len(res.converted)] == [r.name for r in res.converted]


def test_skips_carry_a_reason_code_and_the_same_words():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(4, 8, 3)
            self.unused = nn.Conv2d(4, 8, 3)
            self.pw = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.pw(self.used(x))

    with pytest.warns(UserWarning):
        # the module tree lists every conv (a traced graph holds only the called ones)
        res = separify.convert(Unused(), example_inputs=torch.randn(1, 4, 8, 8), rank=1, exclude=("used",),
                               tracer="module")
    by = {r.name: r for r in res.layers}
    assert by["used"].reason_code is Reason.EXCLUDED
    assert by["unused"].reason_code is Reason.NOT_REACHED and by["unused"].reason == pipeline.NOT_REACHED
    assert by["pw"].reason_code is Reason.UNSUPPORTED
    doc = by["unused"].to_dict()
    assert doc["reason_code"] == "not-reached" and doc["reason"] == pipeline.NOT_REACHED and doc["status"] == "skipped"


def test_a_clamped_rank_is_a_note_with_its_code(pair):
    net, path, x, _, _ = pair
    for res in (separify.convert(net, example_inputs=x, method="dw-pw", rank=50, require_saving=False),
                convert_onnx(path, method="dw-pw", rank=50, require_saving=False)):
        assert all(r.has_note(NoteCode.RANK_CLAMPED) for r in res.converted)


# --------------------------------------------------------------------------------------------------------------
# the import graph


def _imports() -> dict[str, set[str]]:
    """Module → the separify modules it imports (top-level and inside functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("separify"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("separify"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


LAYERS = [  # lowest first; a module may import from its own layer or below
    ("separify.errors", "separify.config", "separify.records", "separify.core", "separify.io.files"),
    ("separify.calibration", "separify.planning", "separify.io.data", "separify.io.embedded"),
    ("separify.backends", "separify.tuning", "separify.io.models"),  # io.models lifts torch.export graphs (fx)
    ("separify.pipeline", "separify.search", "separify.reporting"),
    ("separify.cli",),
]


def _layer(module: str) -> int | None:
    """The layer of the longest prefix naming the module (``separify.io`` itself, a package, has none)."""
    hits = [(len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes
            if module == p or module.startswith(p + ".")]
    return max(hits)[1] if hits else None


def test_imports_point_one_way():
    graph = _imports()
    upward = [(m, d) for m, deps in graph.items() for d in deps
              if _layer(m) is not None and _layer(d) is not None and _layer(d) > _layer(m)]
    assert not upward, f"imports against the layering: {upward}"


def test_import_graph_has_no_cycle():
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in _imports().items()}  # a parent
    state: dict[str, int] = {}  # package's __init__ re-exporting its children is not a cycle

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long
