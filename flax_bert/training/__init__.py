"""The device side of training: the jitted train/eval step, masking, optimizers, sharding rules, preemption, multi-process helpers, metrics and peak FLOP/s."""
