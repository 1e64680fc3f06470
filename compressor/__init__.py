"""compressor: N:M sparsification of LLaMA-family language models.

The package mirrors the pipeline: ``data`` -> ``models`` -> ``calibration`` -> ``methods``
-> ``execution`` -> ``checkpoint`` -> ``eval``; ``config`` holds the typed run configs and
``runs`` the drivers behind the ``compressor`` command. Nothing heavy runs at import time.
"""

__version__ = "0.1.0"
