#!/usr/bin/env python3
"""Train a LoRA adapter from a config file (the seed's entry point; see `tinkerkit train -h`).

Usage: python train_with_config.py [config.py] [--set KEY=VALUE ...] [--resume PATH]
A first argument that is a file is taken as the config (default: config.py next to this script).
"""
import sys
from pathlib import Path

from tinkerkit.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):
        args = ["--config", args[0], *args[1:]]
    elif "--config" not in args and "--resume" not in args:
        args = ["--config", str(Path(__file__).with_name("config.py")), *args]
    sys.exit(main(["train", *args]))
