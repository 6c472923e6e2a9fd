"""CP attention programs in plain torch.distributed, run unmodified by cpinspect's simulated group."""
