"""The ONNX pass: exactness at full rank in onnxruntime on exported torchvision networks and on hand-built graphs
(asymmetric pads, auto_pad, strides, dilations, opsets 11 and 18, external data), what is skipped and why, what is
kept untouched, calibration through onnxruntime, and the promised errors on bad input."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

import separify
from separify.core import measure
from separify.errors import SeparifyError
from separify.backends.onnx import OrtModule, example_feeds, load_onnx, onnx_flops, pair_layers
from separify.pipeline import convert_onnx
from timers import onnx_timer as _onnx_timer


def _run(model, feeds: dict) -> list[np.ndarray]:
    """Run a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` in onnxruntime."""
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _dense_left(model: ir.Model) -> list[str]:
    """Conv nodes that still mix more than one input channel through a k×k (k > 1) kernel."""
    left = []
    for node in model.graph:
        if node.op_type != "Conv":
            continue
        w = node.inputs[1].const_value
        if w is not None and len(w.shape) == 4 and w.shape[1] > 1 and tuple(w.shape[2:]) != (1, 1):
            left.append(node.name)
    return left


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """resnet18 and vgg11_bn (random weights, BatchNorm statistics randomised) exported to ONNX at 64×64. vgg11_bn
    keeps torchvision's convs and pooling but gets one 10-class linear layer for its 4096-wide classifier: those
    120 M weights (480 MB) hold no conv and made every serialisation of the graph take a third of a second."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, ctor in (("resnet18", torchvision.models.resnet18), ("vgg11_bn", torchvision.models.vgg11_bn)):
        torch.manual_seed(0)
        model = ctor(num_classes=10).eval()
        if name == "vgg11_bn":
            model.classifier = torch.nn.Linear(512 * 7 * 7, 10)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        paths[name] = folder / f"{name}.onnx"
        measure.export_onnx(model, (torch.randn(1, 3, 64, 64),), paths[name])
    return paths


@pytest.mark.parametrize("method", ["dw-pw", "pw-dw-pw"])
@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_exported_networks_are_exact_at_full_rank(exported, arch, method):
    path = exported[arch]
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = convert_onnx(path, method=method, rank=10_000, require_saving=False)
    assert res.checked
    convertible = [r for r in res.layers if r.kernel_size != (1, 1)]
    assert convertible and all(r.converted for r in convertible)
    assert all(r.reason for r in res.skipped)
    assert _dense_left(res.model) == []
    feeds = example_feeds(res.model, seed=3)
    (ref,), (new,) = _run(path, feeds), _run(res.model, feeds)
    assert _rel(ref, new) < 1e-4
    assert res.output_error < 1e-4
    assert all(r.output_error < 1e-4 for r in res.converted)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the input is never touched


def test_flops_target_is_kept(exported):
    """The global FLOPs target: reached from below, every converted layer below its exact rank."""
    res = convert_onnx(exported["resnet18"], flops=0.5, cp_max_iter=3)  # the ranks come before the CP-ALS
    assert 0.45 < res.flops_ratio <= 0.5
    assert res.flops_before == onnx_flops(load_onnx(exported["resnet18"]), example_feeds(res.model))
    assert res.converted and all(0 < r.rank < r.exact_rank for r in res.converted)
    assert res.output_error is not None and 0 < res.output_error < 10
    # every converted layer's output error is recorded; kept layers say why
    assert all(r.output_error is not None for r in res.converted)
    assert all(r.reason == "kept dense by the global FLOPs allocation" or r.kernel_size == (1, 1)
               for r in res.skipped)


# ----------------------------------------------------------------------------------------------- hand-built graphs


def _conv_graph(specs, opset: int = 18, ir_version: int = 8, seed: int = 0, in_shape=(1, 4, 17, 13)):
    """A chain of Conv → Relu nodes; ``specs`` are (out_channels, kernel, attrs, bias) tuples."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, c = "x", in_shape[1]
    for i, (out, kernel, attrs, bias) in enumerate(specs):
        group = attrs.get("group", 1)
        w = rng.standard_normal((out, c // group, *kernel)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        ins = [prev, f"w{i}"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), f"b{i}"))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], name=f"conv{i}", kernel_shape=list(kernel), **attrs))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev, c = f"r{i}", out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["n", "c", "h", "w"])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    model.ir_version = ir_version
    helper.set_model_props(model, {"author": "separify tests", "licence": "MIT"})
    onnx.checker.check_model(model, full_check=True)
    return model


SPATIAL = [
    (6, (3, 3), {"pads": [0, 1, 2, 1]}, True),  # asymmetric pads
    (5, (3, 2), {"auto_pad": "SAME_UPPER", "strides": [2, 1]}, False),
    (6, (2, 3), {"auto_pad": "SAME_LOWER"}, True),
    (7, (3, 3), {"dilations": [2, 1], "pads": [2, 1, 1, 0]}, True),
    (5, (3, 3), {"auto_pad": "VALID", "strides": [1, 2]}, True),
]


@pytest.mark.parametrize("opset,ir_version", [(11, 6), (18, 8)], ids=["opset11", "opset18"])
@pytest.mark.parametrize("method", ["dw-pw", "pw-dw-pw"])
def test_pads_auto_pad_strides_dilations_exact(method, opset, ir_version):
    proto = _conv_graph(SPATIAL, opset=opset, ir_version=ir_version)
    res = convert_onnx(proto, method=method, rank=10_000, require_saving=False)
    assert [r.status for r in res.layers] == ["converted"] * len(SPATIAL)
    assert _dense_left(res.model) == []
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 17, 13)).astype(np.float32)}
    assert _rel(_run(proto, feeds)[0], _run(res.model, feeds)[0]) < 1e-5
    out = ir.serde.serialize_model(res.model)
    onnx.checker.check_model(out, full_check=True)
    # kept: opset imports, IR version, metadata, graph input/output names, the other nodes
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in proto.opset_import]
    assert out.ir_version == proto.ir_version
    assert {p.key: p.value for p in out.metadata_props} == {"author": "separify tests", "licence": "MIT"}
    assert [i.name for i in out.graph.input] == ["x"] and out.graph.output[0].name == proto.graph.output[0].name
    assert [n.name for n in out.graph.node if n.op_type == "Relu"] == [f"relu{i}" for i in range(len(SPATIAL))]
    # the replacement's output keeps the original conv output's name; old weights are gone
    assert {f"c{i}" for i in range(len(SPATIAL))} <= {o for n in out.graph.node for o in n.output}
    assert not {f"w{i}" for i in range(len(SPATIAL))} & {t.name for t in out.graph.initializer}


def test_low_rank_error_is_recorded_per_layer():
    res = convert_onnx(_conv_graph(SPATIAL), method="pw-dw-pw", rank=2)
    assert all(r.converted and 0 < r.output_error for r in res.layers)
    assert 0 < res.output_error
    assert all(0 < r.rel_error < 1 for r in res.layers)


def test_skipped_nodes_carry_their_reason():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w_group", f(8, 2, 3, 3)), ("w_dw", f(8, 1, 3, 3)), ("w_1x1", f(8, 8, 1, 1)), ("w_shared", f(8, 8, 3, 3)),
        ("w_ok", f(8, 8, 3, 3)), ("w1d", f(4, 8, 3)), ("two", np.array(2.0, np.float32))]]
    nodes = [
        helper.make_node("Conv", ["x", "w_group"], ["a"], name="grouped", kernel_shape=[3, 3], pads=[1] * 4, group=4),
        helper.make_node("Conv", ["a", "w_dw"], ["b"], name="depthwise", kernel_shape=[3, 3], pads=[1] * 4, group=8),
        helper.make_node("Conv", ["b", "w_1x1"], ["c"], name="pointwise", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["c", "w_shared"], ["d"], name="shared1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Conv", ["d", "w_shared"], ["e"], name="shared2", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Mul", ["w_ok", "two"], ["w_computed"], name="scale"),
        helper.make_node("Conv", ["e", "w_computed"], ["g"], name="computed", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Conv", ["g", "w_in"], ["h"], name="graph_input_weight", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Reshape", ["h", "shape"], ["h1"], name="flatten_rows"),
        helper.make_node("Conv", ["h1", "w1d"], ["y"], name="conv1d", kernel_shape=[3]),
    ]
    inits.append(numpy_helper.from_array(np.array([1, 8, -1], np.int64), "shape"))
    graph = helper.make_graph(nodes, "skips", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8]),
                                               helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [8, 8, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "l"])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    with pytest.warns(UserWarning, match="no layer was converted"):
        res = convert_onnx(proto, rank=1)
    reasons = {r.name: r.reason for r in res.layers}
    assert reasons["grouped"] == "grouped conv (groups=4)"
    assert reasons["depthwise"] == "already depthwise (groups=8)"
    assert reasons["pointwise"] == "1×1 conv (already pointwise)"
    assert "shared with 1 other" in reasons["shared1"] and "shared with 1 other" in reasons["shared2"]
    assert "computed in the graph" in reasons["computed"]
    assert "graph input" in reasons["graph_input_weight"]
    assert reasons["conv1d"] == "1-D conv (only 2-D convs are converted)"
    # exclusion by node-name pattern
    res = convert_onnx(_conv_graph(SPATIAL[:2]), rank=1, exclude=("conv1",))
    assert [r.status for r in res.layers] == ["converted", "skipped"]
    assert res.layers[1].reason == "excluded by pattern 'conv1'"


def test_external_data_round_trip(tmp_path):
    proto = _conv_graph(SPATIAL[:3])
    src = tmp_path / "model.onnx"
    onnx.save(proto, src, save_as_external_data=True, all_tensors_to_one_file=True, location="model.weights",
              size_threshold=0)
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    res = convert_onnx(src, rank=10_000, require_saving=False)
    written = res.save(tmp_path / "out.onnx")
    assert {p.name for p in written} == {"out.onnx", "out.onnx.data"}
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()
            if p.name in hashes} == hashes
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 4, 17, 13)).astype(np.float32)}
    assert _rel(_run(src, feeds)[0], _run(tmp_path / "out.onnx", feeds)[0]) < 1e-5
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_models_too_large_for_memory_stay_lazy(tmp_path, monkeypatch):
    """The path for models over the in-memory limit (1 GiB), with the limit lowered to 0: initializers stay
    external tensors, onnxruntime reads them from temporary files, calibration runs, and the written model is
    checked from the file before it is renamed into place."""
    from separify.backends.onnx import graph

    monkeypatch.setattr(graph, "_INLINE_LIMIT", 0)
    proto = _conv_graph(SPATIAL[:3])
    src = tmp_path / "model.onnx"
    onnx.save(proto, src, save_as_external_data=True, all_tensors_to_one_file=True, location="model.weights",
              size_threshold=0)
    res = convert_onnx(src, rank=10_000, require_saving=False, calibration=torch.randn(4, 4, 17, 13))
    assert not res.checked and res.output_error < 1e-5
    assert all(r.calib_error_after < 1e-4 for r in res.converted)
    assert {p.name for p in res.save(tmp_path / "out.onnx")} == {"out.onnx", "out.onnx.data"}
    assert res.checked
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 4, 17, 13)).astype(np.float32)}
    assert _rel(_run(src, feeds)[0], _run(tmp_path / "out.onnx", feeds)[0]) < 1e-5


@pytest.mark.parametrize("through_identity", [False, True], ids=["direct", "identity"])
def test_a_bias_shared_between_convs_does_not_block_them(through_identity):
    """Exporters merge equal constants: the zero biases of a freshly initialised network become one initializer
    used by many Conv nodes, directly or (TorchScript's exporter) each through an ``Identity`` node of its own. Both
    3×3 convs are converted (exact at full rank); the 1×1 conv keeps the shared bias, and nothing is left unused."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((6, 6, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((6, 6, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(6, np.float32), "zeros")]
    nodes, bias, weight = [], [], []
    for i in range(3):
        if through_identity:  # the weights through an Identity of their own too
            nodes.append(helper.make_node("Identity", ["zeros"], [f"bias{i}"], name=f"id{i}"))
            nodes.append(helper.make_node("Identity", [f"w{i}"], [f"w{i}_"], name=f"idw{i}"))
        bias.append(f"bias{i}" if through_identity else "zeros")
        weight.append(f"w{i}_" if through_identity else f"w{i}")
    nodes += [helper.make_node("Conv", ["x", weight[0], bias[0]], ["a"], name="c0", kernel_shape=[3, 3], pads=[1] * 4),
              helper.make_node("Conv", ["a", weight[1], bias[1]], ["b"], name="c1", kernel_shape=[3, 3], pads=[1] * 4),
              helper.make_node("Conv", ["b", weight[2], bias[2]], ["y"], name="c2", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 9, 9])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    res = convert_onnx(proto, method="dw-pw", rank=10_000, require_saving=False)
    assert [r.name for r in res.converted] == ["c0", "c1"]
    graph = res.model.graph
    assert "zeros" in graph.initializers  # still used by the 1×1 conv
    assert all(v.uses() for v in graph.initializers.values())
    assert [n.name for n in graph if n.op_type == "Identity"] == (["id2", "idw2"] if through_identity else [])
    assert "w0" not in graph.initializers and "w1" not in graph.initializers  # replaced, with their Identities
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 9, 9)).astype(np.float32)}
    assert _rel(_run(proto, feeds)[0], _run(res.model, feeds)[0]) < 1e-5


def test_a_weight_tied_through_identity_nodes_stays_dense():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Identity", ["w"], ["w_a"], name="id_a"),
             helper.make_node("Identity", ["w_a"], ["w_b"], name="id_b"),
             helper.make_node("Conv", ["x", "w_b"], ["a"], name="c0", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Conv", ["a", "w_a"], ["y"], name="c1", kernel_shape=[3, 3], pads=[1] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 9, 9])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    with pytest.warns(UserWarning, match="no layer was converted"):
        res = convert_onnx(proto, method="dw-pw", rank=1)
    assert all("shared with 1 other" in r.reason for r in res.layers)


def test_dynamic_spatial_shape_needs_a_shape():
    proto = _conv_graph(SPATIAL[:2], in_shape=("N", 4, "H", "W"))
    with pytest.raises(SeparifyError, match="dynamic dimensions.*--input-shape"):
        convert_onnx(proto, rank=1)
    res = convert_onnx(proto, rank=1, input_shapes=(2, 4, 20, 11))
    assert res.input_shapes == {"x": (2, 4, 20, 11)}
    assert res.layers[0].input_shape == (2, 4, 20, 11)
    # the converted graph still runs at other sizes (auto_pad and pads are copied, not baked in)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4, 9, 30)).astype(np.float32)}
    assert _run(res.model, feeds)[0].shape == _run(proto, feeds)[0].shape


# ----------------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("method,rank", [("dw-pw", 1), ("pw-dw-pw", 4)])
def test_calibration_through_onnxruntime_matches_the_torch_path(method, rank):
    """Inputs with strongly correlated channels: the refit on real inputs lowers the held-out output error, and the
    layer-by-layer refit through onnxruntime gives what the torch path's gives."""
    proto = _conv_graph([(16, (3, 3), {"pads": [1, 1, 1, 1]}, True), (16, (3, 3), {"pads": [1, 1, 1, 1]}, True)],
                        in_shape=("N", 8, 12, 12))
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 2, generator=gen)
    data = torch.einsum("cm,nmhw->nchw", mix, torch.randn(96, 2, 12, 12, generator=gen))
    calib, held = data[:64], data[64:]
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()).eval()
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    with torch.no_grad():
        for i, conv in ((0, net[0]), (1, net[2])):
            conv.weight.copy_(inits[f"w{i}"])
            conv.bias.copy_(inits[f"b{i}"])
    ref = OrtModule(load_onnx(proto))(held)
    kw = dict(method=method, rank=rank)
    plain = _rel(ref, OrtModule(convert_onnx(proto, input_shapes=(1, 8, 12, 12), **kw).model)(held))
    res = convert_onnx(proto, input_shapes=(1, 8, 12, 12), calibration=calib, **kw)
    onnx_err = _rel(ref, OrtModule(res.model)(held))
    torch_err = _rel(ref, separify.convert(net, example_inputs=calib[:1], calibration=calib, **kw).model(held).detach())
    assert onnx_err < 0.85 * plain
    assert onnx_err == pytest.approx(torch_err, rel=1e-3)
    assert all(r.calib_error_after < r.calib_error_before for r in res.converted)


def test_scarce_calibration_through_onnxruntime_is_cross_validated_as_in_torch():
    """Two samples (288 pixels) for a dw-pw rank-3 layer (24 inputs and a bias: 800 pixels wanted): both passes
    skip the alternating least squares, choose the refit's ridge by cross-validation over the two samples, and
    give the same model."""
    proto = _conv_graph([(16, (3, 3), {"pads": [1, 1, 1, 1]}, True)], in_shape=("N", 8, 12, 12))
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU()).eval()
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    with torch.no_grad():
        net[0].weight.copy_(inits["w0"])
        net[0].bias.copy_(inits["b0"])
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 2, generator=gen)
    data = torch.einsum("cm,nmhw->nchw", mix, torch.randn(34, 2, 12, 12, generator=gen))
    data = data + 0.05 * torch.randn(data.shape, generator=gen)
    calib, held = data[:2], data[2:]
    kw = dict(method="dw-pw", rank=3, calibration=calib)
    with pytest.warns(UserWarning, match="calibration sample.*few"):
        res = convert_onnx(proto, input_shapes=(1, 8, 12, 12), **kw)
    with pytest.warns(UserWarning, match="calibration sample.*few"):
        torch_res = separify.convert(net, example_inputs=calib[:1], **kw)
    for r in (res.converted[0], torch_res.converted[0]):
        assert "no ALS: scarce calibration data (288 pixels" in r.note
        assert "2-fold cross-validation" in r.note or "cross-validation kept the factors" in r.note
    assert res.converted[0].note == torch_res.converted[0].note
    ref = OrtModule(load_onnx(proto))(held)
    onnx_err = _rel(ref, OrtModule(res.model)(held))
    assert onnx_err == pytest.approx(_rel(ref, torch_res.model(held).detach()), rel=1e-3)
    plain = _rel(ref, OrtModule(convert_onnx(proto, input_shapes=(1, 8, 12, 12), method="dw-pw", rank=3).model)(held))
    assert onnx_err <= plain


def test_scarce_rule_counts_the_calibration_data_at_its_own_size(cp_sweeps):
    """A model with dynamic height and width, converted at 32×32 but calibrated on 4 samples of 6×6: 144 pixels
    for a pw-dw-pw rank-6 layer (224 wanted): scarce, so no ALS and CP runs its full 25 sweeps."""
    proto = _conv_graph([(8, (3, 3), {"pads": [1, 1, 1, 1]}, True)], in_shape=("N", 8, "H", "W"))
    with pytest.warns(UserWarning, match="calibration sample"):
        res = convert_onnx(proto, input_shapes=(1, 8, 32, 32), method="pw-dw-pw", rank=6,
                           calibration=torch.randn(4, 8, 6, 6))
    assert cp_sweeps == [25]
    assert "no ALS: scarce calibration data (144 pixels" in res.converted[0].note


@pytest.mark.parametrize("method,rank", [("dw-pw", 1), ("pw-dw-pw", 3)])
def test_als_through_onnxruntime_beats_the_refit_alone_with_asymmetric_pads(method, rank):
    """The alternating least squares streams the depthwise conv's input from onnxruntime and pads it as the node
    does (asymmetric pads, dilation, stride): it must lower the held-out error below the refit alone."""
    proto = _conv_graph([(12, (3, 3), {"pads": [0, 1, 2, 1]}, True),
                         (12, (3, 3), {"dilations": [2, 1], "pads": [2, 1, 1, 0], "strides": [1, 2]}, True)],
                        in_shape=("N", 8, 12, 12))
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 2, generator=gen)
    data = torch.einsum("cm,nmhw->nchw", mix, torch.randn(96, 2, 12, 12, generator=gen))
    data = data + 0.05 * torch.randn(data.shape, generator=gen)
    calib, held = data[:64], data[64:]
    ref = OrtModule(load_onnx(proto))(held)
    kw = dict(input_shapes=(1, 8, 12, 12), calibration=calib, method=method, rank=rank, calib_steps=0)
    refit = convert_onnx(proto, calib_als=0, **kw)
    als = convert_onnx(proto, **kw)  # the default: calib_als=10
    for a, b in zip(als.converted, refit.converted):
        assert a.calib_error_before == pytest.approx(b.calib_error_before, rel=0.05)  # same start, sampled pixels
        assert a.calib_error_after < b.calib_error_after
    assert _rel(ref, OrtModule(als.model)(held)) < _rel(ref, OrtModule(refit.model)(held))


def test_calibration_on_an_exported_network_matches_the_torch_refit_at_full_rank(exported):
    """Calibration through onnxruntime on a whole exported network keeps a full-rank conversion exact (dw-pw: its
    exact factors come in closed form; pw-dw-pw calibration is checked against torch on small graphs above)."""
    data = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    res = convert_onnx(exported["vgg11_bn"], method="dw-pw", rank=10_000, require_saving=False, calibration=data)
    # exact up to float32 rounding (the sums are float64, the activations float32)
    assert all(r.calib_error_after < 1e-3 for r in res.converted)
    assert res.output_error < 1e-3


@pytest.mark.parametrize("pads", [[1, 1, 1, 1], [0, 1, 2, 1]], ids=["symmetric", "asymmetric"])
def test_reconstruction_through_onnxruntime_equals_the_torch_path(pads):
    """The layer-wise reconstruction of an ONNX conversion (its inputs from onnxruntime, the steps in PyTorch, the
    graph's padding on the depthwise input) gives the factors the torch path's gives, and lowers the error."""
    proto = _conv_graph([(16, (3, 3), {"pads": pads}, True)], in_shape=("N", 8, 12, 12))
    net = torch.nn.Sequential(torch.nn.ZeroPad2d((pads[1], pads[3], pads[0], pads[2])), torch.nn.Conv2d(8, 16, 3))
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    with torch.no_grad():
        net[1].weight.copy_(inits["w0"])
        net[1].bias.copy_(inits["b0"])
    calib = torch.randn(48, 8, 12, 12, generator=torch.Generator().manual_seed(0))
    kw = dict(method="pw-dw-pw", rank=4, calibration=calib, calib_steps=60)
    res = convert_onnx(proto, input_shapes=(1, 8, 12, 12), **kw)
    none = convert_onnx(proto, input_shapes=(1, 8, 12, 12), **{**kw, "calib_steps": 0})
    ref = separify.convert(net.eval(), example_inputs=calib[:1], **kw)
    onnx_err, torch_err = res.converted[0].calib_error_after, ref.converted[0].calib_error_after
    assert onnx_err < none.converted[0].calib_error_after
    assert onnx_err == pytest.approx(torch_err, rel=1e-3)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_files(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    with pytest.raises(SeparifyError, match="not an ONNX model"):
        load_onnx(text)
    good = tmp_path / "good.onnx"
    onnx.save(_conv_graph(SPATIAL[:2]), good)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SeparifyError, match="not an ONNX model.*truncated"):
        load_onnx(cut)
    with pytest.raises(SeparifyError, match="no such file"):
        load_onnx(tmp_path / "missing.onnx")


def test_invalid_model_is_blamed_on_the_model_not_the_conversion():
    proto = _conv_graph(SPATIAL[:1])
    proto.graph.node[1].input[0] = "nowhere"  # Relu reads an undefined tensor
    with pytest.raises(SeparifyError, match="fails onnx.checker before any conversion"):
        convert_onnx(proto, rank=1)


def test_old_opset_is_refused():
    proto = _conv_graph(SPATIAL[:1], opset=9, ir_version=4)
    with pytest.raises(SeparifyError, match="opset 9.*opset 11 or newer"):
        convert_onnx(proto, rank=1)


def test_nan_weights_are_refused():
    proto = _conv_graph(SPATIAL[:1])
    w = numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.nan
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w0"))
    with pytest.raises(SeparifyError, match="conv0.*(NaN|finite)"):
        convert_onnx(proto, rank=1)


def test_torch_convert_accepts_onnx(exported):
    res = separify.convert(str(exported["vgg11_bn"]), rank=2)
    assert res.path == "onnx" and res.converted
    proto = _conv_graph(SPATIAL[:2])
    assert separify.convert(proto, rank=2).path == "onnx"
    assert separify.convert(load_onnx(proto), rank=2).path == "onnx"
    with pytest.raises(SeparifyError, match="nn.Module or an ONNX model"):
        separify.convert(str(Path(__file__)), rank=2)


# ----------------------------------------------------------------------------------------------- fine-tuning


class _SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))  # no Reshape: the export runs at any batch size


def _small_cnn_onnx(path: Path) -> None:
    torch.manual_seed(0)
    measure.export_onnx(_SmallCNN().eval(), (torch.randn(2, 3, 16, 16),), path)
    proto = onnx.load(path)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"  # the exporter fixes it at 2
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(proto, path)


@pytest.mark.parametrize("layout", [None, "split", "branches"])
def test_finetune_onnx_trains_the_factors_and_writes_them_back(tmp_path, layout):
    from separify.backends.onnx import finetune_onnx, import_torch

    _small_cnn_onnx(tmp_path / "small.onnx")
    original = load_onnx(tmp_path / "small.onnx")
    if layout is None:
        res = convert_onnx(original, method="dw-pw", rank=1, input_shapes=(1, 3, 16, 16))
    else:  # K = 2 in a layout with K depthwise nodes: every one of them is trained and written back
        res = convert_onnx(original, method="dw-pw", rank=2, input_shapes=(1, 3, 16, 16), objective="latency",
                           latency_cache=False, timer=_onnx_timer(slow_factor=0.9, favour=layout))
        assert res.converted and all(r.layout == layout for r in res.converted)
        assert all(len(nodes) >= 3 for nodes in res.factor_nodes.values())
    data = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batches = [data[i:i + 16] for i in range(0, 64, 16)]
    before = {k: v.const_value.numpy().copy() for k, v in res.model.graph.initializers.items()}
    teacher = OrtModule(original)(data)
    err_before = _rel(teacher, OrtModule(res.model)(data))
    tuned = finetune_onnx(original, res, batches, steps=40, lr=3e-3, seed=0)
    assert tuned.steps == 40
    after = {k: v.const_value.numpy() for k, v in res.model.graph.initializers.items()}
    factors = {k for k in after if any(k.startswith(f"{layer}.") for layer in res.factor_nodes)}
    assert factors and all(not np.array_equal(before[k], after[k]) for k in factors if k.endswith(".weight"))
    assert all(np.array_equal(before[k], after[k]) for k in after if k not in factors)  # everything else frozen
    assert _rel(teacher, OrtModule(res.model)(data)) < err_before
    onnx.checker.check_model(ir.serde.serialize_model(res.model), full_check=True)
    # what onnxruntime runs is what was trained
    assert _rel(import_torch(res.model)(data).detach(), OrtModule(res.model)(data)) < 1e-5


def test_finetune_onnx_says_when_the_model_cannot_be_imported():
    from separify.backends.onnx import finetune_onnx

    proto = _conv_graph(SPATIAL[:1])
    proto.graph.node[1].op_type = "Selu"  # fine for onnxruntime; give onnx2torch something it lacks below
    proto.graph.node[1].domain = ""
    original = load_onnx(proto)
    res = convert_onnx(original, rank=1)
    model = res.model
    node = next(n for n in model.graph if n.op_type == "Selu")
    node.op_type = "Shrink"  # onnx2torch has no converter for Shrink
    with pytest.raises(SeparifyError, match="cannot be imported into PyTorch.*without --finetune"):
        finetune_onnx(original, res, [torch.randn(1, 4, 17, 13)], steps=1)


# ----------------------------------------------------------------------------------------------- command line


def _cli(*args):
    from typer.testing import CliRunner

    from separify.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_converts_and_reports_onnx(tmp_path):
    import json

    import jsonschema

    from separify.reporting import schema

    src = tmp_path / "small.onnx"
    _small_cnn_onnx(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "small_sep.onnx"
    res = _cli("convert", src, "-o", out, "--method", "dw-pw", "--rank", "1", "--json", tmp_path / "r.json",
               "--min-time", "0.05")
    assert res.exit_code == 0, res.output
    assert "onnxruntime-cpu" in res.output and "checked: onnx.checker" in res.output
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    onnx.checker.check_model(str(out), full_check=True)
    doc = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(doc, schema())
    assert doc["conversion"]["path"] == "onnx" and doc["conversion"]["converted_layers"] == 2
    assert [lat["backend"] for lat in doc["latency"]] == ["onnxruntime-cpu"]
    # the same pair through `separify report`, with labelled data
    np.savez(tmp_path / "data.npz", images=np.random.default_rng(0).standard_normal((20, 3, 16, 16), np.float32),
             labels=np.arange(20) % 5)
    res = _cli("report", src, out, "--no-timing", "--data", tmp_path / "data.npz", "--json", tmp_path / "r2.json")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "r2.json").read_text())
    assert {q["metric"] for q in doc["quality"]} >= {"top-1 accuracy", "top-1 agreement with the original"}
    assert [r["status"] for r in doc["layers"]] == ["converted", "converted"]
    # calibration and fine-tuning from the command line
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).standard_normal((32, 3, 16, 16), np.float32))
    res = _cli("convert", src, "-o", tmp_path / "tuned.onnx", "--rank", "1", "--calib", tmp_path / "calib.npy",
               "--finetune", tmp_path / "data.npz", "--steps", "2", "--no-timing")
    assert res.exit_code == 0, res.output
    assert "written back" in res.output


def test_cli_onnx_errors(tmp_path):
    src = tmp_path / "small.onnx"
    _small_cnn_onnx(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for args, match in [
        (("-o", tmp_path / "x.pt2"), "written as ONNX"),
        (("-o", src), "is the input file"),
        (("-o", tmp_path / "x.onnx", "--arch", "torchvision.models:resnet18"), "apply to PyTorch models"),
        (("-o", tmp_path / "x.onnx", "--input-shape", "1,3,16"), "does not fit"),
        (("-o", tmp_path / "x.onnx", "--calib", tmp_path / "missing.npy"), "missing.npy"),
        (("-o", tmp_path / "x.onnx", "--calib-steps", "5", "--calib", src), "calib"),
    ]:
        res = _cli("convert", src, *args, "--no-timing")
        assert res.exit_code == 1, res.output
        assert match in res.stderr and "Traceback" not in res.output, res.stderr
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "x.onnx").exists()
    np.savez(tmp_path / "small.npz", images=np.zeros((2, 3, 16, 16), np.float32))
    res = _cli("report", src, tmp_path / "small.npz", "--no-timing")
    assert res.exit_code == 1 and "two ONNX files" in res.stderr
    (tmp_path / "exists.onnx").write_bytes(b"keep me")
    res = _cli("convert", src, "-o", tmp_path / "exists.onnx", "--no-timing")
    assert res.exit_code == 1 and "exists" in res.stderr
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep me"


def test_cli_writes_a_torch_model_as_onnx(tmp_path):
    out = tmp_path / "fashion.onnx"
    res = _cli("convert", "--to", "onnx", "-o", out, "--no-timing", "--no-layers")
    assert res.exit_code == 0, res.output
    from separify.io.embedded import load_eval_data

    images, _ = load_eval_data()
    converted = OrtModule(load_onnx(out))(images[:16])
    assert converted.shape == (16, 10)
    res = _cli("convert", "--to", "onnx", "-o", tmp_path / "x.pt2", "--no-timing")
    assert res.exit_code == 1 and "--to onnx writes a .onnx file" in res.stderr


# ------------------------------------------------------------------------------------------- objective="latency"

LAT_SPECS = [(16, (3, 3), {"pads": [1, 1, 1, 1]}, True), (32, (3, 3), {"pads": [0, 1, 1, 0]}, True),
             (32, (3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}, False)]


def test_onnx_latency_keeps_every_node_when_no_replacement_is_faster():
    proto = _conv_graph(LAT_SPECS, in_shape=(1, 8, 16, 16))
    with pytest.warns(UserWarning, match="no layer was converted"):
        res = convert_onnx(proto, objective="latency", rank=4, latency_cache=False,
                           timer=_onnx_timer(slow_factor=50.0))
    assert not res.converted and len(res.layers) == 3
    for rec in res.layers:
        assert rec.reason.startswith("no replacement measured faster than the dense conv by 5% on onnxruntime"), \
            rec.reason
        assert rec.time_before_ms > 0
    assert len(_dense_left(res.model)) == 3 and len([n for n in res.model.graph if n.op_type == "Conv"]) == 3
    assert res.latency_target.startswith("onnxruntime") and "not faster" not in " ".join(res.warnings)


def test_onnx_latency_writes_the_padded_layout_and_stays_exact(caplog, capfd):
    """A timer that makes pw-dw-pw's pad16 layout fastest: the graph gets the widened factors (zero terms, the
    depthwise group follows) and computes the same as the plain conversion at the same rank; serialising it
    complains about nothing."""
    proto = _conv_graph(LAT_SPECS, in_shape=(1, 8, 16, 16))
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 8, 16, 16)).astype(np.float32)}
    res = convert_onnx(proto, method="pw-dw-pw", rank=5, objective="latency", latency_cache=False,
                       timer=_onnx_timer(slow_factor=0.9, favour="pad16"))
    plain = convert_onnx(proto, method="pw-dw-pw", rank=5)
    padded = [r for r in res.converted if r.layout == "pad16"]
    assert padded and all("padded to 16 channels" in r.note for r in padded)
    onnx.checker.check_model(ir.to_proto(res.model), full_check=True)
    out, err = capfd.readouterr()
    assert "not known" not in out + err + caplog.text
    for rec in padded:
        dw = next(n for n in res.model.graph if n.name == f"{rec.name}/dw")
        assert dw.attributes["group"].value == 16 and dw.inputs[1].const_value.shape[0] == 16
    for a, b in zip(_run(res.model, feeds), _run(plain.model, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert res.latency_ratio < 1.0 and res.latency_before.backend == "onnxruntime-cpu"


def test_onnx_latency_budget_is_met_on_the_whole_graph():
    """Inside the graph each separable layer costs 0.05 ms more than alone: the plan is made again, aiming lower,
    until the whole graph meets the budget; every dw-pw layout is a candidate (the pass writes them all)."""
    proto = _conv_graph(LAT_SPECS, in_shape=(1, 8, 16, 16))
    seen = []

    def timer(modules, shape, target):
        seen.extend(getattr(m, "layout", None) for m in modules)
        return _onnx_timer(hidden_ms=0.05)(modules, shape, target)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = convert_onnx(proto, method="dw-pw", latency=0.6, latency_cache=False, timer=timer)
    assert res.converted and res.latency_ratio <= 0.6 * 1.02 and res.latency_predicted < 0.6
    assert set(seen) - {None} == {"multiplier", "split", "repeat", "branches"}  # every layout is written
    assert res.config.selection == "latency"


def test_onnx_latency_budget_times_the_planned_graph_in_its_layouts():
    """The whole graphs timed while re-planning a latency budget carry the layouts chosen (here branches: K
    depthwise Conv nodes per layer), not the one grouped conv."""
    proto = _conv_graph(LAT_SPECS, in_shape=(1, 8, 16, 16))
    graphs = []
    base = _onnx_timer(slow_factor=0.9, favour="branches", hidden_ms=0.05)

    def timer(modules, shape, target):
        graphs.extend(m.model for m in modules if isinstance(m, OrtModule))
        return base(modules, shape, target)

    res = convert_onnx(proto, method="dw-pw", latency=0.6, latency_cache=False, timer=timer)
    assert any(r.layout == "branches" for r in res.converted)
    planned = [g for g in graphs if any("/dw" in (n.name or "") for n in g.graph)]
    assert planned and all(not any(n.name.endswith("/dw") for n in g.graph) for g in planned)
    assert any(n.name.endswith("/dw_1") for n in planned[0].graph)


@pytest.mark.parametrize("specs, in_shape, k", [(LAT_SPECS, (1, 8, 16, 16), 3), (SPATIAL, (1, 4, 17, 13), 2)],
                         ids=["pads-strides", "auto_pad-dilations"])
@pytest.mark.parametrize("layout", ["repeat", "split", "branches"])
def test_onnx_latency_writes_the_dwpw_layouts_and_stays_exact(layout, specs, in_shape, k):
    """A timer that makes one dw-pw layout fastest: it is written as ONNX nodes computing the same as the
    one-grouped-conv conversion (repeat: Tile → depthwise Conv with M·K groups → Conv, the factors permuted to the
    tiled order; split: K depthwise Convs → Concat → Conv; branches: K depthwise → 1×1 Conv chains summed by Add,
    the bias on the last), with pads, strides, auto_pad and dilations; the graph passes the full checker, the
    report pairs each layer with its rank and FLOPs, and fine-tuning sees every factor node."""
    proto = _conv_graph(specs, in_shape=in_shape)
    feeds = {"x": np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)}
    res = convert_onnx(proto, method="dw-pw", rank=k, objective="latency", latency_cache=False,
                       timer=_onnx_timer(slow_factor=0.9, favour=layout))
    plain = convert_onnx(proto, method="dw-pw", rank=k)
    assert len(res.converted) == len(specs) and all(r.layout == layout for r in res.converted)
    onnx.checker.check_model(ir.to_proto(res.model), full_check=True)
    nodes = {n.name: n for n in res.model.graph}
    has_bias = {f"conv{i}": spec[3] for i, spec in enumerate(specs)}
    for rec in res.converted:
        m = rec.in_channels
        if layout == "repeat":
            dw = nodes[f"{rec.name}/dw"]
            tile = dw.inputs[0].producer()
            assert tile.op_type == "Tile" and list(tile.inputs[1].const_value.numpy()) == [1, k, 1, 1]
            assert dw.attributes["group"].value == k * m == dw.inputs[1].const_value.shape[0]
            assert res.factor_nodes[rec.name] == [f"{rec.name}/dw", f"{rec.name}/pw"]
            continue
        dws = [nodes[f"{rec.name}/dw_{j}"] for j in range(k)]
        assert f"{rec.name}/dw" not in nodes and len({dw.inputs[0] for dw in dws}) == 1  # K convs of one input
        for dw in dws:
            assert dw.attributes["group"].value == m and dw.inputs[1].const_value.shape[:2] == (m, 1)
        if layout == "split":
            cat = nodes[f"{rec.name}/pw"].inputs[0].producer()
            assert cat.op_type == "Concat" and [v.producer() for v in cat.inputs] == dws
            assert set(res.factor_nodes[rec.name]) == {n.name for n in dws} | {f"{rec.name}/pw"}
        else:
            pws = [nodes[f"{rec.name}/pw_{j}"] for j in range(k)]
            assert [p.inputs[0].producer() for p in pws] == dws and f"{rec.name}/pw" not in nodes
            assert [len(p.inputs) for p in pws] == [2] * (k - 1) + [3 if has_bias[rec.name] else 2]  # bias: last
            assert sum(n.op_type == "Add" and n.name.startswith(f"{rec.name}/") for n in res.model.graph) == k - 1
            assert set(res.factor_nodes[rec.name]) == {n.name for n in dws + pws}
    for a, b in zip(_run(res.model, feeds), _run(plain.model, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for rec, ref in zip(res.converted, plain.converted):  # each layer's output inside the graph, as before
        assert rec.output_error == pytest.approx(ref.output_error, rel=1e-3, abs=1e-6)
    pairs = {p.name: p for p in pair_layers(ir.from_proto(proto), res.model, feeds)}
    for rec in res.converted:
        pair = pairs[rec.name]
        assert (pair.status, pair.method, pair.rank) == ("converted", "dw-pw", k)
        assert pair.flops_after == pytest.approx(rec.flops_after, rel=1e-6)


def test_onnx_latency_target_errors():
    proto = _conv_graph(LAT_SPECS, in_shape=(1, 8, 16, 16))
    with pytest.raises(SeparifyError, match="timed in ONNX Runtime on the CPU"):
        convert_onnx(proto, objective="latency", target="cuda", latency_cache=False, timer=_onnx_timer())
    with pytest.raises(SeparifyError, match="batch size 4 differs from the ONNX model's input batch 1"):
        convert_onnx(proto, objective="latency", target=separify.LatencyTarget("onnxruntime", batch_size=4),
                     latency_cache=False, timer=_onnx_timer())
    with pytest.raises(SeparifyError, match="ONNX Runtime: the onnxruntime target times float32"):
        convert_onnx(proto, objective="latency", target=separify.LatencyTarget("cpu", dtype="bfloat16"),
                     latency_cache=False, timer=_onnx_timer())


def test_cli_onnx_latency_objective_times_in_onnxruntime(tmp_path, monkeypatch):
    monkeypatch.setenv("SEPARIFY_CACHE_DIR", str(tmp_path / "cache"))
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_conv_graph(LAT_SPECS, in_shape=(1, 8, 16, 16)), src)
    res = _cli("convert", src, "-o", out, "--objective", "latency", "--rank", "4", "--threads", "1",
               "--no-timing", "--no-layers")
    assert res.exit_code == 0, res.output
    assert "latency objective on onnxruntime" in res.stdout and out.is_file()
    assert (tmp_path / "cache" / "latency.json").is_file()


def test_cli_fine_tunes_an_onnx_ctc_recogniser(tmp_path):
    """``--ctc-blank`` on an ONNX file: the same options as for a PyTorch model (the original's greedy decodings as
    labels, the sequence accuracy in the report), through onnx2torch and back. torch.onnx names nodes after module
    paths (``/body/body.2/Conv``), which onnx2torch turns into ``body/body/2/Conv``: fine-tuning and the loss-aware
    weights of calibration find the modules all the same."""
    import json

    from test_cli import _Recogniser

    torch.manual_seed(0)
    net, x = _Recogniser().eval(), torch.rand(48, 1, 16, 24)
    src = tmp_path / "ocr.onnx"
    torch.onnx.export(net, (x[:1],), str(src), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    with torch.no_grad():
        targets = separify.ctc_greedy_targets(net(x))
    np.save(tmp_path / "tune.npy", x.numpy())
    np.savez(tmp_path / "eval.npz", images=x.numpy(), labels=targets.numpy())
    res = _cli("convert", src, "-o", tmp_path / "o.onnx", "--flops", "0.6", "--calib", tmp_path / "tune.npy",
               "--ctc-blank", "0", "--finetune",
               tmp_path / "tune.npy", "--steps", "2", "--finetune-batch-size", "16", "--data", tmp_path / "eval.npz",
               "--no-timing", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "greedy CTC decodings" in res.output and "written back" in res.output
    assert "no sensitivity" not in res.output
    rows = {q["metric"]: q for q in json.loads((tmp_path / "r.json").read_text())["quality"]}
    assert rows["sequence accuracy (greedy CTC)"]["original"]["value"] == 1.0
