"""Micro-benchmark of the per-layer solvers (SparseGPT, SparseSwaps) on one CPU thread.

The Gram matrix is that of 65,536 tokens of correlated, channel-scaled inputs with a mean component
(like LLM activations), sampled exactly and cheaply: for Z with i.i.d. N(0, 1) rows, Z^T Z is
Wishart(T, I), drawn with the Bartlett decomposition instead of a (T x in) matrix product.
The baseline is the column-at-a-time loop of the original SparseGPT implementation (float32 Cholesky,
three cubic factorisations, per-column rank-1 updates), re-written here from the paper's algorithm.

    python bench/bench_layer_solvers.py                   # 1536x576 and 576x1536, 2:4
    python bench/bench_layer_solvers.py --shapes 576x576 --sparsity 0.5 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from compressor.methods.objective import output_energy
from compressor.methods.sparsegpt import sparsegpt
from compressor.methods.sparseswaps import sparseswaps
from compressor.methods.wanda import wanda_mask
from compressor.sparsity import NM, mask_from_scores, parse_sparsity


def wishart_gram(width: int, tokens: int = 65536, seed: int = 0) -> torch.Tensor:
    """G = sum over ``tokens`` of x x^T, x = D A^T (z + mu), z ~ N(0, I): correlated, outlier channels."""
    g = torch.Generator().manual_seed(seed)
    lower = torch.randn(width, width, generator=g, dtype=torch.float64).tril(-1)
    dof = tokens - torch.arange(width, dtype=torch.float64)  # Bartlett: L_ii^2 ~ chi^2(T - i)
    lower.diagonal().copy_(torch.sqrt(dof + math.sqrt(2) * dof.sqrt() * torch.randn(width, generator=g, dtype=torch.float64)))
    zz = lower @ lower.T  # Wishart(T, I)
    mu = 0.3 * torch.randn(width, generator=g, dtype=torch.float64)
    zz += tokens * torch.outer(mu, mu)
    mix = torch.eye(width, dtype=torch.float64) + torch.randn(width, width, generator=g, dtype=torch.float64) / width**0.5
    scale = torch.exp(0.7 * torch.randn(width, generator=g, dtype=torch.float64))  # log-normal channel scales
    a = mix * scale.unsqueeze(0)
    return a.T @ zz @ a


def reference_style_sparsegpt(weight: torch.Tensor, gram: torch.Tensor, nm: NM, block: int = 128, damp: float = 0.01):
    """Baseline: the original implementation's structure (float32 H, per-column updates)."""
    w = weight.clone().float()
    h = gram.float().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1 = w[:, b0:b1].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        losses1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(b1 - b0):
            col = w1[:, i]
            d = hinv1[i, i]
            if i % nm.m == 0:
                tmp = w1[:, i : i + nm.m] ** 2 / torch.diag(hinv1)[i : i + nm.m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, nm.m - nm.n, dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            losses1[:, i] = (col - q) ** 2 / d**2
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, b0:b1] = q1
        mask[:, b0:b1] = mask1
        w[:, b1:] -= err1.matmul(hinv[b0:b1, b1:])
    return ~mask, w


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Least CPU seconds of this process over ``repeats`` runs (steadier than wall time on a shared machine)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1536x576", "576x1536"], help="OUTxIN")
    ap.add_argument("--sparsity", default="2:4", help="N:M such as 2:4, or a pruned fraction such as 0.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-swaps", action="store_true", help="time SparseGPT only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = parse_sparsity(float(args.sparsity) if args.sparsity.replace(".", "", 1).isdigit() else args.sparsity)
    print(f"{args.threads} thread(s), {target}, CPU seconds, best of {args.repeats}")
    for shape in args.shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        gram = wishart_gram(cols)
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)) * 0.02
        loss = lambda wp: float(output_energy(w - wp, gram).sum() / output_energy(w, gram).sum())  # noqa: E731
        t_gpt, res = best_of(lambda: sparsegpt(w, gram, target), args.repeats)
        line = f"{shape:>9}  sparsegpt {t_gpt:6.3f}s (rel. error {loss(res.weight):.4f})"
        if isinstance(target, NM):
            t_ref, (ref_mask, _) = best_of(lambda: reference_style_sparsegpt(w, gram, target), args.repeats)
            agree = float((ref_mask == res.mask).double().mean())
            line += f"  baseline {t_ref:6.3f}s (masks agree on {100 * agree:.3f}% of weights)"
        print(line, flush=True)
        if args.skip_swaps:
            continue
        starts = {"wanda": wanda_mask(w, torch.diagonal(gram), target),
                  "magnitude": mask_from_scores(w.abs(), target, scope="row"),
                  "sparsegpt": sparsegpt(w, gram, target, update_weights=False).mask}
        for name, start in starts.items():
            t_sw, sw = best_of(lambda: sparseswaps(w, gram, start, target), args.repeats)
            print(f"{'':>9}  sparseswaps from {name:9s} {t_sw:6.3f}s  swaps/row {float(sw.swaps_per_row.float().mean()):6.1f} "
                  f"(max {int(sw.swaps_per_row.max())})  rel. error {loss(w * start):.4f} -> {loss(sw.weight):.4f}", flush=True)
        t_rf, rf = best_of(lambda: sparseswaps(w, gram, starts["wanda"], target, refit=True), 1)
        print(f"{'':>9}  sparseswaps from wanda + refit {t_rf:6.3f}s  rel. error {loss(rf.weight):.4f}", flush=True)


if __name__ == "__main__":
    main()
