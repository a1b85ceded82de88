"""What the report says about ONNX models: file sizes count the external-data files, and layers are named after
the layers they came from (the weight's name, the exporter's metadata or a TorchScript node name), with the node
name kept as the record's identity and in the row's note; ``exclude`` matches either name."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from separify.backends.onnx import onnx_file_bytes, source_names
from separify.pipeline import convert_onnx
from separify.reporting import report_onnx

FAST = dict(latency=False, random_samples=4)


def _export(model: nn.Module, path: Path, shape=(1, 64, 12, 12), dynamo: bool = False) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(shape),), str(path), dynamo=dynamo)
    if dynamo:  # the dynamo exporter may write its weights beside the file; keep one self-contained file
        onnx.save_model(onnx.load(str(path)), str(path))
    return path


def _two_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))


class _Named(nn.Module):
    """``features.conv1`` (a BatchNorm after it, which TorchScript folds into a weight named ``onnx::Conv_N``),
    ``head`` (its own weight name)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv2d(8, 16, 3, padding=1))
        self.features.add_module("bn", nn.BatchNorm2d(16))
        self.features.add_module("relu", nn.ReLU())
        self.head = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.head(self.features(x))


def _external(path: Path, folder: Path, one_file: bool = True) -> Path:
    """``path``'s model saved in ``folder`` with every tensor in external data."""
    folder.mkdir(exist_ok=True)
    out = folder / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(out), save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location="model.onnx.data" if one_file else None, size_threshold=0)
    return out


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ------------------------------------------------------------------------------------------------- file sizes


def test_the_size_of_a_model_with_external_data_counts_its_data_file(tmp_path):
    plain = _export(_two_convs(), tmp_path / "plain.onnx")
    model = _external(plain, tmp_path / "ext")
    data = model.parent / "model.onnx.data"
    assert data.is_file() and model.stat().st_size < 10_000  # the header alone is small
    assert onnx_file_bytes(model) == model.stat().st_size + data.stat().st_size
    assert onnx_file_bytes(model) > 2 * 64 * 64 * 9 * 4  # both weights are counted
    assert onnx_file_bytes(plain) == plain.stat().st_size  # no external data: the file alone


def test_one_file_per_tensor_each_counted_once_and_a_missing_one_does_not_crash(tmp_path):
    model = _external(_export(_two_convs(), tmp_path / "plain.onnx"), tmp_path / "ext", one_file=False)
    files = [p for p in model.parent.iterdir() if p != model]
    assert len(files) == 4  # two weights, two biases
    assert onnx_file_bytes(model) == _folder_bytes(model.parent)
    whole = onnx_file_bytes(model)
    missing = max(files, key=lambda p: p.stat().st_size)
    size = missing.stat().st_size
    missing.unlink()
    assert onnx_file_bytes(model) == whole - size == _folder_bytes(model.parent)  # what exists


def test_a_file_that_is_not_onnx_counts_alone(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\xff\xff\xff not a model")
    assert onnx_file_bytes(junk) == junk.stat().st_size


def test_the_report_counts_external_data_of_both_models(tmp_path):
    model = _external(_export(_two_convs(), tmp_path / "plain.onnx"), tmp_path / "ext")
    res = convert_onnx(model, method="dw-pw", rank=4)
    out = tmp_path / "out" / "converted.onnx"
    out.parent.mkdir()
    written = res.save(out)
    assert len(written) == 2  # the converted model keeps its data in a file beside it, as the original did
    rep = report_onnx(model, out, result=res, **FAST)
    assert rep.original.file_bytes == _folder_bytes(model.parent)
    assert rep.converted.file_bytes == _folder_bytes(out.parent) == sum(p.stat().st_size for p in written)
    assert rep.converted.file_bytes < rep.original.file_bytes  # rank 4 dw-pw holds fewer weights
    assert rep.to_dict()["models"]["original"]["file_size"] == {"value": rep.original.file_bytes, "unit": "byte"}


def test_a_pytorch_report_counts_the_external_data_of_an_onnx_file(tmp_path):
    import separify

    net = _two_convs().eval()
    model = _external(_export(net, tmp_path / "plain.onnx"), tmp_path / "ext")
    rep = separify.report(net, net, example_inputs=torch.randn(1, 64, 12, 12), files=(tmp_path / "plain.onnx", model),
                          latency=False, per_layer=False, random_samples=4)
    assert rep.original.file_bytes == (tmp_path / "plain.onnx").stat().st_size
    assert rep.converted.file_bytes == _folder_bytes(model.parent)


# ------------------------------------------------------------------------------------------------- layer names


def test_a_torchscript_export_names_rows_and_records_after_the_modules(tmp_path):
    path = _export(_two_convs(), tmp_path / "seq.onnx")
    res = convert_onnx(path, method="dw-pw", rank=4)
    assert [r.name for r in res.layers] == ["/0/Conv", "/2/Conv"]  # the records' identity: the node names
    assert [res.source_name(r) for r in res.layers] == ["0", "2"]
    assert [d["source_name"] for d in res.to_dict()["layers"]] == ["0", "2"]
    out = tmp_path / "out.onnx"
    res.save(out)
    rep = report_onnx(path, out, result=res, **FAST)
    assert [row.name for row in rep.layers] == ["0", "2"]
    assert [row.status for row in rep.layers] == ["converted", "converted"]
    assert all(row.note.startswith(f"node /{n}/Conv") for row, n in zip(rep.layers, "02"))
    assert [row["name"] for row in rep.to_dict()["layers"]] == ["0", "2"]


def test_a_folded_batchnorm_weight_takes_its_name_from_the_torchscript_node(tmp_path):
    path = _export(_Named(), tmp_path / "named.onnx", shape=(1, 8, 12, 12))
    weights = [n.input[1] for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert weights[0].startswith("onnx::") and weights[1] == "head.weight"  # what the two sources are
    assert list(source_names(ir.load(str(path))).values()) == ["features.conv1", "head"]


def test_a_dynamo_export_names_rows_after_the_modules(tmp_path):
    pytest.importorskip("onnxscript")
    path = _export(_Named(), tmp_path / "named.onnx", shape=(1, 8, 12, 12), dynamo=True)
    names = source_names(ir.load(str(path)))
    assert all(not n.startswith("/") for n in names)  # node names such as node_Conv_8
    assert list(names.values()) == ["features.conv1", "head"]
    res = convert_onnx(path, method="dw-pw", rank=4)
    out = tmp_path / "out.onnx"
    res.save(out)
    rep = report_onnx(path, out, result=res, **FAST)
    assert [row.name for row in rep.layers] == ["features.conv1", "head"]
    assert [row.note.split(";")[0] for row in rep.layers] == [f"node {n}" for n in names]


def _graph(convs: list[tuple[str, str, dict]], channels: int = 4) -> onnx.ModelProto:
    """A chain of Conv nodes ``(node name, weight name, metadata)``, 3×3, ``channels`` in and out."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, (name, weight, meta) in enumerate(convs):
        inits.append(numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32),
                                             weight))
        node = helper.make_node("Conv", [prev, weight], [f"y{i}"], name=name, kernel_shape=[3, 3],
                                pads=[1, 1, 1, 1])
        for k, v in meta.items():
            node.metadata_props.add(key=k, value=v)
        nodes.append(node)
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, channels, 8, 8])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_a_graph_without_source_names_keeps_its_node_names(tmp_path):
    proto = _graph([("conv0", "w0", {}), ("conv1", "w1", {})])
    res = convert_onnx(proto, method="dw-pw", rank=2)
    assert [res.source_name(r) for r in res.layers] == ["conv0", "conv1"]
    path, out = tmp_path / "g.onnx", tmp_path / "out.onnx"
    onnx.save_model(proto, str(path))
    res.save(out)
    rep = report_onnx(path, out, result=res, **FAST)
    assert [row.name for row in rep.layers] == ["conv0", "conv1"]
    assert not any((row.note or "").startswith("node ") for row in rep.layers)


def test_metadata_scopes_and_node_names_and_clashes():
    scopes = {"pkg.torch.onnx.name_scopes": "['', 'block', 'block.conv', 'conv2d_3']"}
    namespace = {"namespace": ": Net/stem: torch.nn.modules.conv.Conv2d/conv2d: aten.conv2d.default"}
    fused = dict(scopes, **{"pkg.onnxscript.rewriter.rule_name": "FuseBatchNormIntoConv"})
    proto = _graph([("node_Conv_1", "val_1", scopes), ("node_Conv_2", "val_2", namespace),
                    ("node_Conv_3", "val_3", fused), ("/layer1/layer1.0/downsample/downsample.0/Conv", "w4", {}),
                    ("node_Conv_5", "stem.weight", {})])
    names = source_names(ir.from_proto(proto))
    # "stem" twice (metadata of node 2, weight of node 5): neither takes it
    assert names == {"node_Conv_1": "block.conv", "node_Conv_2": "node_Conv_2", "node_Conv_3": "node_Conv_3",
                     "/layer1/layer1.0/downsample/downsample.0/Conv": "layer1.0.downsample.0",
                     "node_Conv_5": "node_Conv_5"}
    alone = _graph([("node_Conv_2", "val_2", namespace)])
    assert source_names(ir.from_proto(alone)) == {"node_Conv_2": "stem"}


# ------------------------------------------------------------------------------------------------- name patterns


def test_exclude_matches_the_source_name_or_the_node_name(tmp_path):
    path = _export(_two_convs(), tmp_path / "seq.onnx")
    for pattern in ("2", "/2/*"):
        res = convert_onnx(path, method="dw-pw", rank=4, exclude=(pattern,))
        assert [r.status for r in res.layers] == ["converted", "skipped"], pattern
        assert res.layers[1].reason == f"excluded by pattern {pattern!r}"
    res = convert_onnx(path, method="dw-pw", rank=4, rules={"0": {"exclude": True}})
    assert [r.status for r in res.layers] == ["skipped", "converted"]
    assert res.layers[0].reason == "excluded by pattern '0'"


def test_a_node_name_rule_wins_over_a_source_name_exclusion_rule(tmp_path):
    path = _export(_two_convs(), tmp_path / "seq.onnx")
    res = convert_onnx(path, method="dw-pw", rules={"/0/*": {"rank": 2}, "0": {"exclude": True}}, rank=4)
    assert [r.status for r in res.layers] == ["converted", "converted"]
    assert res.layers[0].rank == 2


def test_a_rank_rule_by_source_name_warns_that_rules_match_node_names(tmp_path):
    path = _export(_two_convs(), tmp_path / "seq.onnx")
    with pytest.warns(UserWarning, match="matches only the source names"):
        res = convert_onnx(path, method="dw-pw", rank=4, rules={"2": {"rank": 2}})
    assert [r.rank for r in res.layers] == [4, 4]
    assert any("matches only the source names" in w and "'2'" in w for w in res.warnings)
