"""`compress sweep`: a grid of shrinks (method x bits x prune) of one checkpoint, each point an artifact,
evaluated, cached for resuming, and drawn as an accuracy-vs-size Pareto frontier against the baselines.

    from compress.sweep import SweepConfig, run_sweep
    config = SweepConfig.from_options(model="compress:digits-cnn", checkpoint="model.safetensors", num_classes=10,
                                      bits=(2, 3, 4), prune=(0, 0.4), methods=("jlcm", "rtn"), data="digits:val")
    sweep = run_sweep(config, "runs/sweep")     # runs/sweep/sweep.json, report.html, points/*.safetensors
"""
from compress.sweep.config import SweepConfig
from compress.sweep.run import run_sweep

__all__ = ["SweepConfig", "run_sweep"]
