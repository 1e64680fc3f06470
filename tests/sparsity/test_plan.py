from fractions import Fraction

import pytest

from compressor.errors import ConfigError
from compressor.sparsity import NM, Unstructured, parse_sparsity
from compressor.sparsity.plan import PlanError, SparsityPlan, level_sparsity

# Two LLaMA-like blocks: q/k (k narrower, as with grouped-query attention) and gate/down.
SHAPES = {
    f"model.layers.{b}.{rel}": shape
    for b in range(2)
    for rel, shape in [("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
                       ("mlp.gate_proj", (128, 64)), ("mlp.down_proj", (64, 128))]
}


def test_level_sparsity_is_exact():
    assert level_sparsity(NM(3, 8)) == Fraction(5, 8)
    assert level_sparsity(Unstructured(0.7)) == Fraction(7, 10)  # the decimal written, not the binary float


def test_exact_name_beats_regex_and_default_fills_the_rest():
    plan = SparsityPlan(default="2:4", layers={".*down_proj": "1:4", "model.layers.0.mlp.down_proj": "3:4"})
    assert plan.level_for("model.layers.0.mlp.down_proj") == NM(3, 4)
    assert plan.level_for("model.layers.1.mlp.down_proj") == NM(1, 4)
    assert plan.level_for("model.layers.1.self_attn.q_proj") == NM(2, 4)


def test_regexes_are_full_match():
    plan = SparsityPlan(default="2:4", layers={"model.layers.1": "1:4"})
    assert plan.level_for("model.layers.1.mlp.down_proj") == NM(2, 4)
    with pytest.raises(PlanError, match="matches no pruned linear"):
        plan.resolve(SHAPES)


def test_regexes_that_disagree_are_an_error_naming_layer_and_keys():
    plan = SparsityPlan(default="2:4", layers={".*down_proj": "1:4", r"model\.layers\.1\..*": "3:4"})
    with pytest.raises(PlanError, match=r"model\.layers\.1\.mlp\.down_proj.*'\.\*down_proj'"):
        plan.level_for("model.layers.1.mlp.down_proj")
    # agreeing overlaps are fine, and key order never matters
    same = SparsityPlan(default="2:4", layers={".*down_proj": "1:4", r"model\.layers\.1\..*": "1:4"})
    assert same.level_for("model.layers.1.mlp.down_proj") == NM(1, 4)


def test_key_matching_no_layer_is_an_error_naming_the_key():
    plan = SparsityPlan(default="2:4", layers={"model.layers.7.mlp.down_proj": "1:4"})
    with pytest.raises(PlanError, match=r"'model\.layers\.7\.mlp\.down_proj' matches no pruned linear"):
        plan.resolve(SHAPES)


def test_level_impossible_for_width_names_the_layer():
    shapes = {**SHAPES, "model.layers.0.mlp.up_proj": (128, 60)}
    plan = SparsityPlan(default="2:4", layers={".*up_proj": "2:8"})
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.up_proj: level 2:8 .* width 60"):
        plan.resolve(shapes)


def test_invalid_regex_and_bad_level_fail_at_parse():
    with pytest.raises(ValueError, match="valid regex"):
        SparsityPlan(default="2:4", layers={"model.layers.(": "1:4"})
    with pytest.raises(ValueError):
        SparsityPlan(default="4:4")
    with pytest.raises(ValueError):
        SparsityPlan(default="2:4", target=1.5)


def _sizes():
    return {n: o * i for n, (o, i) in SHAPES.items()}


def test_average_is_parameter_weighted_and_exact():
    # q 4096, k 2048, gate/down 8192 each, per block; total 2 * 22528
    plan = SparsityPlan(default="4:8", layers={".*gate_proj": "2:8", ".*q_proj": "6:8"})
    resolved = plan.resolve(SHAPES)
    sizes = _sizes()
    expected = sum(Fraction(6 if "gate" in n else 2 if "q_proj" in n else 4, 8) * p for n, p in sizes.items())
    assert resolved.average == expected / sum(sizes.values())
    assert resolved.parameters == 2 * 22528


def test_target_within_one_group_of_m_passes_and_beyond_fails():
    total = 2 * 22528
    # 2:4 everywhere is 0.5 exactly; a target off by exactly M=4 weights passes, by 5 fails
    at_tolerance = 0.5 + 4 / total
    SparsityPlan(default="2:4", target=at_tolerance).resolve(SHAPES)
    with pytest.raises(PlanError, match="one group of M=4"):
        SparsityPlan(default="2:4", target=0.5 + 5 / total).resolve(SHAPES)
    # a mixed plan whose average is not its declared target
    with pytest.raises(PlanError, match="not the declared target 0.5"):
        SparsityPlan(default="2:4", layers={".*q_proj": "1:4"}, target=0.5).resolve(SHAPES)
    # balanced: q (4096) one step up, k (2048) two steps down -> still 0.5
    SparsityPlan(default="4:8", layers={".*q_proj": "3:8", ".*k_proj": "6:8"}, target=0.5).resolve(SHAPES)


def test_unstructured_tolerance_is_one_weight():
    total = 2 * 22528
    SparsityPlan(default=0.7, target=0.7).resolve(SHAPES)
    with pytest.raises(PlanError, match="M=1"):
        SparsityPlan(default=0.7, target=0.7 + 2 / total).resolve(SHAPES)


def test_uniform_plan_is_todays_single_sparsity_run():
    for text in ["2:4", "1:8", 0.5, 0.7]:
        level = parse_sparsity(text)
        resolved = SparsityPlan.uniform(level).resolve(SHAPES)
        assert resolved.uniform_level == level
        assert set(resolved.levels.values()) == {level}
        assert resolved.average == level_sparsity(level)
    assert SparsityPlan(default="2:4", layers={".*q_proj": "1:4"}).resolve(SHAPES).uniform_level is None


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_round_trips_exactly(tmp_path, suffix):
    plan = SparsityPlan(default="5:8", target=0.625,
                        layers={"model.layers.0.mlp.down_proj": "3:8", r"model\.layers\.(0|1)\.self_attn\..*": "6:8",
                                ".*gate_proj": 0.3})
    path = plan.save(tmp_path / f"plan{suffix}")
    loaded = SparsityPlan.load(path)
    assert loaded == plan and list(loaded.layers) == list(plan.layers)
    again = loaded.save(tmp_path / f"again{suffix}")
    assert again.read_text() == path.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_yaml_keeps_n_colon_m_and_unquoted_fractions(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("default: 2:4\nlayers:\n  .*down_proj: 0.75\n")
    plan = SparsityPlan.load(path)
    assert plan.default == NM(2, 4) and plan.layers[".*down_proj"] == Unstructured(0.75)


def test_load_validates_against_the_model_and_names_the_file(tmp_path):
    path = SparsityPlan(default="2:4", layers={".*q_proj": "1:4"}, target=0.5).save(tmp_path / "p.yaml")
    SparsityPlan.load(path)  # without shapes: only the file's own checks
    with pytest.raises(PlanError, match=r"p\.yaml.*not the declared target"):
        SparsityPlan.load(path, SHAPES)


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        SparsityPlan.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: 2:4\nlayer: {}\n")
    with pytest.raises(ConfigError, match="`layer`: unknown key"):
        SparsityPlan.load(bad)
    with pytest.raises(PlanError, match=r"\.yaml, \.yml or \.json"):
        SparsityPlan(default="2:4").save(tmp_path / "plan.txt")


def test_from_levels_lists_the_exceptions_to_the_commonest_level():
    levels = {n: (NM(3, 8) if "q_proj" in n else NM(5, 8)) for n in SHAPES}
    plan = SparsityPlan.from_levels(levels)
    assert plan.default == NM(5, 8) and set(plan.layers) == {n for n in SHAPES if "q_proj" in n}
    assert plan.resolve(SHAPES).levels == levels


def test_table_rows():
    rows = SparsityPlan(default=0.6, layers={".*down_proj": 0.7}).resolve(SHAPES).table()
    assert rows[3] == {"name": "model.layers.0.mlp.down_proj", "out": 64, "in": 128, "level": "0.7", "sparsity": 0.7}
