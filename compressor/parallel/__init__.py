"""Scale-out of mask learning: megatron-core TP x PP x DP workers, scheduled by Ray.

Model side (megatron_*.py) knows nothing of Ray; the Ray side (ray_*.py) runs any per-rank entry.
"""
