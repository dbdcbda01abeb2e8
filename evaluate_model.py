#!/usr/bin/env python3
"""Evaluate a base model or a trained checkpoint on a test set (the seed's entry point).

Usage: python evaluate_model.py --data data/test_set.json [--checkpoint PATH] [--limit N]
See `tinkerkit eval -h` for every option.
"""
import sys

from tinkerkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
