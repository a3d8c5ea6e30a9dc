"""Bundled update rules (each a folder with config.json, model.safetensors and README.md).

Installed as ``learned_optim.pretrained``; load one with
``LearnedOptimizer(params, pretrained="<folder name>")``.
"""
