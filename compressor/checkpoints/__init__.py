"""Checkpoints and export: masks, HF folders, compressed N:M shards."""
