"""`compressor learn`: a training method (``method:``: MaskLLM, fixed-mask fine-tuning, SR-STE, PDP, BDWP,
or the dense control) on one process or DeepSpeed ranks, resumable.

Rank 0 owns the output folder: checkpoints under ``checkpoints/``, and at the end the hard masks, the
exact sparse model (weights x hard mask), the method's own files (MaskLLM: the logits, for transfer),
the report and its plots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from compressor.checkpoints.masks import MaskReader, load_masks, save_masks
from compressor.config.base import input_paths
from compressor.errors import ConfigError
from compressor.execution.base import InProcessExecutor
from compressor.methods.maskllm.config import check_pattern_count
from compressor.methods.registry import get_method, section_options
from compressor.methods.sparse_training.flops import linear_gemm_flops
from compressor.models.checks import assert_finite_weights
from compressor.models.layers import prunable_linears
from compressor.eval.config import EvalConfig
from compressor.eval.runner import check_tasks_available, run_tasks
from compressor.pipelines.sequential import OneShotPlan, prune_sequential
from compressor.precision import DTYPES, log_precision
from compressor.reporting.markdown import learn_report_markdown
from compressor.reporting.plots import evaluation_plots, plot_lines
from compressor.reporting.tensorboard import TENSORBOARD_DIR, ScalarWriter
from compressor.runs.common import evaluate, eval_windows_for, finish_report, save_or_check_config
from compressor.runs.plans import PLAN_FILE, record_plan, resolve_plan, setup_plan, uniform_text, weight_levels
from compressor.sparsity.plan import PlanError, ResolvedPlan, SparsityPlan, level_text
from compressor.sparsity import NM, is_nm
from compressor.training.backends import Backend, DeepSpeedBackend, SingleProcessBackend
from compressor.training.config import USES_PRIOR, LearnConfig
from compressor.training.final_checks import MaskChecks
from compressor.training.learners import FinalModel, make_learner
from compressor.training.loop import History, train
from compressor.training.objective import Distillation, next_token
from compressor.training.zero3 import load_partitioned_model
from compressor.utils.fs import atomic_dir
from compressor.utils.run_folder import run_folder
from compressor.utils.logging import get_logger, setup_logging
from compressor.utils.timing import PhaseTimer

log = get_logger(__name__)


def prior_masks(cfg: LearnConfig, names: list[str], levels: Optional[Mapping[str, NM]] = None
                ) -> Optional[dict[str, torch.Tensor]]:
    """The prior's masks (weight names -> bool): MaskLLM's initial logits, the mask fixed-mask fine-tuning
    trains under; None for random logits or a method that starts from the weights alone. ``levels``: the
    sparsity plan's level of each linear (a one-shot prior is made with them)."""
    prior = cfg.prior
    if prior.kind == "none" or cfg.method.kind not in USES_PRIOR:
        return None
    if prior.kind == "file":
        path = Path(prior.path)
        path = path / "masks.safetensors" if path.is_dir() else path
        masks = load_masks(path)
    else:
        from compressor.data import calibration_windows, load_token_ids
        from compressor.models import load_model

        # A separate copy of the model: the one-shot pipeline writes pruned weights, ours stay dense.
        loaded = load_model(cfg.model)
        c = prior.calibration
        windows = calibration_windows(load_token_ids(c.data, loaded.tokenizer), c.num_windows, c.seq_len, c.seed)
        plan = OneShotPlan(prior.kind, cfg.sparsity, section_options(prior, prior.kind), prior.sparsegpt,
                           tuple(cfg.targets), tuple(cfg.ignore), c.batch_size, layer_error=False,
                           precision=cfg.precision, levels=levels)
        if get_method(prior.kind).stats == "none":
            windows = windows[:0]
        masks = prune_sequential(loaded.model, loaded.arch, windows, plan, InProcessExecutor()).masks
        del loaded
    missing = [n for n in names if n not in masks]
    if missing:
        raise ConfigError(f"the prior has no mask for {len(missing)} layers, e.g. {missing[0]}; "
                          "it was made for other targets or another model")
    for name, level in (levels or {}).items():  # a file prior made for other levels would fail deep inside
        if not is_nm(masks[f"{name}.weight"], level):
            raise ConfigError(f"the prior's mask of {name} is not {level}, the sparsity plan's level of that layer")
    return {n: masks[n] for n in names}


def layer_priors(cfg: LearnConfig, names: list[str], levels: Optional[Mapping[str, NM]] = None):
    """``prior_masks`` for a partitioned (ZeRO-3) model, which no rank holds whole: None, or a function of a
    layer's name and its gathered weight that returns that layer's prior mask (a magnitude-like method
    solves the layer there; a file prior is read a mask at a time), or, for a method that needs calibration
    statistics, the masks of a one-shot run over the source read one decoder block at a time
    (``model.lazy``'s walk; bool masks, a byte per weight)."""
    prior = cfg.prior
    if prior.kind == "none" or cfg.method.kind not in USES_PRIOR:
        return None
    if prior.kind == "file":
        path = Path(prior.path)
        reader = MaskReader(path / "masks.safetensors" if path.is_dir() else path)
        missing = [n for n in names if n not in reader]
        if missing:
            raise ConfigError(f"the prior has no mask for {len(missing)} layers, e.g. {missing[0]}; "
                              "it was made for other targets or another model")

        def from_file(name: str, weight: torch.Tensor) -> torch.Tensor:
            mask = reader.get(f"{name}.weight")
            if levels is not None and not is_nm(mask, levels[name]):
                raise ConfigError(f"the prior's mask of {name} is not {levels[name]}, the sparsity plan's level of "
                                  "that layer")
            return mask

        return from_file
    if get_method(prior.kind).stats != "none":
        return _lazy_oneshot_prior(cfg, names, levels)
    from compressor.calibration.stats import InputStats
    from compressor.methods.interface import LayerJob
    from compressor.methods.registry import solve_layers

    options = section_options(prior, prior.kind)

    def solve(name: str, weight: torch.Tensor) -> torch.Tensor:  # what prune_sequential solves for this layer
        level = levels[name] if levels is not None else cfg.sparsity
        job = LayerJob(f"{name}.weight", prior.kind, level, options, prior.sparsegpt)
        return solve_layers([job], [weight], InputStats("none", weight.shape[1]))[0].mask

    return solve


def _lazy_oneshot_prior(cfg: LearnConfig, names: list[str], levels: Optional[Mapping[str, NM]]):
    """A calibrated one-shot prior on a copy of the model read block by block from its folder."""
    from compressor.data import calibration_windows, load_token_ids
    from compressor.models import load_model
    from compressor.runs.prune import LazyWalk

    prior, c = cfg.prior, cfg.prior.calibration
    loaded = load_model(cfg.model, empty=True)
    walk = LazyWalk(loaded, None, DTYPES[cfg.model.dtype])  # `compressor prune`'s lazy walk, writing nothing
    windows = calibration_windows(load_token_ids(c.data, loaded.tokenizer), c.num_windows, c.seq_len, c.seed)
    plan = OneShotPlan(prior.kind, cfg.sparsity, section_options(prior, prior.kind), prior.sparsegpt,
                       tuple(cfg.targets), tuple(cfg.ignore), c.batch_size, layer_error=False,
                       precision=cfg.precision, levels=levels)
    masks = prune_sequential(loaded.model, loaded.arch, windows, plan, InProcessExecutor(),
                             on_block_start=walk.load_block, on_block_done=walk.save_block,
                             on_inputs_captured=walk.inputs_captured).masks
    del loaded
    missing = [n for n in names if n not in masks]
    if missing:
        raise ConfigError(f"the prior has no mask for {len(missing)} layers, e.g. {missing[0]}")
    return {n: masks[n] for n in names}


def maskllm_levels(cfg: LearnConfig, targets) -> Optional[ResolvedPlan]:
    """The sparsity plan of a MaskLLM run, resolved against ``targets`` (linears, or their shapes by name)
    and checked: MaskLLM learns one logit per keep-pattern of each group, so every level must be N:M with
    few enough patterns."""
    if cfg.sparsity_plan is None:
        return None
    resolved = resolve_plan(cfg.sparsity_plan, targets)
    for name, level in resolved.levels.items():
        if not isinstance(level, NM):
            raise PlanError(f"sparsity plan {cfg.sparsity_plan}: {name} has the unstructured level {level_text(level)}; "
                            "MaskLLM learns N:M masks only (one logit per pattern of C(M, N)): give it an N:M level")
        try:
            check_pattern_count(level)
        except ValueError as e:
            raise PlanError(f"sparsity plan {cfg.sparsity_plan}: {name}: {e}") from None
    return resolved


def make_stream(cfg: LearnConfig, tokenizer, rank: int, world_size: int):
    from compressor.data import WindowStream

    t = cfg.train
    return WindowStream(t.data, tokenizer, t.seq_len, rank=rank, world_size=world_size, seed=t.seed,
                        shuffle_buffer=t.shuffle_buffer)


def make_backend(cfg: LearnConfig) -> Backend:
    return DeepSpeedBackend(cfg.deepspeed) if cfg.backend == "deepspeed" else SingleProcessBackend()


def make_objective(cfg: LearnConfig):
    """The next-token loss, or its mix with distillation from the teacher (default: the model as loaded)."""
    d = cfg.distill
    if d.weight == 0:
        return next_token
    from compressor.models import load_model

    source = cfg.model if d.teacher is None else cfg.model.model_copy(update={"source": d.teacher})
    teacher = load_model(source).model
    assert_finite_weights(teacher)
    return Distillation(teacher, d.weight, d.temperature)


def learn_rank(cfg: LearnConfig, output: str | Path) -> Optional[dict[str, Any]]:
    """Run on every rank (rank and world size come from the environment) in the run folder ``output``,
    already opened by ``run_learn``; rank 0 returns the report."""
    from compressor.models import load_model

    check_tasks_available(cfg.evaluation)
    curve_tasks = curve_task_config(cfg)
    if curve_tasks is not None:
        check_tasks_available(curve_tasks)
    backend = make_backend(cfg)
    out = Path(output)
    timer = PhaseTimer()
    torch.manual_seed(cfg.train.seed)
    with timer.phase("load"):
        if backend.partitioned_load:  # ZeRO-3: built partitioned, filled one parameter at a time
            loaded = load_partitioned_model(cfg.model, backend)
        else:
            loaded = load_model(cfg.model)
            assert_finite_weights(loaded.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    targets = prunable_linears(model, loaded.arch, cfg.targets, cfg.ignore)
    names = [f"{t.name}.weight" for t in targets]
    resolved = maskllm_levels(cfg, targets)  # before any work
    levels = None if resolved is None else resolved.levels
    with timer.phase("prior"):
        if cfg.init_logits:
            priors = None
        elif backend.partitioned_load:
            priors = layer_priors(cfg, names, levels)
        else:
            priors = prior_masks(cfg, names, levels)
    learner = make_learner(cfg, priors, levels)
    params = learner.attach(model, [n[: -len(".weight")] for n in names], backend)
    log_precision(cfg.precision, "learn")
    objective = make_objective(cfg)
    backend.setup(model, params, learner.backward_calls(cfg.train.grad_accum), cfg.train.micro_batch_size)
    stream = make_stream(cfg, tokenizer, backend.rank, backend.world_size)

    # Only rank 0 evaluates (the others wait for it at the next gradient all-reduce), except under ZeRO-3,
    # where a forward pass gathers parameters from every rank: all ranks evaluate the same windows.
    evaluate_fn = None
    if cfg.evaluation.enabled and (backend.is_main or backend.partitioned):
        eval_windows, note = eval_windows_for(cfg.evaluation, tokenizer)

        def evaluate_fn() -> dict[str, float]:
            scores = {"perplexity": evaluate(model, eval_windows, cfg.evaluation, note, "hard mask").perplexity}
            if curve_tasks is not None:
                scores.update(task_scores(run_tasks(model, tokenizer, curve_tasks)))
            return scores

    scalars = ScalarWriter(out / TENSORBOARD_DIR) if backend.is_main else None
    with timer.phase("train"):
        history = train(model, learner, cfg.train, stream, backend, out / "checkpoints", evaluate_fn,
                        objective=objective, scalars=scalars, precision=cfg.precision, phases=timer)
    if scalars is not None:
        scalars.close()
    if not (backend.is_main or backend.partitioned):  # under ZeRO-3 every rank takes part in the gathers below
        backend.close()
        return None

    tokens = cfg.train.micro_batch_size * cfg.train.seq_len * backend.world_size  # per micro-batch of all ranks
    sparsity = "mixed" if resolved is not None else None if cfg.sparsity is None else str(cfg.sparsity)
    report: dict[str, Any] = {"method": cfg.method.kind, "sparsity": sparsity,
                              "model": {"source": cfg.model.source}, "config": cfg.model_dump(mode="json"),
                              "precision": cfg.precision.describe(),
                              "backend": cfg.backend, "world_size": backend.world_size,
                              "history": {"logs": history.logs, "evals": history.evals},
                              "flops_per_micro_batch": linear_gemm_flops([(t.out_features, t.in_features) for t in targets],
                                                                         tokens, learner.gemm_densities()),
                              **learner.report()}
    with timer.phase("save"):
        final = learner.finish(backend)
        if learner.frozen_dtype is not None and backend.is_main:  # ship the source's weights, not their copies
            final.state_dict = _rebake_from_source(model, final.state_dict, final.masks, loaded.folder)
        if final.by_layer is not None:  # ZeRO-3, partitioned load: every file streamed, one layer at a time
            checks = final.by_layer(
                out, tokenizer=tokenizer, checks=MaskChecks(cfg.sparsity, levels, history.start_masks),
                mask_sparsity=uniform_text(resolved) if resolved is not None else str(cfg.sparsity),
                mask_levels=weight_levels(resolved) if resolved is not None else None)
            if backend.is_main:
                report.update(checks)
                outputs = {"model": "model", "masks": "masks.safetensors", "logits": "logits.safetensors"}
        elif backend.is_main:
            report.update(check_final(final, cfg.sparsity, history, levels))
            outputs: dict[str, Any] = {"model": "model"}
            if final.masks is not None and resolved is not None:
                save_masks(out / "masks.safetensors", final.masks, uniform_text(resolved), weight_levels(resolved))
                outputs["masks"] = "masks.safetensors"
            elif final.masks is not None:
                save_masks(out / "masks.safetensors", final.masks, str(cfg.sparsity))
                outputs["masks"] = "masks.safetensors"
            for key, (filename, write) in final.files.items():
                write(out / filename)
                outputs[key] = filename
            with atomic_dir(out / "model", replace=True) as tmp:
                model.save_pretrained(tmp, state_dict=final.state_dict)
                tokenizer.save_pretrained(tmp)
    if cfg.evaluation.enabled:
        with timer.phase("evaluate"):
            report["perplexity"] = evaluate(model, eval_windows, cfg.evaluation, note, "final hard mask").as_dict()
    if not backend.is_main:
        backend.close()
        return None
    if cfg.evaluation.enabled:
        with timer.phase("evaluate"):  # ZeRO-3 keeps the weights partitioned: rank 0 reads the saved model
            evaluated = load_model(cfg.model.model_copy(update={"source": str(out / "model")})).model \
                if backend.partitioned and cfg.evaluation.harness_specs else model
            report["evaluation"] = run_tasks(evaluated, tokenizer, cfg.evaluation, report.get("perplexity"))
    outputs["plots"] = _plots(out, history, cfg.method.kind) + [str(p) for p in evaluation_plots(out, report)]
    if resolved is not None:
        outputs["plots"] += [str(p) for p in record_plan(out, resolved, cfg.sparsity_plan, report,
                                                         "maskllm: N:M per layer")]
        outputs["plan"] = PLAN_FILE
    outputs["tensorboard"] = TENSORBOARD_DIR
    report["outputs"] = outputs
    report["timing"] = timer.as_dict()
    finish_report(out, report, learn_report_markdown, timer)
    backend.close()
    return report


def curve_task_config(cfg: LearnConfig) -> Optional[EvalConfig]:
    """The evaluation of ``train.eval_tasks`` at each curve point (None: perplexity only)."""
    if not cfg.train.eval_tasks:
        return None
    limit = cfg.train.eval_tasks_limit or cfg.evaluation.harness.limit
    return cfg.evaluation.model_copy(update={"tasks": cfg.train.eval_tasks,
                                             "harness": cfg.evaluation.harness.model_copy(update={"limit": limit})})


def task_scores(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` of a ``run_tasks`` result (a curve point's extra columns)."""
    return {f"{task}/{name}": m["value"] for task, result in evaluation["tasks"].items()
            for name, m in result["metrics"].items()}


@torch.no_grad()
def _rebake_from_source(model: torch.nn.Module, state: Optional[dict[str, torch.Tensor]], masks: dict[str, torch.Tensor],
                        folder: Path) -> Optional[dict[str, torch.Tensor]]:
    """Masked weights = the source folder's weights x hard mask, in the source dtype (frozen weights held
    in bf16 for training must not ship bf16-rounded); into ``state`` if given, else into the model."""
    from compressor.models.lazy import WeightStore

    store = WeightStore(folder)
    for name, mask in masks.items():
        weight = store.get(name)
        baked = weight * mask.to(weight.dtype)
        if state is not None:
            state[name] = baked
        else:
            model.get_parameter(name).data = baked
    return state


def check_final(final: FinalModel, sparsity, history: History,
                levels: Optional[Mapping[str, NM]] = None) -> dict[str, Any]:
    """Check the masks' pattern (N:M exactly, each layer at its own level with a plan; unstructured: the
    density) and measure their change from step 0: the report's ``pattern_ok`` and ``mask_change_vs_start``
    (fraction of weights whose bit flipped)."""
    if final.masks is None:
        return {"pattern_ok": None, "mask_change_vs_start": None}
    checks = MaskChecks(sparsity, levels, history.start_masks)
    for name, mask in final.masks.items():
        checks.add(name, mask)
    return checks.result()


def _plots(out: Path, history: History, kind: str) -> list[str]:
    plots = []
    logs = history.logs
    if logs:
        plots.append(plot_lines({"training loss": [(r["tokens"], r["loss"]) for r in logs]},
                                out / "plots" / "loss.png", f"{kind}: training loss", "training tokens", "LM loss"))
        stats = {label: [(r["tokens"], r[key]) for r in logs if key in r]
                 for key, label in (("flip_rate", "mask flip rate"), ("max_prob", "mean max prob"))}
        if any(stats.values()):
            plots.append(plot_lines(stats, out / "plots" / "mask_stats.png", "Mask convergence", "training tokens",
                                    "fraction"))
    if history.evals:
        plots.append(plot_lines({"hard-mask perplexity": [(r["tokens"], r["perplexity"]) for r in history.evals]},
                                out / "plots" / "perplexity.png", "Perplexity of the hard mask", "training tokens",
                                "perplexity", logy=True))
        curves = {key: [(r["tokens"], r[key]) for r in history.evals if key in r]
                  for key in dict.fromkeys(k for r in history.evals for k in r if "/" in k)}
        if curves:  # train.eval_tasks
            plots.append(plot_lines(curves, out / "plots" / "task_curves.png", "Task scores of the hard mask",
                                    "training tokens", "score"))
    return [str(p.relative_to(out)) for p in plots]


def _worker(rank: int, world_size: int, cfg: LearnConfig, output: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg.deepspeed.master_port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    setup_logging("INFO" if rank == 0 else "WARNING")
    learn_rank(cfg, output)


def run_learn(cfg: LearnConfig, output: str | Path, overwrite: bool = False, resume: bool = False) -> Optional[dict]:
    """`compressor learn`: one process, or ``deepspeed.world_size`` local ranks (one command; a cluster
    starts one process per rank with its own launcher, RANK set, and rank 0 owns the folder)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return learn_rank(cfg, output)
    if cfg.sparsity_plan is not None:
        SparsityPlan.load(cfg.sparsity_plan)  # the file's own checks, before any folder is made
    with run_folder(output, "learn", input_paths(cfg), overwrite, resume) as folder:
        save_or_check_config(folder.path, cfg, resuming=folder.resumed, ignore=("evaluation",))
        setup_plan(folder.path, cfg.sparsity_plan, resuming=folder.resumed)
        if cfg.backend != "deepspeed" or cfg.deepspeed.world_size == 1 or "RANK" in os.environ:
            return learn_rank(cfg, folder.path)
        import json

        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(cfg.deepspeed.world_size, cfg, str(folder.path)), nprocs=cfg.deepspeed.world_size,
                 join=True)
        return json.loads((folder.path / "report.json").read_text())
