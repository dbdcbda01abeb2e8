"""Example training config for `python train_with_config.py` / `tinkerkit train --config config.py`.

Every UPPERCASE name is a setting; anything left out takes its default (docs/SETTINGS.md).
Override any of them on the command line: --set LEARNING_RATE=2e-4
"""

# Data: JSON or JSON Lines; chat `messages`, prompt/completion, GSM8K question/answer, MATH, s1K, alpaca.
DATA_FILES = ["data/train_set.json"]
TEST_FILES = ["data/test_set.json"]

# Model and LoRA
BASE_MODEL = "smollm2-135m-instruct"  # registry name, HF directory or hub id
LORA_RANK = 16
LORA_ALPHA = 32                       # scale alpha / rank = 2

# Long-text handling
MAX_SEQUENCE_LENGTH = 512             # tokens, chat template included
TRUNCATE_LONG_SEQUENCES = True        # False: skip longer examples instead of cutting them

# Optimization
LEARNING_RATE = 2e-4
LR_SCHEDULE = "linear"                # constant | linear | cosine
WARMUP_STEPS = 10
NUM_EPOCHS = 1
BATCH_SIZE = 8
MAX_STEPS = 100                       # None: all epochs
SEED = 42
SAVE_EVERY = 50                       # checkpoint every N steps (0: only at the end)

# Evaluation sampling
TEMPERATURE = 0.0                     # 0 = greedy, the seed's guidance for evaluation
MAX_TOKENS = 256
