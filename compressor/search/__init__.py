"""Mixed-sparsity search (issue 16). The pure parts: Fisher-trace sensitivities (``fisher``), level sets
and the exact-average search space (``levels``, ``repair``), evolutionary operators and multi-step
selection (``evolution``), OWL's outlier-weighted allocation (``owl``) and fitness from logits
(``fitness``). The parts that do work, composed by ``compressor.runs.search``: the level database on disk
(``database``), fitness jobs on an executor (``scoring``), the checkpointed generation loop (``loop``),
the config (``config``) and the report (``report``)."""
