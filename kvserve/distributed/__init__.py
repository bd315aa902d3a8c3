"""Tensor and pipeline parallelism on torch.distributed; data-parallel replicas."""
