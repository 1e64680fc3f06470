"""Small shared utilities: atomic file-system writes, logging, timing, environment info."""
