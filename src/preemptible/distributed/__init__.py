"""Process groups and launchers (torchrun's variables, the exit path) and model parallelism (DDP, FSDP2)."""
