#!/usr/bin/env python3
"""Split data files into train and test sets (the seed's entry point; see `tinkerkit split -h`).

Usage: python split_dataset.py FILE [FILE ...] [--test-ratio 0.2] [--seed 42] [--output-dir data]
"""
import sys

from tinkerkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["split", *sys.argv[1:]]))
