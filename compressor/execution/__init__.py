"""How jobs run: one Executor interface, in-process or as Ray tasks. Methods never see which."""

from compressor.execution.base import Executor, InProcessExecutor, ExecutorConfig, make_executor

__all__ = ["Executor", "InProcessExecutor", "ExecutorConfig", "make_executor"]
