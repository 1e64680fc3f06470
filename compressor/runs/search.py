"""`compressor search`: per-layer sparsity levels at an exact average (issue 16), written as plan files.

Order of work: the search space is built (and a level impossible for a layer, or an unreachable target,
refused) before anything runs; then Fisher traces on calibration windows (MSP's sensitivities), the
level database (every layer at every level, executor jobs, resumable), the dense model's hidden states
on the fitness windows, and the searches: uniform, OWL (its grid chosen by calibration fitness), and the
evolutionary ones, Fisher-seeded (``msp``) and uniformly seeded (``evopress``), with the same stages,
generations and population, hence the same evaluations and tokens. Each best candidate becomes a plan
file whose parameter-weighted average is checked against the target.
"""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from compressor.config.base import input_paths
from compressor.errors import ConfigError
from compressor.execution.base import make_executor
from compressor.models.layers import prunable_linears
from compressor.runs.common import eval_windows_for, evaluate, finish_report, save_or_check_config
from compressor.search.config import SearchConfig
from compressor.search.database import Database, build_database, load_owl_ratios
from compressor.search.evolution import seed_population, sensitivity_seed
from compressor.search.fisher import default_block_of, fisher_traces
from compressor.search.levels import Candidate, SearchSpace
from compressor.search.loop import evolve
from compressor.search.owl import owl_grid, owl_levels
from compressor.search.repair import RepairError, snap
from compressor.search.report import plot_fitness, plot_levels, plot_sensitivity, search_markdown
from compressor.search.scoring import Scorer, ScoringSpec, all_tokens, assembler, final_hidden, forget_models
from compressor.sparsity.plan import layer_shapes, level_sparsity
from compressor.utils.fs import atomic_save_safetensors, atomic_write_json, read_json
from compressor.utils.logging import get_logger
from compressor.utils.run_folder import run_folder
from compressor.utils.timing import PhaseTimer

log = get_logger(__name__)
STREAMS = {"msp": 1, "evopress": 2}  # each evolutionary search draws from its own generator per seed
# A resumed search may change how it runs and is evaluated, and how many generations it runs: the
# generations before the checkpoint do not depend on how many follow (loop.evolve).
MAY_CHANGE = ("executor", "evaluation", "evolution.generations")


def run_search(cfg: SearchConfig, output: str | Path, overwrite: bool = False, resume: bool = False,
               on_generation: Optional[Callable[[str, int], None]] = None) -> dict[str, Any]:
    """Search into the run folder ``output``; ``on_generation(run, generation)`` after each checkpoint."""
    with run_folder(output, "search", input_paths(cfg), overwrite, resume) as folder:
        save_or_check_config(folder.path, cfg, resuming=folder.resumed, ignore=MAY_CHANGE,
                             may_change="the executor, evaluation and evolution.generations")
        return _search(cfg, folder.path, on_generation)


def _search(cfg: SearchConfig, out: Path, on_generation) -> dict[str, Any]:
    from compressor.data import calibration_windows, load_token_ids
    from compressor.models import load_model

    timer = PhaseTimer()
    forget_models()
    with timer.phase("load"):
        loaded = load_model(cfg.model)
    model, arch = loaded.model, loaded.arch
    targets = prunable_linears(model, arch, cfg.targets, cfg.ignore)
    if not targets:
        raise ConfigError(f"no linear layer matches targets={cfg.targets} ignore={cfg.ignore}")
    shapes = layer_shapes(targets)
    space = SearchSpace.build(shapes, cfg.level_set, cfg.target)  # refuses an impossible level or target first
    with timer.phase("data"):
        tokens = load_token_ids(cfg.calibration.data, loaded.tokenizer)
        c, f = cfg.calibration, cfg.fitness
        calib = calibration_windows(tokens, c.num_windows, c.seq_len, c.seed)
        fit_ids = calibration_windows(tokens, f.num_windows, f.seq_len, f.seed)
    report: dict[str, Any] = {
        "model": {"source": cfg.model.source, "folder": str(loaded.folder), "family": arch.family},
        "config": cfg.model_dump(mode="json"), "levels": cfg.level_set.describe(), "layers": len(space),
        "parameters": int(space.sizes.sum()), "precision": cfg.precision.describe(),
    }

    sensitivity = None
    if "msp" in cfg.searches:
        with timer.phase("fisher"):
            sensitivity = _sensitivity(model, space, calib[: cfg.fisher.num_windows], cfg, out)
    db = Database(str(out / "database"), cfg.method, cfg.level_set.levels)
    with make_executor(cfg.executor) as executor:
        with timer.phase("database"):
            built = build_database(model, arch, targets, calib, db, cfg.method_options, cfg.sparsegpt, executor,
                                   cfg.owl.ms, c.batch_size, cfg.precision)
        report["database"] = {"root": "database", "solved": built.solved, "skipped": built.skipped}
        with timer.phase("dense"):
            hidden = _dense_hidden(model, fit_ids, cfg, out) if f.kind == "kl" else None
        loaded.model = model = None  # the dense model's work is done; scoring assembles its own
        spec = ScoringSpec(cfg.model, db, space.names, f.kind, cfg.precision, f.batch_size)
        scorer = Scorer(executor, spec, fit_ids, hidden, f.windows_per_job)
        fixed = all_tokens(cfg.final_windows, f.seq_len)
        report["fixed_windows"] = cfg.final_windows
        results: dict[str, dict[str, Any]] = {}
        best: dict[str, Candidate] = {}
        uniform = snap(space.level_positions([float(space.target)] * len(space)), space)
        for name in cfg.searches:
            with timer.phase(f"search:{name}"):
                if name == "uniform":
                    best[name], results[name] = uniform, _one_shot(scorer, [uniform], fixed)
                elif name == "owl":
                    best[name], results[name] = _owl(space, db, cfg, scorer, fixed, uniform)
                else:
                    for seed in cfg.seeds:
                        key = f"{name}-s{seed}"
                        best[key], results[key] = _evolve(name, seed, space, sensitivity, uniform, scorer, cfg,
                                                          fixed, out, on_generation)
        del hidden
    for key, cand in best.items():
        results[key].update(_write_plan(space, cand, shapes, out / "plans" / f"{key}.yaml"))
        results[key]["plan"] = f"plans/{key}.yaml"
    if cfg.evaluation.enabled:
        with timer.phase("evaluate"):
            report["evaluation"] = _evaluate(cfg, loaded.tokenizer, spec, best, results)
    forget_models()
    report["searches"] = results
    report["spread"] = _spread(results, cfg)
    report["seeding"] = _seeding_gain(results, cfg)
    report["outputs"] = {"plans": {k: r["plan"] for k, r in results.items()},
                         "plots": _plots(out, results, best, space, sensitivity, f.kind)}
    report["timing"] = timer.as_dict()
    report = finish_report(out, report, search_markdown, timer)
    (out / DENSE_HIDDEN).unlink(missing_ok=True)
    return report


DENSE_HIDDEN = "dense_hidden.safetensors"  # work state of an unfinished search, removed at its end


def _dense_hidden(model, fit_ids, cfg: SearchConfig, out: Path):
    """The dense model's final hidden states on the fitness windows (KL's reference), kept in the run
    folder so that a resumed search does not run the dense model over them again (the config, which fixes
    them, is held on resume)."""
    from safetensors.torch import load_file

    path = out / DENSE_HIDDEN
    if path.is_file():
        hidden = load_file(str(path)).get("hidden")
        if hidden is not None and tuple(hidden.shape[:2]) == tuple(fit_ids.shape):
            log.info("dense hidden states of the %d fitness windows from %s", fit_ids.shape[0], path)
            return hidden
    hidden = final_hidden(model, fit_ids, cfg.fitness.batch_size, cfg.precision)
    atomic_save_safetensors({"hidden": hidden.contiguous()}, path)
    return hidden


def _sensitivity(model, space: SearchSpace, windows, cfg: SearchConfig, out: Path) -> dict[str, float]:
    path = out / "sensitivity.json"
    if path.is_file():
        return read_json(path)["layers"]
    with cfg.precision.autocast():  # a ranking of layers: bf16 products are precise enough for it
        traces = fisher_traces(model, list(space.names), windows, cfg.fisher.batch_size, desc="Fisher traces")
    layers = traces.layer_traces()
    atomic_write_json(path, {"sequences": traces.sequences, "layers": layers, "blocks": traces.block_traces()})
    return layers


def _distinct(candidates: list[Candidate]) -> int:
    return len({c.tobytes() for c in candidates})  # what scoring them costs: equal candidates are scored once


def _one_shot(scorer: Scorer, candidates: list[Candidate], fixed) -> dict[str, Any]:
    start = time.perf_counter()
    fitness = scorer.score_fixed(candidates, fixed)
    return {"final_fitness": fitness[0], "evaluations": _distinct(candidates),
            "tokens": _distinct(candidates) * sum(t for _, t in fixed), "seconds": time.perf_counter() - start,
            "history": []}


def _owl(space: SearchSpace, db: Database, cfg: SearchConfig, scorer: Scorer, fixed, uniform: Candidate):
    """OWL's (M, lambda) grid snapped onto the level set; the setting with the best calibration fitness."""
    ratios = load_owl_ratios(db)
    block_of = {n: default_block_of(n) for n in space.names}
    block_sizes: dict[str, int] = {}
    for n, p in zip(space.names, space.sizes):
        block_sizes[block_of[n]] = block_sizes.get(block_of[n], 0) + int(p)
    by_m = {m: {b: ratios[b][m] for b in block_sizes} for m in cfg.owl.ms}
    settings, candidates = [], []
    for s in owl_grid(by_m, block_sizes, cfg.target, cfg.owl.lambdas):
        try:
            candidates.append(space.from_levels(owl_levels(s.block_sparsity, block_of, space)))
            settings.append(s)
        except RepairError:
            log.info("OWL M=%g lambda=%g: no exact snap onto the level set, left out", s.m, s.lam)
    if not candidates:
        log.warning("OWL: no grid setting fits the level set; OWL falls back to the uniform plan")
        settings, candidates = [None], [uniform]
    start = time.perf_counter()
    fitness = scorer.score_fixed(candidates, fixed)
    i = int(np.argmin(fitness))
    grid = [{"m": s.m, "lambda": s.lam, "fitness": v} for s, v in zip(settings, fitness) if s is not None]
    chosen = settings[i]
    return candidates[i], {"final_fitness": fitness[i], "evaluations": _distinct(candidates),
                           "tokens": _distinct(candidates) * sum(t for _, t in fixed),
                           "seconds": time.perf_counter() - start, "history": [], "grid": grid,
                           "chosen": None if chosen is None else {"m": chosen.m, "lambda": chosen.lam}}


def _evolve(name: str, seed: int, space: SearchSpace, sensitivity, uniform: Candidate, scorer: Scorer,
            cfg: SearchConfig, fixed, out: Path, on_generation):
    rng = np.random.default_rng([seed, STREAMS[name]])
    if name == "msp":
        start = sensitivity_seed(space, [sensitivity[n] for n in space.names], cfg.fisher.spread)
    else:
        start = uniform
    population = seed_population(space, start, cfg.evolution.stages[-1].survivors, rng, cfg.evolution.max_switches)
    state = evolve(f"{name}-s{seed}", space, population, rng, scorer, cfg.evolution, fixed,
                   out / "checkpoints" / f"{name}-s{seed}", on_generation)
    champion = state.population[0]
    return champion, {"final_fitness": scorer.score_fixed([champion], fixed)[0], "evaluations": state.evaluations,
                      "tokens": state.tokens, "seconds": state.seconds, "history": state.history, "seed": seed,
                      "seed_fitness": scorer.score_fixed([start], fixed)[0]}


def _write_plan(space: SearchSpace, c: Candidate, shapes, path: Path) -> dict[str, Any]:
    """The candidate as a plan file; its average is the exact bookkeeping's, and meets the target."""
    assert space.is_exact(c), "every operator keeps the exact budget"
    plan = space.to_plan(c)
    resolved = plan.resolve(shapes)  # raises if the average misses the declared target by more than a group
    assert resolved.average == space.average(c)
    plan.save(path)
    off = resolved.pruned_weights - Fraction(str(plan.target)) * resolved.parameters
    levels = [float(level_sparsity(lv)) for lv in resolved.levels.values()]
    return {"average": float(resolved.average), "average_exact": str(resolved.average),
            "off_target_weights": float(off), "levels": [int(k) for k in c], "min_level": min(levels),
            "max_level": max(levels)}


def _evaluate(cfg: SearchConfig, tokenizer, spec: ScoringSpec, best, results) -> dict[str, Any]:
    windows, note = eval_windows_for(cfg.evaluation, tokenizer)
    model = None
    for key, cand in best.items():
        model = assembler(spec).apply(cand)
        results[key]["perplexity"] = evaluate(model, windows, cfg.evaluation, note, key).as_dict()
    return {"windows": int(windows.shape[0]), "window_length": int(windows.shape[1]), "note": note}


def _spread(results: dict[str, dict[str, Any]], cfg: SearchConfig) -> dict[str, Any]:
    """Per evolutionary search over its seeds: mean, standard deviation, min and max."""
    out = {}
    for name in ("msp", "evopress"):
        runs = [results[f"{name}-s{s}"] for s in cfg.seeds if f"{name}-s{s}" in results]
        if not runs:
            continue
        out[name] = {}
        for metric in ("final_fitness", "perplexity"):
            values = [r[metric] if metric != "perplexity" else (r.get("perplexity") or {}).get("perplexity")
                      for r in runs]
            if None not in values:
                v = np.asarray(values, dtype=np.float64)
                out[name][metric] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                     "min": float(v.min()), "max": float(v.max()), "seeds": len(v)}
    return out


def _seeding_gain(results: dict[str, dict[str, Any]], cfg: SearchConfig) -> dict[str, Any]:
    """Per seed: the evaluations MSP needed to reach EvoPress's final fitness (on the fixed windows), and
    their ratio to EvoPress's whole budget (the issue asks for at most 0.5)."""
    out = {}
    for s in cfg.seeds:
        msp, evo = results.get(f"msp-s{s}"), results.get(f"evopress-s{s}")
        if not msp or not evo or not evo["history"]:
            continue
        goal = evo["history"][-1]["fitness"]
        reached = next((h["evaluations"] for h in msp["history"] if h["fitness"] <= goal), None)
        if msp["seed_fitness"] <= goal:
            reached = 0
        out[f"s{s}"] = {"evopress_final": goal, "msp_evaluations": reached,
                        "ratio": None if reached is None else reached / evo["evaluations"]}
    return out


def _plots(out: Path, results, best, space: SearchSpace, sensitivity, kind: str) -> list[str]:
    plots = [plot_fitness(results, out / "plots" / "fitness.png", kind)]
    if sensitivity is not None:
        blocks = read_json(out / "sensitivity.json")["blocks"]
        plots.append(plot_sensitivity(sensitivity, blocks, out / "plots" / "fisher.png"))
    for key, cand in best.items():
        sparsity = {n: float(space.levels.sparsity(int(k))) for n, k in zip(space.names, cand)}
        plots.append(plot_levels(sparsity, sensitivity, out / "plots" / f"levels-{key}.png", key))
    return [str(p.relative_to(out)) for p in plots]
