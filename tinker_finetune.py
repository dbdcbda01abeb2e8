#!/usr/bin/env python3
"""Fine-tune a LoRA adapter in one screen: data -> Datums -> forward_backward/optim_step -> adapter.

The same client calls work with the Tinker SDK's TrainingClient; here they run on tinkerkit's local
engine. `tinkerkit train` is the full-featured version of this loop (resume, schedules, metrics).

Usage: python tinker_finetune.py   (after `make install`; edit the settings below)
"""

import argparse
import sys

import numpy as np
import tinker

from tinkerkit.data.formats import load_conversations
from tinkerkit.engines.local import LocalTrainingClient
from tinkerkit.errors import TinkerkitError
from tinkerkit.render import Renderer
from tinkerkit.train import normalize_batch

# ---- settings -------------------------------------------------------------------------------
DATA_FILE = "data/train_set.json"   # any format the loader knows (see `tinkerkit split`)
BASE_MODEL = "smollm2-135m-instruct"
LORA_RANK = 16
LEARNING_RATE = 2e-4
BATCH_SIZE = 8
NUM_STEPS = 20
MAX_SEQUENCE_LENGTH = 512
OUTPUT_NAME = "tinker_finetune_final"
# -----------------------------------------------------------------------------------------------

# No options: the settings are the lines above; -h prints this file's description and stops.
argparse.ArgumentParser(description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
try:
    conversations = load_conversations([DATA_FILE]).conversations
except TinkerkitError as error:  # a missing or malformed file: one line, no traceback
    sys.exit(f"error: {error}")
client = LocalTrainingClient(BASE_MODEL, LORA_RANK, checkpoint_root="runs/tinker_finetune")
renderer = Renderer(client.get_tokenizer(), max_length=MAX_SEQUENCE_LENGTH)
examples, stats = renderer.render_dataset(conversations)
print(f"{stats.processed} examples ({stats.truncated} truncated, {stats.skipped} skipped)")

order = np.random.default_rng(0).permutation(len(examples))
for step in range(NUM_STEPS):
    batch = [examples[i] for i in order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]]
    # Weights divided by the weighted tokens of the whole step: the loss is the mean NLL per token.
    data, _, _ = normalize_batch(batch)
    result = client.forward_backward(data, "cross_entropy").result()
    client.optim_step(tinker.types.AdamParams(learning_rate=LEARNING_RATE)).result()
    print(f"step {step + 1}/{NUM_STEPS}  loss {result.metrics['loss:sum']:.4f}")

model_path = client.save_state(OUTPUT_NAME).result().path
print(f"model_path: {model_path}")
