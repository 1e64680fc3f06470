"""Issue 14, case by case, through the command line: no command loses a user's files, runs code from a
file, or vouches for data it did not check."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file, save_file

from compressor.checkpoints.load import load_compressed_model
from compressor.cli import main
from compressor.errors import CheckpointError
from compressor.training.checkpoint import latest_checkpoint, rng_state, save_checkpoint
from tests.utils.test_run_folder import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def said(capsys, caplog):
    """What the commands reported since the last call: log records and printed errors, unwrapped."""
    def read() -> str:
        text = caplog.text + capsys.readouterr().err
        caplog.clear()
        return text
    return read


def _prune_cfg(tmp_path, model, text, **extra):
    cfg = {"model": {"source": str(model)}, "method": "wanda", "executor": {"kind": "inprocess"},
           "calibration": {"data": {"source": str(text)}, "num_windows": 4, "seq_len": 32, "batch_size": 4},
           "evaluation": {"enabled": False}, **extra}
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def model_copy(tmp_path, tiny_llama_dir):
    folder = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_llama_dir, folder)
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama_dir, wikitext_dir):
    """A finished prune run (2:4 Wanda) of the tiny LLaMA."""
    root = tmp_path_factory.mktemp("finished")
    text = root / "text.txt"
    text.write_text((wikitext_dir / "wiki.valid.tokens").read_text()[:20_000])
    out = root / "run"
    assert main(["prune", "--config", _prune_cfg(root, tiny_llama_dir, text), "--output", str(out)]) == 0
    return out


# 1. the input model as the output of --overwrite
@pytest.mark.parametrize("output", ["model", "inside", "parent"])
def test_1_output_overlapping_the_input_model_is_refused_and_the_model_kept(tmp_path, model_copy, text_file,
                                                                               output, said):
    out = {"model": model_copy, "inside": model_copy / "run", "parent": model_copy.parent}[output]
    before = snapshot(tmp_path / "models")
    cfg = _prune_cfg(tmp_path, model_copy, text_file)
    assert main(["prune", "--config", cfg, "--output", str(out), "--overwrite"]) == 2
    assert "model.source" in said()
    assert snapshot(tmp_path / "models") == before


# 2. --overwrite on a folder of the user's own files
def test_2_overwrite_never_deletes_a_folder_compressor_did_not_create(tmp_path, tiny_llama_dir, text_file, said):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub" / "data.csv").write_text("1,2,3")
    before = snapshot(mine)
    for flag in ("--overwrite", "--resume"):
        assert main(["prune", "--config", _prune_cfg(tmp_path, tiny_llama_dir, text_file), "--output", str(mine),
                     flag]) == 2
        assert "did not create" in said()
    assert snapshot(mine) == before


# 3. export into the run's own model folder
def test_3_export_into_its_own_source_is_refused(finished_run, tmp_path, said):
    before = snapshot(finished_run)
    for out in (finished_run / "model", finished_run, finished_run / "model" / "export"):
        assert main(["export", str(finished_run), str(out), "--overwrite"]) == 2
        assert "export source" in said()
    assert snapshot(finished_run) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["export", str(finished_run), str(mine), "--overwrite"]) == 2
    assert (mine / "notes.txt").read_text() == "keep"
    # an earlier export is replaced, only once the new one is complete
    out = tmp_path / "export"
    assert main(["export", str(finished_run), str(out)]) == 0
    assert main(["export", str(finished_run), str(out)]) == 2
    assert main(["export", str(finished_run), str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"


class _Payload:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def _learn_cfg(tmp_path, model, text, steps=4):
    cfg = {"model": {"source": str(model)}, "maskllm": {"sparsity": "2:4", "logits_lr": 0.05},
           "prior": {"kind": "magnitude"}, "evaluation": {"enabled": False},
           "train": {"data": {"source": str(text)}, "seq_len": 32, "micro_batch_size": 2, "grad_accum": 1,
                     "steps": steps, "log_every": 2, "eval_every": 100, "checkpoint_every": 2}}
    path = tmp_path / "learn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# 4. a crafted pickle in a checkpoint folder
def test_4_resume_runs_no_code_from_a_checkpoint(tmp_path, tiny_llama_dir, text_file, monkeypatch, said):
    import compressor.training.loop as loop

    real_save = loop._save

    def save_then_die(root, step, *args, **kwargs):
        real_save(root, step, *args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first checkpoint

    out, ran = tmp_path / "run", tmp_path / "payload-ran"
    cfg = _learn_cfg(tmp_path, tiny_llama_dir, text_file)
    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(["learn", "--config", cfg, "--output", str(out)])
    monkeypatch.setattr(loop, "_save", real_save)
    step = latest_checkpoint(out / "checkpoints")
    assert sorted(p.name for p in step.iterdir()) == ["meta.json", "rank00000.json", "rank00000.safetensors",
                                                      "shared.json", "shared.safetensors"]  # no pickle anywhere
    payload = pickle.dumps(_Payload(ran))
    for victim in ("shared.safetensors", "rank00000.json"):
        saved = (step / victim).read_bytes()
        (step / victim).write_bytes(payload)
        assert main(["learn", "--config", cfg, "--output", str(out), "--resume"]) == 2
        assert str(step / victim) in said()
        (step / victim).write_bytes(saved)
    assert not ran.exists()
    assert main(["learn", "--config", cfg, "--output", str(out), "--resume"]) == 0


# 5. a compressed export without its manifest and with a corrupt value
def test_5_an_unverified_source_is_checked_in_full_or_trusted_explicitly(finished_run, tmp_path, said):
    export = tmp_path / "export"
    assert main(["export", str(finished_run), str(export), "--shard-size", "200KB"]) == 0
    (export / "manifest.json").unlink()
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.gate_proj.compressed"
    shard = export / index[key]
    tensors = load_file(str(shard))
    tensors[key].view(-1)[7] = float("nan")  # one corrupt value
    save_file(tensors, str(shard), metadata={"format": "pt"})

    assert main(["export", str(export), str(tmp_path / "dense"), "--to", "dense"]) == 2
    err = said()
    assert shard.name in err and "model.layers.1.mlp.gate_proj.weight" in err and "NaN" in err
    assert not (tmp_path / "dense").exists()
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_compressed_model(export)

    assert main(["export", str(export), str(tmp_path / "dense"), "--to", "dense", "--trust-unverified"]) == 0
    assert not (tmp_path / "dense" / "manifest.json").exists()  # nothing vouches for unverified data
    with pytest.raises(CheckpointError, match="NaN or infinite"):  # so every later read checks it in full
        load_compressed_model(tmp_path / "dense")


# 6. a write that fails (a file-size limit stands in for a full disk)
def test_6_a_failed_write_names_the_file_and_the_run_resumes(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "compressor.cli", "prune", "--config",
           _prune_cfg(tmp_path, tiny_llama_dir, text_file), "--output", str(out)]

    def small_files():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # block results fit, the model does not

    env = {**os.environ, "PYTHONPATH": ROOT}
    failed = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_files, env=env, cwd=ROOT)
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr
    assert "cannot write" in failed.stderr and "File too large" in failed.stderr and str(out) in failed.stderr
    assert not list(out.rglob("*.tmp"))  # temporary files are gone
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed: 2 finished blocks" in resumed.stderr and (out / "report.json").is_file()


# 7. a folder that is not a run
@pytest.mark.parametrize("kind", ["notes", "model"])
def test_7_a_folder_that_is_not_a_run_is_never_resumed_into(tmp_path, model_copy, text_file, kind, said):
    folder = tmp_path / "notes" if kind == "notes" else model_copy
    if kind == "notes":
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    cfg = _prune_cfg(tmp_path, model_copy if kind == "notes" else "smollm2-135m", text_file)
    for flags in ([], ["--resume"]):
        assert main(["prune", "--config", cfg, "--output", str(folder), *flags]) == 2
        err = said()
        assert "unfinished" not in err and ("did not create" in err or "model.source" in err)
    assert snapshot(folder) == before


# 8. a run that fails before its first result blocks nothing
def test_8_a_failed_run_leaves_nothing_that_blocks_the_rerun(tmp_path, tiny_llama_dir, text_file, said):
    out = tmp_path / "run"
    bad = _prune_cfg(tmp_path, tiny_llama_dir, tmp_path / "missing.txt")
    assert main(["prune", "--config", bad, "--output", str(out)]) == 2
    assert "missing.txt" in said() and not out.exists()
    good = _prune_cfg(tmp_path, tiny_llama_dir, text_file)
    assert main(["prune", "--config", good, "--output", str(out)]) == 0


def test_8_killed_before_the_first_result_the_fixed_config_runs_with_or_without_resume(tmp_path, tiny_llama_dir,
                                                                                       text_file):
    from compressor.utils.run_folder import open_run_folder

    for flags in ([], ["--resume"]):
        out = tmp_path / f"run{len(flags)}"
        open_run_folder(out, "prune")  # then killed while loading: only the marker and a config
        (out / "config.yaml").write_text("method: magnitude\n")
        assert main(["prune", "--config", _prune_cfg(tmp_path, tiny_llama_dir, text_file), "--output", str(out),
                     *flags]) == 0


def test_8_latest_naming_an_incomplete_step_falls_back_to_the_complete_one(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, 0, {"x": 1}, {"rng": rng_state()})
    save_checkpoint(root, 4, 0, {"x": 2}, {"rng": rng_state()})
    (root / "step_0000004" / "meta.json").unlink()  # damaged after the fact
    assert latest_checkpoint(root).name == "step_0000002" and "newest complete" in caplog.text
    assert (root / "step_0000002").is_dir()  # the good one is still there: nothing told us to delete it


# 9. messages that name the file and the fix
def test_9_a_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, said):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("went to the hub"))
    (tmp_path / "runs" / "sgpt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "runs/sgp"]) == 2
    err = said()
    assert "model path runs/sgp does not exist" in err and "runs/sgpt" in err


def test_9_eval_reads_an_export_folder_and_refuses_to_overwrite_its_output(finished_run, tmp_path, text_file, said):
    export = tmp_path / "export"
    assert main(["export", str(finished_run), str(export)]) == 0
    args = ["--set", f"evaluation.data.source={text_file}", "--set", "evaluation.seq_len=32",
            "--set", "evaluation.max_windows=3"]
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(export), "--output", str(report), *args]) == 0
    from_export = json.loads(report.read_text())["perplexity"]["perplexity"]
    said()
    assert main(["eval", "--model", str(finished_run), "--output", str(report), *args]) == 2
    assert "already exists; pass --overwrite" in said()
    assert main(["eval", "--model", str(finished_run), "--output", str(report), "--overwrite", *args]) == 0
    assert json.loads(report.read_text())["perplexity"]["perplexity"] == pytest.approx(from_export, rel=1e-5)


def test_9_a_damaged_index_is_named(finished_run, tmp_path, said):
    export = tmp_path / "export"
    assert main(["export", str(finished_run), str(export), "--shard-size", "200KB"]) == 0
    (export / "model.safetensors.index.json").write_text("{not json")
    for cmd in (["eval", "--model", str(export)], ["export", str(export), str(tmp_path / "again")]):
        assert main(cmd) == 2
        assert "model.safetensors.index.json is not valid JSON" in said()


def test_9_os_errors_are_one_line(tmp_path):
    from compressor.utils.fs import describe_os_error

    with pytest.raises(OSError) as info:
        open(tmp_path / "missing" / "f.txt")
    assert describe_os_error(info.value) == f"{tmp_path / 'missing' / 'f.txt'}: No such file or directory"
