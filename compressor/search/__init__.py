"""Mixed-sparsity search (issue 16), the pure parts: Fisher-trace sensitivities (``fisher``), level sets
and the exact-average search space (``levels``, ``repair``), evolutionary operators and multi-step
selection (``evolution``), OWL's outlier-weighted allocation (``owl``) and fitness from logits
(``fitness``). Nothing here schedules work or touches files; the search command composes these."""
