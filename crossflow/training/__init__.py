"""Training: the Trainer and its CLI config, the data-set registry, optimiser schedules and FSDP."""
