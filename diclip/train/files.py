"""Names of the files a training run keeps under ``train.output`` (and in each checkpoint).

Torch-free on purpose: the driver side of the stage (planning, staleness, the stall watcher, clearing a run) reads these
names without importing torch, and the worker side writes them, so both take them from here.
"""
STATE = "diclip_state.json"  # in each checkpoint: step and the per-rank RNG states
METRICS = "metrics.jsonl"  # one JSON record per logged step (setup, train, eval, resume)
PROGRESS = "progress.json"  # the last step whose checkpoint was reported (a record for a person)
TENSORBOARD = "tensorboard"  # event files for `tensorboard --logdir`
EXPORT = "export"  # what inference needs besides CLIP/diffusion weights
