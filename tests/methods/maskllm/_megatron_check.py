"""Run in a subprocess by test_megatron.py: masks on real megatron-core parallel linears (TP=1, gloo, CPU)."""

import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def main() -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from compressor.methods.maskllm import MaskLLMConfig, attach_masks, mask_train, remove_masks
    from compressor.sparsity import NM, assert_nm

    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    cfg = ModelParallelConfig(use_cpu_initialization=True)
    init = nn.init.normal_
    model = nn.Module()
    model.col = ColumnParallelLinear(16, 32, config=cfg, init_method=init, bias=True, gather_output=False)
    model.row = RowParallelLinear(32, 16, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                                  skip_bias_add=True)
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in ("col", "row")}
    masks = attach_masks(model, ["col", "row"], MaskLLMConfig(sparsity="2:4"))
    x = torch.randn(3, 2, 16)

    def run():
        h, _ = model.col(x)
        out, _ = model.row(h)
        return out

    with torch.no_grad():
        out = run()
    hard = {n: m.hard_mask() for n, m in masks.items()}
    h = F.linear(x, dense["col"] * hard["col"], model.col.bias)
    torch.testing.assert_close(out, F.linear(h, dense["row"] * hard["row"]), rtol=1e-6, atol=1e-6)

    mask_train(masks, True)
    run().pow(2).sum().backward()
    for n, m in masks.items():
        assert m.logits.grad is not None and m.logits.grad.abs().sum() > 0, n
        assert model.get_submodule(n).parametrizations.weight.original.grad is None, n

    mask_train(masks, False)
    remove_masks(model, bake=True)
    for n in ("col", "row"):
        layer = model.get_submodule(n)
        assert not hasattr(layer, "parametrizations") and isinstance(layer.weight, nn.Parameter)
        assert torch.equal(layer.weight, dense[n] * hard[n])
        assert_nm(layer.weight, NM(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(run(), out, rtol=0, atol=0)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    print("MEGATRON-OK")


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    main()
