"""Experiment runner: python train_exp.py '<json overrides for CONFIGS[preset]>' <crossflow train args...>"""
import json, sys, torch
torch.set_num_threads(1)
from crossflow import config
over = json.loads(sys.argv[1]); argv = sys.argv[2:]
preset = argv[argv.index("--preset") + 1]
config.CONFIGS[preset] = dict(config.CONFIGS[preset], **over)
from crossflow.training.train import main
main(argv)
