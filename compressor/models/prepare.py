"""`make models`: assemble and verify each split-GGUF model once, then convert it to its cached HF folder.

    python -m compressor.models.prepare                      # both Qwen2.5-Coder models
    python -m compressor.models.prepare qwen2.5-coder-0.5b --no-convert
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from compressor.models.assets import SplitGGUF
from compressor.models.loading import EMBEDDED_MODELS, local_folder, resolve_source
from compressor.utils.logging import setup_logging


def main(argv: Optional[Sequence[str]] = None) -> int:
    split = sorted(a for a, spec in EMBEDDED_MODELS.items() if isinstance(spec, SplitGGUF))
    ap = argparse.ArgumentParser(prog="python -m compressor.models.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("aliases", nargs="*", default=split, help=f"model aliases (default: {' '.join(split)})")
    ap.add_argument("--no-convert", action="store_true", help="only assemble and verify the GGUF files")
    args = ap.parse_args(argv)
    setup_logging()
    for alias in args.aliases:
        if alias not in EMBEDDED_MODELS:
            ap.error(f"unknown model alias {alias!r}; known: {sorted(EMBEDDED_MODELS)}")
        src = resolve_source(alias)  # assembles and verifies once
        print(f"{alias}: {src.location if args.no_convert else local_folder(src)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
