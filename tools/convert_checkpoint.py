#!/usr/bin/env python
"""Convert checkpoints: a compressor run, an HF dense-with-zeros folder, or compressed N:M shards.

The same as `compressor export` (see compressor/runs/export.py), runnable from a checkout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    from compressor.runs.export import EXAMPLES, add_export_arguments, run_export
    from compressor.utils.logging import setup_logging

    ap = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(ap)
    args = ap.parse_args(argv)
    setup_logging("INFO")
    return run_export(args)


if __name__ == "__main__":
    sys.exit(main())
