"""`flax-bert finetune`: judge an encoder as its users do, by fine-tuning it on labelled texts.

`data` reads and tokenizes labelled (pairs of) texts and batches them by length, `metrics` scores
predictions, `trainer` fine-tunes one seed (the mesh, sharding, optimizer and jitted step of
pretraining, with a sequence-classification head from `flax_bert.models`), `sweep` runs the grid of
settings x seeds, resumes it, writes results.json and exports the best seed, and `command` is the CLI.
This package sits above `run` (it reads run directories) and below `cli`.
"""
