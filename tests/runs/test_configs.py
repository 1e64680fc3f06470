"""Every shipped config loads; bad configs fail at load with a message naming the field."""

from pathlib import Path

import pytest

from compressor.cli import main
from compressor.config.base import load_config
from compressor.errors import ConfigError
from compressor.runs.prune import PruneConfig
from compressor.sparsity import NM, Unstructured

ROOT = Path(__file__).resolve().parents[2]
PRUNE_CONFIGS = sorted((ROOT / "configs" / "prune").glob("*.yaml")) + [ROOT / "configs" / "quickstart.yaml"]


@pytest.mark.parametrize("path", PRUNE_CONFIGS, ids=lambda p: p.name)
def test_shipped_prune_configs_validate(path):
    cfg = load_config(PruneConfig, path)
    assert cfg.sparsity == NM(2, 4)


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, field",
    [
        ("methd: wanda\n", "methd"),  # misspelt key
        ("method: obs\n", "method"),
        ("sparsity: '4:4'\n", "sparsity"),
        ("sparsity: '3:2'\n", "sparsity"),
        ("sparsity: 1.5\n", "sparsity"),
        ("calibration: {num_windows: -3}\n", "calibration.num_windows"),
        ("sparsegpt: {damp: 2}\n", "sparsegpt.damp"),
        ("executor: {kind: slurm}\n", "executor.kind"),
        ("model: {dtype: int8}\n", "model.dtype"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=f"`{field}"):
        load_config(PruneConfig, _write(tmp_path, text))


def test_unquoted_nm_in_yaml_and_overrides(tmp_path):
    cfg = load_config(PruneConfig, _write(tmp_path, "sparsity: 2:8\n"), ["calibration.seq_len=128"])
    assert cfg.sparsity == NM(2, 8) and cfg.calibration.seq_len == 128
    cfg = load_config(PruneConfig, _write(tmp_path, "{}\n"), ["sparsity=0.6"])
    assert cfg.sparsity == Unstructured(0.6)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PruneConfig, _write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PruneConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(PruneConfig, _write(tmp_path, "- 1\n- 2\n"))


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    code = main(["prune", "--config", str(_write(tmp_path, "sparsity: '5:4'\n")), "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "sparsity" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


LEARN_CONFIGS = sorted((ROOT / "configs" / "learn").glob("*.yaml"))
DISTRIBUTED_CONFIGS = sorted((ROOT / "configs" / "distributed").glob("*.yaml"))


@pytest.mark.parametrize("path", LEARN_CONFIGS, ids=lambda p: p.name)
def test_shipped_learn_configs_validate(path):
    from compressor.training.config import LearnConfig

    cfg = load_config(LearnConfig, path)
    assert cfg.sparsity == NM(2, 4)
    assert cfg.method.kind == {"srste.yaml": "srste", "pdp.yaml": "pdp", "bdwp.yaml": "bdwp",
                               "fixed_mask.yaml": "fixed_mask"}.get(path.name, "maskllm")


@pytest.mark.parametrize("path", DISTRIBUTED_CONFIGS, ids=lambda p: p.name)
def test_shipped_distributed_configs_validate(path):
    from compressor.parallel.config import DistributedLearnConfig

    assert load_config(DistributedLearnConfig, path).method.kind == "maskllm"


SEARCH_CONFIGS = sorted((ROOT / "configs" / "search").glob("*.yaml"))


@pytest.mark.parametrize("path", SEARCH_CONFIGS, ids=lambda p: p.name)
def test_shipped_search_configs_validate(path):
    from compressor.search.config import SearchConfig

    cfg = load_config(SearchConfig, path)
    assert len(cfg.level_set) >= 2 and cfg.fitness.seed != cfg.calibration.seed
    assert cfg.calibration.data.source.endswith("wiki.valid.tokens")
    assert cfg.evaluation.data.source.endswith("wiki.test.raw") and not cfg.evaluation.enabled  # `--evaluate`


def test_the_shipped_recipe_chains_its_prune_into_its_training():
    """configs/recipes: step 2 trains the model and mask step 1 writes, on the general corpus (never WikiText),
    in bf16, with a decaying learning rate."""
    from compressor.training.config import LearnConfig

    recipes = ROOT / "configs" / "recipes"
    prune = load_config(PruneConfig, recipes / "smollm2_24_cpu_3h_prune.yaml")
    train = load_config(LearnConfig, recipes / "smollm2_24_cpu_3h_train.yaml")
    assert prune.sparsity == train.sparsity == NM(2, 4) and prune.precision.statistics == "bfloat16"
    assert "wiki.valid.tokens" in prune.calibration.data.source
    out = "runs/recipe-24/prune"  # the --output of step 1 in the files' comments
    assert (recipes / "smollm2_24_cpu_3h_prune.yaml").read_text().count(f"--output {out}") == 1
    assert train.model.source == f"{out}/model" and train.prior.path == out
    assert train.train.data.source == "corpus:train" and train.precision.compute == "bfloat16"
    assert train.train.lr_scale_at(train.train.steps - 1) < train.train.lr_scale_at(train.train.warmup_steps)
