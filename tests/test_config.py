"""``ConvertConfig`` in sections: flat keywords and sections agree, ``replace`` keeps the rank selection and the
latency objective consistent, ``from_dict``/``from_toml`` read what ``sections()`` writes, and every bad input is
one :class:`ConfigError` that names the problem."""

from __future__ import annotations


import pytest

from separify.config import (CPSolver, Calibration, ConvertConfig, LatencySettings, LatencyTarget, LayerRule,
                             RankSelection)
from separify.errors import ConfigError


# --- flat keywords and sections

@pytest.mark.parametrize("flat, sections", [
    (dict(flops=0.3), dict(ranks={"flops": 0.3})),
    (dict(method="dw-pw", rank=4), dict(ranks=RankSelection(method="dw-pw", rank=4))),
    (dict(energy=0.9, require_saving=False), dict(ranks={"energy": 0.9, "require_saving": False})),
    (dict(calib_limit=256, calib_steps=20, calib_als=0, calib_whiten=True),
     dict(calibration={"limit": 256, "steps": 20, "als": 0, "whiten": True})),
    (dict(objective="latency", target="onnxruntime", margin=0.1, latency_cache=False),
     dict(latency={"objective": "latency", "target": "onnxruntime", "margin": 0.1, "cache": False})),
    (dict(latency=0.6), dict(ranks={"latency": 0.6}, latency={"objective": "latency"})),
    (dict(cp_max_iter=7, cp_tol=1e-3), dict(cp=CPSolver(max_iter=7, tol=1e-3))),
], ids=["flops", "rank", "energy", "calibration", "latency", "budget", "cp"])
def test_flat_keywords_and_sections_give_equal_configs(flat, sections):
    a, b = ConvertConfig(**flat), ConvertConfig(**sections)
    assert a == b
    assert a.sections() == b.sections() and a.to_dict() == b.to_dict()


def test_flat_keywords_land_in_their_sections():
    cfg = ConvertConfig(flops=0.3, calib_limit=64, margin=0.2, objective="latency", cp_max_iter=3, seed=5)
    assert cfg.ranks.flops == 0.3 and cfg.selection == "flops"
    assert cfg.calibration == Calibration(limit=64)
    assert cfg.latency.margin == 0.2 and cfg.target == LatencyTarget()
    assert cfg.cp.max_iter == 3 and cfg.cp_sweeps(refitted=True) == 3
    assert cfg.seed == 5
    assert not hasattr(cfg, "calib_limit")  # the flat names are keywords, not attributes
    assert cfg.to_dict()["calib_limit"] == 64


def test_defaults():
    cfg = ConvertConfig()
    assert cfg.method == "pw-dw-pw" and cfg.selection == "flops" and cfg.ranks.flops == 0.5
    assert cfg.objective == "flops" and cfg.target is None
    assert cfg.calibration.limit == 1000 and cfg.latency.margin == 0.05
    assert cfg.cp_sweeps(refitted=False) == 25 and cfg.cp_sweeps(refitted=True) == 5
    assert ConvertConfig(calib_als=0).cp_sweeps(refitted=True) == 25


def test_flat_keywords_win_over_a_section():
    cfg = ConvertConfig(calibration={"limit": 10, "steps": 3}, calib_limit=20)
    assert cfg.calibration.limit == 20 and cfg.calibration.steps == 3


# --- replace

def test_replace_one_selection_clears_the_others():
    cfg = ConvertConfig(rank=4, method="dw-pw", calib_limit=32)
    assert cfg.replace(flops=0.3).ranks == RankSelection(method="dw-pw", flops=0.3)
    assert cfg.replace(energy=0.9).selection == "energy"
    lat = cfg.replace(latency=0.6)
    assert lat.selection == "latency" and lat.ranks.rank is None and lat.objective == "latency"
    assert cfg.replace(seed=3).ranks.rank == 4  # other changes keep the selection
    assert cfg.replace(flops=0.3).calibration.limit == 32
    with pytest.raises(ConfigError, match="give only one of rank, energy, flops and latency"):
        cfg.replace(rank=2, flops=0.5)


def test_replace_objective_flops_clears_target_and_budget():
    cfg = ConvertConfig(latency=0.6, target="onnxruntime", objective="latency", margin=0.2)
    assert cfg.target.backend == "onnxruntime" and cfg.ranks.latency == 0.6
    back = cfg.replace(objective="flops")
    assert back.objective == "flops" and back.target is None and back.ranks.latency is None
    assert back.selection == "flops" and back.ranks.flops == 0.5  # the default selection again
    assert back.latency.margin == 0.2


def test_a_latency_budget_implies_the_latency_objective():
    assert ConvertConfig(latency=0.6).objective == "latency"
    assert ConvertConfig(latency=0.6).target == LatencyTarget()
    assert ConvertConfig(rank=4).replace(latency=0.5).objective == "latency"
    assert ConvertConfig.from_dict({"ranks": {"latency": 0.5}}).objective == "latency"
    assert ConvertConfig(target="cpu").objective == "latency"  # so does a target
    with pytest.raises(ConfigError, match="needs objective='latency'"):
        ConvertConfig(objective="flops", target="cpu")


def test_replace_keeps_whole_pass_settings_and_rejects_unknown_keys():
    cfg = ConvertConfig(exclude="layer4.*", fold_bn=False, seed=2, tracer="module")
    new = cfg.replace(flops=0.4)
    assert (new.exclude, new.fold_bn, new.seed, new.tracer) == (("layer4.*",), False, 2, "module")
    with pytest.raises(ConfigError, match="unknown config key 'flop'"):
        cfg.replace(flop=0.4)


# --- from_dict, from_toml and sections()

def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(value)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").isalnum() else _toml_value(key)


def to_toml(data: dict) -> str:
    """Plain data as TOML (no null in TOML: ``None`` values are left out, which means "the default")."""
    top = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{_toml_key(f)} = {_toml_value(x)}" for f, x in v.items() if x is not None)
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


CONFIGS = {
    "default": ConvertConfig(),
    "rank": ConvertConfig(method="dw-pw", rank=3, require_saving=False, exclude=("stem",), fold_bn=False, seed=7),
    "calibration": ConvertConfig(energy=0.95, calib_limit=128, calib_steps=50, calib_als=2, calib_whiten=True,
                                 calib_memory_gb=1.5, cp_max_iter=11, cp_tol=1e-5, tracer="fx"),
    "latency": ConvertConfig(objective="latency", latency=0.7, margin=0.1, latency_cache="/tmp/lat.json",
                             target=LatencyTarget("cpu", batch_size=8, dtype="bfloat16", channels_last=True,
                                                  threads=2, min_run_time=0.1)),
    "rules": ConvertConfig(flops=0.4, rules=[LayerRule("layer4.*", method="dw-pw", rank=2),
                                             LayerRule("fc*", exclude=True), LayerRule("layer1.0.*", energy=0.9)]),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_from_dict_reads_what_sections_writes(name):
    cfg = CONFIGS[name]
    assert ConvertConfig.from_dict(cfg.sections()) == cfg


@pytest.mark.parametrize("name", CONFIGS)
def test_from_toml_reads_what_sections_writes(name, tmp_path):
    cfg = CONFIGS[name]
    path = tmp_path / "conv.toml"
    path.write_text(to_toml(cfg.sections()), encoding="utf-8")
    assert ConvertConfig.from_toml(path) == cfg
    assert ConvertConfig.from_toml(str(path)) == cfg


def test_a_hand_written_toml_file(tmp_path):
    path = tmp_path / "conv.toml"
    path.write_text('exclude = ["fc"]\nseed = 3\ncalib_steps = 5   # flat keys at the top level are accepted\n\n'
                    '[ranks]\nmethod = "dw-pw"\nflops = 0.3\n\n[calibration]\nlimit = 64\n\n'
                    '[latency]\nobjective = "latency"\nmargin = 0.1\n\n[latency.target]\nbackend = "cpu"\n'
                    'threads = 1\n\n[rules."layer4.*"]\nrank = 2\n', encoding="utf-8")
    cfg = ConvertConfig.from_toml(path)
    assert cfg == ConvertConfig(method="dw-pw", flops=0.3, calib_limit=64, calib_steps=5, objective="latency",
                                margin=0.1, target=LatencyTarget(threads=1), exclude=("fc",), seed=3,
                                rules=[LayerRule("layer4.*", rank=2)])


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "conv.toml"
    path.write_text('seed = 1\n[ranks]\nmethod = "dw-pw"\nflops = 0.3\n[calibration]\nlimit = 64\nsteps = 5\n',
                    encoding="utf-8")
    cfg = ConvertConfig.from_toml(path, rank=4, calib_limit=8, seed=2)
    assert cfg.ranks == RankSelection(method="dw-pw", rank=4)  # the file's flops gives way to the rank
    assert cfg.calibration == Calibration(limit=8, steps=5)
    assert cfg.seed == 2
    assert ConvertConfig.from_toml(path, method="pw-dw-pw").ranks.flops == 0.3
    assert ConvertConfig.from_toml(path, latency=0.5).objective == "latency"
    assert ConvertConfig.from_toml(path) == ConvertConfig.from_toml(path, **{})


# --- errors: one ConfigError, a message that says what is wrong

def _one_error(match: str, build) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        build()
    message = str(info.value)
    assert "\n" not in message.strip(), message
    return message


def test_unknown_keys():
    message = _one_error("unknown config key", lambda: ConvertConfig.from_dict({"flop": 0.5, "ranks": {}}))
    assert "flop" in message and "sections: ranks, calibration, latency, cp" in message
    _one_error(r"unknown config key\(s\): calib_limt", lambda: ConvertConfig(calib_limt=3))


def test_unknown_section_keys():
    message = _one_error(r"unknown key\(s\) in \[calibration\]: limt",
                         lambda: ConvertConfig.from_dict({"calibration": {"limt": 5}}))
    assert "known: " in message and "limit" in message
    _one_error(r"in \[ranks\]: flop", lambda: ConvertConfig.from_dict({"ranks": {"flop": 0.5}}))
    _one_error("bad latency target", lambda: ConvertConfig.from_dict(
        {"latency": {"objective": "latency", "target": {"backnd": "cpu"}}}))
    _one_error("the Calibration section must be a Calibration or a mapping",
               lambda: ConvertConfig.from_dict({"calibration": 5}))


@pytest.mark.parametrize("data, match", [
    ({"ranks": {"flops": 2}}, r"the FLOPs target must be a number in \(0, 1\]"),
    ({"ranks": {"method": "tucker"}}, "unknown method 'tucker'"),
    ({"ranks": {"rank": 2, "energy": 0.9}}, "give only one of"),
    ({"calibration": {"limit": 0}}, "calib_limit must be a positive integer"),
    ({"latency": {"objective": "speed"}}, "objective must be one of flops, latency"),
    ({"latency": {"objective": "latency", "target": "tpu"}}, "unknown latency target 'tpu'"),
    ({"cp": {"max_iter": -1}}, "cp_max_iter must be a non-negative integer"),
    ({"tracer": "jit"}, "tracer must be one of"),
    ({"seed": "x"}, "seed must be an integer"),
])
def test_bad_values(data, match):
    _one_error(match, lambda: ConvertConfig.from_dict(data))


def test_bad_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[ranks\nflops = 0.5\n", encoding="utf-8")
    message = _one_error("is not valid TOML", lambda: ConvertConfig.from_toml(bad))
    assert str(bad) in message and "line 1" in message
    missing = tmp_path / "missing.toml"
    _one_error("does not exist", lambda: ConvertConfig.from_toml(missing))
    _one_error("cannot read config file", lambda: ConvertConfig.from_toml(tmp_path))  # a directory
    (tmp_path / "latin1.toml").write_bytes(b"seed = 1 # caf\xe9\n")
    _one_error("cannot read config file", lambda: ConvertConfig.from_toml(tmp_path / "latin1.toml"))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[calibration]\nlimt = 5\n", encoding="utf-8")
    _one_error(r"unknown key\(s\) in \[calibration\]", lambda: ConvertConfig.from_toml(unknown))


# --- edge cases: a budget with a target, sections vs the latency budget, bad rules

def test_a_latency_budget_with_a_target():
    cfg = ConvertConfig(latency=0.6, target="onnxruntime")
    assert cfg.objective == "latency" and cfg.target.backend == "onnxruntime"


@pytest.mark.parametrize("change", [dict(latency=None), dict(latency={"margin": 0.1}),
                                    dict(latency=LatencySettings(objective="latency"))],
                         ids=["budget-none", "section-mapping", "section"])
def test_changing_the_latency_section_keeps_the_rank(change):
    assert ConvertConfig(rank=4).replace(**change).ranks.rank == 4


def test_a_none_selection_keyword_changes_nothing():
    assert ConvertConfig(ranks={"rank": 4}, flops=None).ranks.rank == 4


def test_a_boolean_latency_is_refused():
    with pytest.raises(ConfigError):
        ConvertConfig.from_dict({"latency": True})


@pytest.mark.parametrize("rules", [{"layer4.*": {"rnk": 2}}, {"layer4.*": 2}, 3],
                         ids=["unknown-field", "not-a-table", "not-a-list"])
def test_bad_rules_are_config_errors(rules):
    with pytest.raises(ConfigError):
        ConvertConfig.from_dict({"rules": rules})
