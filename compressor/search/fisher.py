"""Layer sensitivity: the trace of the empirical Fisher information of each linear's weight.

    tr F_l = (1 / N) * sum_n || d loss_n / d W_l ||_F^2,   reported per weight: / (out_l * in_l)

with loss_n the mean next-token cross-entropy of calibration sequence n. It is the mean of the
per-sequence squared gradient norms, not the squared norm of the mean gradient (which goes to zero on a
converged model however sensitive a layer is).

How: forward hooks on the requested linears keep each one's input x (B, T, in), and a hook on its output
receives d loss / d y (B, T, out) in the backward pass. With the batch loss the *sum* of the sequences'
losses, row b of that gradient is exactly d loss_b / d y_b (sequences never mix in a causal LM), so
sequence b's weight gradient is g_b^T x_b (out, in), formed and squared in the hook: one backward per
batch gives every sequence's own gradient. Every parameter's requires_grad is switched off for the pass
(the graph hangs off the input embeddings instead), so autograd forms no weight gradients at all: not
for the LM head (vocab x hidden, as costly as the whole head's forward) nor anything else not asked for,
and no .grad buffers are allocated. torch.func (vmap over grad) would materialise per-sample gradients of
every parameter and needs functional model code, which HF models are not.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class FisherTraces:
    """Sums of per-sequence squared gradient norms; additive, so partial results (e.g. of several
    workers, or of a resumed pass) ``merge``."""

    sq_grad_sums: dict[str, float]  # sum over sequences of ||d loss_n / d W||_F^2
    numel: dict[str, int]  # out * in
    sequences: int = 0

    def merge(self, other: "FisherTraces") -> "FisherTraces":
        if self.numel != other.numel:
            raise ValueError("Fisher traces of different layers cannot be merged")
        sums = {n: self.sq_grad_sums[n] + other.sq_grad_sums[n] for n in self.sq_grad_sums}
        return FisherTraces(sums, dict(self.numel), self.sequences + other.sequences)

    def layer_traces(self) -> dict[str, float]:
        """tr F_l per weight: mean over sequences of the squared gradient norm, / (out * in)."""
        self._check()
        return {n: s / (self.sequences * self.numel[n]) for n, s in self.sq_grad_sums.items()}

    def block_traces(self, block_of: Optional[Callable[[str], str]] = None) -> dict[str, float]:
        """The trace of the Fisher block of all a decoder block's linears together, per weight (the
        total trace over the block / its weights; not the mean of its layers' per-weight traces)."""
        self._check()
        block_of = block_of or default_block_of
        sums: dict[str, float] = {}
        sizes: dict[str, int] = {}
        for n, s in self.sq_grad_sums.items():
            b = block_of(n)
            sums[b] = sums.get(b, 0.0) + s
            sizes[b] = sizes.get(b, 0) + self.numel[n]
        return {b: sums[b] / (self.sequences * sizes[b]) for b in sums}

    def _check(self) -> None:
        if self.sequences < 1:
            raise ValueError("no calibration sequences were seen")


def default_block_of(name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'model.layers.3': the name up to its first numeric part."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", name)
    if match is None:
        raise ValueError(f"{name!r} has no block index; pass block_of")
    return match.group(1)


def fisher_traces(model: nn.Module, names: Sequence[str], windows: Iterable[torch.Tensor],
                  batch_size: int = 1, desc: Optional[str] = None) -> FisherTraces:
    """Stream ``windows`` (an iterable of (T,) or (B, T) token-id tensors, e.g. the (N, T) calibration
    windows) through ``model`` (a transformers causal LM) in batches of ``batch_size`` sequences and
    return the summed squared per-sequence gradient norms of the linears ``names``. Memory grows with
    batch_size x T x vocab (the logits and their gradient); the result does not depend on it. ``desc``:
    show a progress bar (sequences) under that name."""
    linears = {n: model.get_submodule(n) for n in names}
    for n, m in linears.items():
        if not isinstance(m, nn.Linear):
            raise TypeError(f"{n} is a {type(m).__name__}, not an nn.Linear")
    sums = {n: torch.zeros((), dtype=torch.float64) for n in names}
    sequences = 0
    with _weights_frozen(model), _gradient_hooks(linears, sums), torch.enable_grad():
        total = sum(len(w) if w.ndim > 1 else 1 for w in windows) if isinstance(windows, (list, tuple)) else (
            len(windows) if isinstance(windows, torch.Tensor) else None)
        with tqdm(total=total, desc=desc, unit="seq", disable=desc is None) as bar:
            for batch in _batches(windows, batch_size):
                _sum_of_sequence_losses(model, batch).backward()
                sequences += batch.shape[0]
                bar.update(batch.shape[0])
    return FisherTraces({n: float(s) for n, s in sums.items()}, {n: m.weight.numel() for n, m in linears.items()},
                        sequences)


def _sum_of_sequence_losses(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """sum_b (mean next-token cross-entropy of sequence b), the graph rooted at the input embeddings."""
    ids = ids.to(next(model.parameters()).device)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # (B, T, H)
    hidden = model.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state  # (B, T, H)
    logits = model.get_output_embeddings()(hidden[:, :-1])  # (B, T-1, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    return nll.mean(dim=1).sum()


def _batches(windows: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Rows of the given tensors regrouped into (<= batch_size, T) batches of one length T."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows: list[torch.Tensor] = []
    for w in windows:
        for row in (w.unsqueeze(0) if w.ndim == 1 else w):
            if rows and (len(rows) == batch_size or row.shape != rows[0].shape):
                yield torch.stack(rows)
                rows = []
            if row.numel() < 2:
                raise ValueError("a sequence needs at least 2 tokens to predict one")
            rows.append(row.long())
    if rows:
        yield torch.stack(rows)


@contextmanager
def _weights_frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (autograd then forms no weight gradient); restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()  # no dropout: the gradients are of the deterministic model
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def _gradient_hooks(linears: dict[str, nn.Linear], sums: dict[str, torch.Tensor]) -> Iterator[None]:
    def forward_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach()  # (B, T, in)

            def on_output_grad(g: torch.Tensor) -> None:  # (B, T, out): d loss_b / d y_b in row b
                dtype = torch.promote_types(g.dtype, torch.float32)  # at least float32 for bf16 models
                for b in range(g.shape[0]):  # one sequence at a time: (out, in) alive, not (B, out, in)
                    grad_w = g[b].to(dtype).T @ x[b].to(dtype)  # (out, in) = d loss_b / d W
                    sums[name] += grad_w.double().pow(2).sum()

            if output.requires_grad:
                output.register_hook(on_output_grad)
        return hook

    handles = [m.register_forward_hook(forward_hook(n)) for n, m in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
