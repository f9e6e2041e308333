"""A pretraining run: its options and RunConfig, the run directory and its checkpoints, the build-loop-evaluate-export story, export."""
