"""Sparsification methods: pure per-layer functions (weight, statistics, options) -> mask / weight."""
