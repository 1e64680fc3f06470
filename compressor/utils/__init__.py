"""Small shared utilities: atomic file-system writes, logging, timing, per-layer thread pools, environment info."""
