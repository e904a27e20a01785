"""Tensor and expert parallelism of the decoder over `torch.distributed` (one process per rank).

`config.py` the flags; `plan.py` which part of each tensor a rank holds; `layers.py` the
transform that gives the decoder a rank's modules (the all-reduces); `comm.py` the process
group; `step.py` the per-step broadcast of rank 0's inputs; `worker.py` ranks 1..N-1;
`workers.py` rank 0's handle on them; `report.py` per-rank memory at start-up.
"""
