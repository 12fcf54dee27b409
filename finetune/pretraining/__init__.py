"""Base pipelines: the tiny offline SD-1.x bases, the shipped drawing base, and pretraining one."""
