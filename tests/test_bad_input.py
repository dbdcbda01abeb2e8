"""Bad input everywhere a user hands tinkerkit something: one table, run through the real CLI.

Each case writes its inputs into a fresh directory, runs ``tinkerkit.cli.main(argv)`` and checks
one of two outcomes:

* ``ERROR``: exit code non-zero, exactly one line on stderr (``error: ...``) that contains every
  string of ``expect`` — the file, the line (where a line applies) and the field or key — and no
  traceback anywhere in the output; nothing new is written in the case directory.
* ``SKIP``: exit code 0, an empty stderr, and the count of what was skipped, truncated or failed
  printed on stdout (``expect`` holds those report strings).

Either way every input file (the case's files, the tiny models, the trained run) is byte-identical
afterwards (sha256 before and after).

The default run calls ``main()`` in this process (about 0.1-1 s a case instead of 4-5 s for a
fresh interpreter that imports torch); warnings are recorded and count as stderr lines, as a user
would see them. The slow run (``-m slow``) repeats the whole table in a subprocess,
``python -m tinkerkit.cli``, which also sees what libraries print at import and exit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from helpers import save_tiny_llama
from tinkerkit.cli import main
from tinkerkit.config import load_config
from tinkerkit.data.demo import write_demo_data
from tinkerkit.train import train as run_training

ERROR, SKIP = "error", "skip"


@dataclass(frozen=True)
class World:
    """Inputs shared by the cases: tiny models, a data file and a finished 2-step run."""

    model: str        # the tiny Llama (width 64) every run trains
    other_model: str  # another tiny Llama of the same shape (other seed): "a different base"
    data: Path        # 12 GSM8K-style records
    run: Path         # a run of `model`, LoRA rank 4, checkpoints at steps 1 and 2

    @property
    def checkpoint(self) -> Path:
        return self.run / "checkpoints" / "step_000002"

    def inputs(self) -> list[Path]:
        """Every directory of shared inputs (models, data, run), for the before/after hashes."""
        return [Path(self.model), self.data.parent]


@dataclass(frozen=True)
class Case:
    """One row: ``setup(case_dir, world)`` writes the inputs and returns the argv."""

    id: str
    setup: Callable[[Path, World], list[str]]
    outcome: str
    expect: tuple[str, ...] = ()
    comment: str = ""
    writes: tuple[str, ...] = ()  # what a SKIP case may create in its directory (its outputs)


# -- input builders ------------------------------------------------------------------------------

def chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = [chat(("user", f"What is {i} + {i}?"), ("assistant", f"{i} + {i} = {2 * i}. #### {2 * i}"))
        for i in range(1, 7)]


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write(d: Path, name: str, content: str | bytes) -> str:
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def with_bad(bad: object, at: int = 2) -> str:
    """Good chat records with ``bad`` on line ``at`` (1-based)."""
    records = list(GOOD)
    records.insert(at - 1, bad)
    return jsonl(records)


def split(d: Path, content: str | bytes, name: str = "data.jsonl", *extra: str) -> list[str]:
    return ["split", write(d, name, content), "--output-dir", str(d / "out"), *extra]


def train(d: Path, w: World, *extra: str, data: str | None = None) -> list[str]:
    """``tinkerkit train`` on the tiny model (rank 4, batch 2, 1 step, CPU) in ``d/run``."""
    return ["train", "--data", data or str(w.data), "--model", w.model, "--rank", "4",
            "--batch-size", "2", "--max-steps", "1", "--max-length", "128",
            "--run-dir", str(d / "run"), "--set", "DEVICE=cpu", *extra]


def train_on(d: Path, w: World, content: str, *extra: str) -> list[str]:
    return train(d, w, *extra, data=write(d, "data.jsonl", content))


def config(d: Path, w: World, name: str, content: str | bytes, *extra: str) -> list[str]:
    return ["train", "--config", write(d, name, content), "--data", str(w.data), "--model",
            w.model, "--run-dir", str(d / "run"), "--dry-run", *extra]


def copy_checkpoint(d: Path, w: World, change: Callable[[Path], None]) -> str:
    target = d / "ckpt"
    shutil.copytree(w.checkpoint, target)
    change(target)
    return str(target)


def truncate_file(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def garbage_file(path: Path) -> None:
    path.write_bytes(os.urandom(64))


def nan_weights(checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, checkpoint / "adapter_model.safetensors")


def copy_run(d: Path, w: World, change: Callable[[Path], None] = lambda run: None) -> str:
    target = d / "run"
    shutil.copytree(w.run, target)
    change(target)
    return str(target)


def corrupt_line(path: Path, line: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1][: len(lines[line - 1]) // 2] + "\n"
    path.write_text("".join(lines))


def export(d: Path, checkpoint: str) -> list[str]:
    return ["export", checkpoint, "--output", str(d / "exported")]


def evaluate(d: Path, w: World, *extra: str, data: str | None = None,
             output: str | None = None) -> list[str]:
    return ["eval", "--data", data or str(w.data), "--limit", "1", "--max-tokens", "4",
            "--output", output or str(d / "results.json"), "--set", "DEVICE=cpu", *extra]


def evaluate_into_the_test_file(d: Path, w: World) -> list[str]:
    test_file = write(d, "test.json", json.dumps(GOOD))
    return evaluate(d, w, "--model", w.model, data=test_file, output=test_file)


def long_record(chars: int) -> dict:
    """A chat whose assistant answer makes it ``chars`` characters long."""
    answer = ("lorem ipsum " * (chars // 12 + 1))[: chars - len("Write.")]
    return chat(("user", "Write."), ("assistant", answer))


def damaged_model(d: Path, w: World, file: str) -> list[str]:
    """A copy of the tiny model with ``file`` cut to 100 bytes, used by ``train --dry-run``."""
    model = d / "model"
    shutil.copytree(w.model, model)
    truncate_file(model / file)
    return ["train", "--data", str(w.data), "--model", str(model), "--rank", "4",
            "--batch-size", "2", "--run-dir", str(d / "run"), "--dry-run", "--set", "DEVICE=cpu"]


# -- the table -------------------------------------------------------------------------------------
# Each row: id, setup -> argv, the expected outcome (ERROR: one line, exit 1 or 2; SKIP: exit 0 and
# a count), the strings that line (or the report) must contain, and why, where it is not plain.

CASES = [
    # ---- data files ----
    Case("empty_file", lambda d, w: split(d, ""), ERROR, ("data.jsonl", "file is empty"),
         "a 0-byte file: the file named, nothing split"),
    Case("whitespace_only_file", lambda d, w: split(d, "\n  \n\t\n"), ERROR,
         ("data.jsonl", "file is empty"), "blank lines only count as empty"),
    Case("json_array_trailing_comma",
         lambda d, w: split(d, '[\n  {"prompt": "a", "completion": "b"},\n'
                               '  {"prompt": "c", "completion": "d"},\n]\n', "data.json"),
         ERROR, ("data.json:4", "trailing comma"), "the line of the ']' after the comma"),
    Case("jsonl_truncated_line_in_middle",
         lambda d, w: split(d, jsonl(GOOD[:3]) + '{"messages": [{"role": "user", "cont\n'
                               + jsonl(GOOD[3:])),
         ERROR, ("data.jsonl:4", "invalid JSON"), "line 4 of 7 cut short"),
    Case("invalid_utf8_bytes",
         lambda d, w: split(d, jsonl(GOOD[:2]).encode() + b'{"prompt": "caf\xe9 \xff",'
                               b' "completion": "x"}\n' + jsonl(GOOD[2:]).encode()),
         ERROR, ("data.jsonl:3", "invalid UTF-8"), "Latin-1 bytes on line 3"),
    Case("null_content", lambda d, w: split(d, with_bad(chat(("user", "hi"), ("assistant", None)))),
         ERROR, ("data.jsonl:2", "messages[1].content", "got null")),
    Case("number_where_text_expected",
         lambda d, w: split(d, jsonl([{"question": 42, "answer": "#### 1"},
                                      {"question": "q", "answer": "#### 2"}])),
         ERROR, ("data.jsonl:1", "'question'", "got number")),
    Case("nan_where_text_expected",
         lambda d, w: split(d, '{"prompt": "a", "completion": "b"}\n'
                               '{"prompt": NaN, "completion": "c"}\n'),
         ERROR, ("data.jsonl:2", "'prompt'", "got number"), "Python's json accepts NaN"),
    Case("unknown_role", lambda d, w: split(d, with_bad(chat(("user", "hi"), ("bot", "hello")), 3)),
         ERROR, ("data.jsonl:3", "messages[1].role", "'bot'")),
    Case("content_parts_with_an_image",
         lambda d, w: split(d, with_bad(chat(("user", [{"type": "text", "text": "hi"},
                                                       {"type": "image_url",
                                                        "image_url": {"url": "x.png"}}]),
                                             ("assistant", "x")))),
         ERROR, ("data.jsonl:2", "messages[0].content[1]", "'image_url' content part"),
         "OpenAI content parts: text parts are read, an image is not text"),
    Case("empty_messages_list", lambda d, w: split(d, with_bad({"messages": []})), ERROR,
         ("data.jsonl:2", "'messages'", "empty conversation")),
    Case("record_not_an_object", lambda d, w: split(d, "[1, 2]\n", "data.json"), ERROR,
         ("data.json:1", "expected a JSON object, got number")),
    Case("unknown_record_shape", lambda d, w: split(d, jsonl([{"text": "a"}, {"text": "b"}])),
         ERROR, ("data.jsonl:1", "unknown record shape", "['text']")),
    Case("forced_format_mismatch",
         lambda d, w: split(d, jsonl(GOOD), "data.jsonl", "--format", "alpaca"),
         ERROR, ("data.jsonl:1", "'instruction'", "missing")),
    Case("unknown_format_name", lambda d, w: split(d, jsonl(GOOD), "data.jsonl", "--format", "xml"),
         ERROR, ("unknown format 'xml'",)),
    Case("data_path_is_a_directory", lambda d, w: ["split", str(d), "--output-dir", str(d / "o")],
         ERROR, ("is a directory",), "the directory named; the files inside are not guessed"),
    Case("data_file_missing",
         lambda d, w: ["split", str(d / "nope.jsonl"), "--output-dir", str(d / "out")], ERROR,
         ("nope.jsonl", "file not found")),
    Case("train_data_file_missing", lambda d, w: train(d, w, data=str(d / "nope.jsonl")), ERROR,
         ("DATA_FILES", "nope.jsonl", "file not found")),
    Case("config_data_file_missing",
         lambda d, w: ["train", "--config", write(d, "cfg.yaml", "DATA_FILES: [gone.jsonl]\n"),
                       "--model", w.model, "--dry-run"],
         ERROR, ("cfg.yaml: DATA_FILES=['gone.jsonl']", "file not found: gone.jsonl")),
    Case("one_bad_line_skipped_and_counted",
         lambda d, w: split(d, with_bad({"messages": "oops"}, 4), "data.jsonl", "--on-error",
                            "skip"),
         SKIP, ("skipped: 1 bad records", "data.jsonl:4"),
         "--on-error skip: counted, reported with its location, the rest split",
         writes=("out",)),
    Case("all_records_bad_with_skip",
         lambda d, w: split(d, jsonl([{"messages": 1}, {"messages": 2}]), "data.jsonl",
                            "--on-error", "skip"),
         ERROR, ("no valid records", "2 skipped", "data.jsonl:1")),
    Case("no_assistant_turn",
         lambda d, w: train_on(d, w, with_bad(chat(("system", "s"), ("user", "hi")), 3)),
         ERROR, ("data.jsonl:3", "'messages'", "no assistant message")),
    Case("no_assistant_turn_skipped",
         lambda d, w: train_on(d, w, with_bad(chat(("user", "hi")), 3), "--set", "ON_ERROR=skip",
                               "--dry-run"),
         SKIP, ("Failed: 1", "data.jsonl:3: no assistant message"),
         "ON_ERROR=skip: a failed render is counted and its reason listed"),
    Case("conversation_ends_with_user_turn",
         lambda d, w: train_on(d, w, with_bad(chat(("user", "hi"), ("assistant", "hello"),
                                                   ("user", "and?")), 2)),
         ERROR, ("data.jsonl:2", "'messages'", "ends with a user turn"),
         "a trailing user turn has nothing after it to learn; likely a cut conversation"),
    Case("failed_record_after_a_skipped_one",
         lambda d, w: train_on(d, w, jsonl([chat(("user", "long " * 400), ("assistant", "a")),
                                            *GOOD[:3], chat(("user", "hi"))])),
         ERROR, ("data.jsonl:5", "no assistant message"),
         "the error names the failed record, not the skipped (too long) one before it"),
    Case("record_of_200000_characters",
         lambda d, w: train_on(d, w, with_bad(long_record(200_000), 2), "--dry-run"),
         SKIP, ("Truncated: 1", "Longer than MAX_SEQUENCE_LENGTH=128: 1"),
         "truncated at MAX_SEQUENCE_LENGTH, counted and reported; the other 6 are whole"),
    Case("record_of_200000_characters_no_truncation",
         lambda d, w: train_on(d, w, with_bad(long_record(200_000), 2), "--dry-run", "--set",
                               "TRUNCATE_LONG_SEQUENCES=false"),
         SKIP, ("Skipped: 1", "data.jsonl:2:"), "TRUNCATE_LONG_SEQUENCES=False: skipped, counted"),
    Case("every_record_longer_than_max_length",
         lambda d, w: train(d, w, "--max-length", "16"), ERROR,
         ("train.jsonl", "no training example left", "MAX_SEQUENCE_LENGTH=16"),
         "truncation cuts every answer: nothing to train on"),
    Case("every_record_longer_than_max_length_no_truncation",
         lambda d, w: train(d, w, "--max-length", "16", "--set", "TRUNCATE_LONG_SEQUENCES=false"),
         ERROR, ("train.jsonl", "no training example left", "MAX_SEQUENCE_LENGTH=16")),
    Case("thinking_not_text",
         lambda d, w: split(d, with_bad({"messages": [
             {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a", "thinking": 7}]})),
         ERROR, ("data.jsonl:2", "messages[1].thinking", "got number")),
    Case("s1k_trajectories_not_a_list",
         lambda d, w: split(d, jsonl([{"question": "q", "thinking_trajectories": "t",
                                       "attempt": "a"}] * 2)),
         ERROR, ("data.jsonl:1", "thinking_trajectories", "got string")),
    Case("parquet_file_unreadable", lambda d, w: split(d, os.urandom(300), "data.parquet"),
         ERROR, ("data.parquet", "Parquet")),
    Case("train_data_path_is_a_directory", lambda d, w: train(d, w, data=str(d)), ERROR,
         ("case", "is a directory")),
    # ---- config files ----
    Case("config_mistyped_key", lambda d, w: config(d, w, "cfg.py", "LERNING_RATE = 1e-4\n"),
         ERROR, ("cfg.py", "LERNING_RATE", "did you mean LEARNING_RATE")),
    Case("config_negative_learning_rate",
         lambda d, w: config(d, w, "cfg.toml", "LEARNING_RATE = -0.001\n"), ERROR,
         ("LEARNING_RATE=-0.001", "cfg.toml", "greater than 0")),
    Case("config_lora_rank_zero", lambda d, w: config(d, w, "cfg.yaml", "LORA_RANK: 0\n"), ERROR,
         ("LORA_RANK=0", "cfg.yaml", "greater than 0")),
    Case("config_wrong_type", lambda d, w: config(d, w, "cfg.yaml", "BATCH_SIZE: eight\n"), ERROR,
         ("BATCH_SIZE='eight'", "cfg.yaml", "integer")),
    Case("config_python_raises", lambda d, w: config(d, w, "cfg.py", "LORA_RANK = 1 / 0\n"), ERROR,
         ("cfg.py", "ZeroDivisionError")),
    Case("config_toml_syntax_error",
         lambda d, w: config(d, w, "cfg.toml", "LORA_RANK = 4\nLEARNING_RATE = = 1\n"), ERROR,
         ("cfg.toml", "line 2")),
    Case("config_yaml_not_a_mapping", lambda d, w: config(d, w, "cfg.yaml", "- 1\n- 2\n"), ERROR,
         ("cfg.yaml", "mapping")),
    Case("config_invalid_utf8", lambda d, w: config(d, w, "cfg.toml", b"SEED = 1 # \xff\n"), ERROR,
         ("cfg.toml", "utf-8")),
    Case("config_unknown_suffix", lambda d, w: config(d, w, "cfg.json", "{}"), ERROR,
         ("cfg.json", "unknown config type")),
    Case("config_file_missing", lambda d, w: ["train", "--config", str(d / "none.py")], ERROR,
         ("none.py", "not found")),
    Case("config_unknown_enum_value",
         lambda d, w: config(d, w, "cfg.yaml", "LR_SCHEDULE: exponential\n"), ERROR,
         ("LR_SCHEDULE='exponential'", "cfg.yaml", "cosine")),
    Case("config_eval_every_without_held_out",
         lambda d, w: config(d, w, "cfg.toml", "EVAL_EVERY = 2\n"), ERROR,
         ("EVAL_EVERY=2", "cfg.toml", "EVAL_DATA_FILES")),
    # ---- command-line arguments ----
    Case("cli_lora_rank_zero", lambda d, w: train(d, w, "--rank", "0"), ERROR,
         ("the command line: LORA_RANK=0", "greater than 0")),
    Case("cli_negative_learning_rate", lambda d, w: train(d, w, "--lr=-1e-4"), ERROR,
         ("the command line: LEARNING_RATE=-0.0001", "greater than 0")),
    Case("batch_size_larger_than_dataset", lambda d, w: train(d, w, "--batch-size", "100"), ERROR,
         ("BATCH_SIZE=100", "12 training examples", "train.jsonl")),
    Case("test_ratio_zero", lambda d, w: split(d, jsonl(GOOD), "data.jsonl", "--test-ratio", "0"),
         ERROR, ("--test-ratio", "(0, 1)", "0.0")),
    Case("test_ratio_one", lambda d, w: split(d, jsonl(GOOD), "data.jsonl", "--test-ratio", "1"),
         ERROR, ("--test-ratio", "(0, 1)", "1.0")),
    Case("test_size_too_large",
         lambda d, w: split(d, jsonl(GOOD), "data.jsonl", "--test-size", "6"), ERROR,
         ("--test-size", "[1, 5]", "6")),
    Case("cli_not_an_integer", lambda d, w: train(d, w, "--rank", "four"), ERROR,
         ("--rank", "'four'"), "argparse's error, on one line"),
    Case("cli_unknown_option", lambda d, w: train(d, w, "--learning-rate", "1e-4"), ERROR,
         ("--learning-rate",)),
    Case("cli_set_without_equals", lambda d, w: train(d, w, "--set", "LEARNING_RATE"), ERROR,
         ("--set", "'LEARNING_RATE'", "KEY=VALUE")),
    Case("cli_set_unknown_key", lambda d, w: train(d, w, "--set", "LORA_RANKS=4"), ERROR,
         ("LORA_RANKS", "did you mean LORA_RANK")),
    Case("cli_max_length_one", lambda d, w: train(d, w, "--max-length", "1"), ERROR,
         ("MAX_SEQUENCE_LENGTH=1",)),
    Case("cli_set_wrong_type", lambda d, w: train(d, w, "--set", "NUM_EPOCHS=many"), ERROR,
         ("--set: NUM_EPOCHS='many'", "integer")),
    Case("cli_resume_and_init_from",
         lambda d, w: ["train", "--resume", str(w.run), "--init-from", str(w.checkpoint)], ERROR,
         ("--resume", "--init-from")),
    Case("split_output_dir_is_a_file",
         lambda d, w: ["split", str(w.data), "--output-dir", write(d, "taken", "x")], ERROR,
         ("taken",)),
    Case("split_output_overwrites_input",
         lambda d, w: ["split", write(d, "train_set.json", json.dumps(GOOD)), "--output-dir",
                       str(d)], ERROR, ("train_set.json", "overwrite the input")),
    Case("eval_num_samples_zero", lambda d, w: evaluate(d, w, "--model", w.model,
                                                        "--num-samples", "0"),
         ERROR, ("num_samples", "0")),
    Case("eval_output_is_a_directory",
         lambda d, w: evaluate(d, w, "--model", w.model, output=str(d)), ERROR,
         ("--output", "cannot be written")),
    Case("eval_output_is_the_test_file", evaluate_into_the_test_file, ERROR,
         ("--output", "test.json", "overwrite the input"),
         "the results would replace the data being evaluated"),
    Case("eval_output_inside_the_checkpoint",
         lambda d, w: evaluate(d, w, "--checkpoint", copy_checkpoint(d, w, lambda c: None),
                               output=str(d / "ckpt" / "tinkerkit_state.json")),
         ERROR, ("--output", "overwrite the input", "ckpt")),
    Case("eval_compare_missing_file",
         lambda d, w: ["eval", "--compare", str(d / "a.json"), str(d / "b.json")], ERROR,
         ("a.json",)),
    Case("eval_grader_syntax_error",
         lambda d, w: evaluate(d, w, "--model", w.model, "--grader",
                               write(d, "grading.py", "def extract_final_answer(text)\n")),
         ERROR, ("GRADER", "grading.py", "line 1", "SyntaxError")),
    Case("eval_grader_wrong_signature",
         lambda d, w: evaluate(d, w, "--model", w.model, "--grader",
                               write(d, "grading.py", "def score(output):\n    return 1.0\n")),
         ERROR, ("GRADER", "grading.py", "score(output)", "score(output, example)")),
    Case("train_grader_import_error",
         lambda d, w: config(d, w, "cfg.py",
                             f"GRADER = {write(d, 'grading.py', 'import no_such_module_here')!r}\n"),
         ERROR, ("GRADER", "grading.py", "ModuleNotFoundError", "no_such_module_here"),
         "checked by --dry-run, as by a run, before the model loads"),
    Case("train_grader_file_missing",
         lambda d, w: train(d, w, "--grader", str(d / "nope.py")), ERROR,
         ("GRADER=", "nope.py", "file not found")),
    Case("eval_grader_raises_on_every_output",
         lambda d, w: evaluate(d, w, "--model", w.model, "--grader",
                               write(d, "grading.py", "def extract_final_answer(text):\n"
                                                      "    return text.no_such_method()\n")),
         SKIP, ("grader failed on 1 of 1 outputs", "extract_final_answer raised AttributeError",
                "grading_errors"),
         "each output is a grading error, counted and reported; the run finishes",
         writes=("results.json", "results.md")),
    Case("run_dir_holds_another_run", lambda d, w: train(d, w)[:-4] + [
        "--run-dir", copy_run(d, w), "--set", "DEVICE=cpu"], ERROR,
         ("--run-dir", "already holds a run", "--resume")),
    Case("run_dir_is_a_file", lambda d, w: train(d, w)[:-4] + [
        "--run-dir", write(d, "file", "x"), "--set", "DEVICE=cpu"], ERROR,
         ("--run-dir", "file", "not a directory")),
    Case("stats_max_length_zero", lambda d, w: ["stats", str(w.data), "--max-length", "0"],
         ERROR, ("--max-length", "positive integer")),
    Case("export_unknown_dtype",
         lambda d, w: ["export", str(w.checkpoint), "--output", str(d / "e"), "--dtype", "int8"],
         ERROR, ("--dtype", "'int8'")),
    Case("export_unknown_gguf_type",
         lambda d, w: ["export", str(w.checkpoint), "--output", str(d / "e"), "--gguf", "q4_k"],
         ERROR, ("--gguf", "'q4_k'", "f16", "q8_0")),
    Case("set_data_files_empty", lambda d, w: train(d, w, "--set", "DATA_FILES="), ERROR,
         ("DATA_FILES",)),
    # ---- model names ----
    Case("model_name_resolving_to_nothing",
         lambda d, w: ["stats", str(w.data), "--model", "no-such-model"], ERROR,
         ("model 'no-such-model'", "smollm2-135m-instruct")),
    Case("model_dir_without_config",
         lambda d, w: ["stats", str(w.data), "--model", str(Path(write(d, "m/README", "x")).parent)],
         ERROR, ("model '", "/m'", "no config.json")),
    Case("model_hub_id_offline",
         lambda d, w: ["stats", str(w.data), "--model", "no-org/no-model"], ERROR,
         ("no-org/no-model",)),
    Case("model_dir_with_corrupted_weights",
         lambda d, w: damaged_model(d, w, "model.safetensors"), ERROR,
         ("/model'", "model.safetensors is damaged")),
    Case("model_dir_with_corrupted_config",
         lambda d, w: damaged_model(d, w, "config.json"), ERROR,
         ("/model'", "config.json is damaged")),
    Case("model_dir_with_corrupted_tokenizer",
         lambda d, w: damaged_model(d, w, "tokenizer.json"), ERROR,
         ("/model'", "tokenizer.json is damaged")),
    # ---- checkpoint paths ----
    Case("checkpoint_missing_weights_file",
         lambda d, w: export(d, copy_checkpoint(
             d, w, lambda c: (c / "adapter_model.safetensors").unlink())), ERROR,
         ("ckpt", "adapter_model.safetensors is missing")),
    Case("checkpoint_truncated_weights_file",
         lambda d, w: export(d, copy_checkpoint(
             d, w, lambda c: truncate_file(c / "adapter_model.safetensors"))), ERROR,
         ("ckpt", "adapter_model.safetensors is corrupted")),
    Case("checkpoint_garbage_weights_file",
         lambda d, w: export(d, copy_checkpoint(
             d, w, lambda c: garbage_file(c / "adapter_model.safetensors"))), ERROR,
         ("ckpt", "adapter_model.safetensors is corrupted")),
    Case("checkpoint_nan_weights",
         lambda d, w: export(d, copy_checkpoint(d, w, nan_weights)), ERROR,
         ("adapter_model.safetensors", "non-finite")),
    Case("checkpoint_state_json_corrupted",
         lambda d, w: export(d, copy_checkpoint(
             d, w, lambda c: truncate_file(c / "tinkerkit_state.json", 20))), ERROR,
         ("ckpt", "tinkerkit_state.json", "unreadable")),
    Case("checkpoint_path_missing", lambda d, w: export(d, str(d / "nowhere")), ERROR,
         ("nowhere", "not a directory")),
    Case("checkpoint_path_is_a_file", lambda d, w: export(d, write(d, "file", "x")), ERROR,
         ("file", "not a directory")),
    Case("eval_checkpoint_missing_weights",
         lambda d, w: evaluate(d, w, "--checkpoint", copy_checkpoint(
             d, w, lambda c: (c / "adapter_model.safetensors").unlink())), ERROR,
         ("ckpt", "adapter_model.safetensors is missing")),
    Case("eval_checkpoint_on_a_different_base_model",
         lambda d, w: evaluate(d, w, "--checkpoint", str(w.checkpoint), "--model", w.other_model),
         ERROR, ("step_000002", "trained on base model", "tiny-llama", "other-model")),
    Case("resume_with_a_different_base_model",
         lambda d, w: ["train", "--resume", copy_run(d, w) + "/checkpoints/step_000001",
                       "--model", w.other_model], ERROR,
         ("step_000001", "trained on base model", "other-model")),
    Case("init_from_a_different_rank",
         lambda d, w: train(d, w, "--rank", "8", "--init-from", str(w.checkpoint)), ERROR,
         ("step_000002", "rank=4", "8")),
    Case("resume_corrupted_optimizer_state",
         lambda d, w: ["train", "--resume", copy_run(
             d, w, lambda r: truncate_file(r / "checkpoints/step_000001/optimizer.safetensors"))
             + "/checkpoints/step_000001"],
         ERROR, ("step_000001", "optimizer.safetensors is corrupted")),
    Case("resume_run_whose_checkpoints_are_incomplete",
         lambda d, w: ["train", "--resume", copy_run(d, w, lambda r: [
             (r / f"checkpoints/step_00000{i}/adapter_model.safetensors").unlink()
             for i in (1, 2)])],
         ERROR, ("run", "no complete checkpoint", "checkpoints.jsonl")),
    Case("resume_checkpoints_jsonl_corrupted_line",
         lambda d, w: ["train", "--resume", copy_run(
             d, w, lambda r: corrupt_line(r / "checkpoints.jsonl", 1))],
         ERROR, ("checkpoints.jsonl:1", "invalid JSON")),
    Case("resume_run_config_corrupted",
         lambda d, w: ["train", "--resume", copy_run(
             d, w, lambda r: truncate_file(r / "config.json", 30))],
         ERROR, ("run/config.json", "cannot read the run's config")),
    Case("init_from_a_missing_path",
         lambda d, w: train(d, w, "--init-from", str(d / "gone")), ERROR,
         ("checkpoint", "gone", "not a directory"), "refused before the data is read"),
    Case("eval_checkpoint_is_an_empty_directory",
         lambda d, w: evaluate(d, w, "--checkpoint", str(Path(write(d, "c/x", "")).parent)),
         ERROR, ("c", "adapter_config.json is missing")),
    Case("resume_a_directory_that_is_no_run", lambda d, w: ["train", "--resume", str(d)], ERROR,
         ("not a run directory",)),
]


# -- fixtures and the runner ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    other = save_tiny_llama(root / "other-model", seed=1)
    data = write_demo_data(root / "train.jsonl", n=12, seed=0)
    cfg = load_config(None, [f"DATA_FILES={data}", f"BASE_MODEL={tiny_model}", "LORA_RANK=4",
                             "BATCH_SIZE=4", "MAX_STEPS=2", "SAVE_EVERY=1", "DEVICE=cpu",
                             "MAX_SEQUENCE_LENGTH=128"])
    run_training(cfg, run_dir=root / "run", console=Console(file=io.StringIO()))
    return World(model=tiny_model, other_model=other, data=Path(data), run=root / "run")


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (the inputs a case must leave unchanged)."""
    hashes = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def run_in_process(argv: list[str], capfd) -> tuple[int, str, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = main(argv)
        except SystemExit as e:  # argparse exits
            code = e.code if isinstance(e.code, int) else 1
    out, err = capfd.readouterr()
    err += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return code, out, err


def run_subprocess(argv: list[str]) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "tinkerkit.cli", *argv], capture_output=True,
                          text=True, env=env, timeout=300)
    return done.returncode, done.stdout, done.stderr


def check_case(case: Case, world: World, tmp_path: Path, runner) -> str:
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    argv = case.setup(case_dir, world)
    inputs = snapshot(case_dir, *world.inputs())
    before = set(case_dir.rglob("*"))
    code, out, err = runner(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in out + err, out + err
    if case.outcome == ERROR:
        assert code != 0, out
        assert len(lines) == 1, err
        assert lines[0].startswith("error: "), err
        for text in case.expect:
            assert text in lines[0], f"{text!r} not in {lines[0]!r}"
        new = set(case_dir.rglob("*")) - before
        assert not new, f"an error left files behind: {sorted(map(str, new))}"
        outcome = lines[0]
    else:
        assert code == 0, err
        assert not lines, err
        report = "".join(out.split())  # rich wraps long lines (paths) at the console width
        for text in case.expect:
            assert "".join(text.split()) in report, f"{text!r} not in the report:\n{out}"
        new = {p.relative_to(case_dir).parts[0] for p in case_dir.rglob("*")
               if p not in before}
        assert new <= set(case.writes), new
        outcome = "ok, " + "; ".join(case.expect)
    after = snapshot(case_dir, *world.inputs())
    assert {path: after.get(path) for path in inputs} == inputs, "an input file changed"
    return outcome


def test_the_table_has_every_case_the_issue_lists():
    ids = {case.id for case in CASES}
    assert len(ids) == len(CASES) >= 25
    listed = {"empty_file", "json_array_trailing_comma", "jsonl_truncated_line_in_middle",
              "invalid_utf8_bytes", "null_content", "number_where_text_expected", "unknown_role",
              "no_assistant_turn", "conversation_ends_with_user_turn",
              "record_of_200000_characters", "every_record_longer_than_max_length",
              "config_mistyped_key", "config_negative_learning_rate", "config_lora_rank_zero",
              "batch_size_larger_than_dataset", "test_ratio_zero", "test_ratio_one",
              "model_name_resolving_to_nothing", "checkpoint_missing_weights_file",
              "checkpoint_truncated_weights_file", "eval_checkpoint_on_a_different_base_model",
              "init_from_a_different_rank", "resume_with_a_different_base_model",
              "data_path_is_a_directory"}
    assert listed <= ids, listed - ids


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, tmp_path, capfd):
    outcome = check_case(case, world, tmp_path, lambda argv: run_in_process(argv, capfd))
    print(f"{case.id}: {outcome}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_a_subprocess(case, world, tmp_path):
    print(f"{case.id}: {check_case(case, world, tmp_path, run_subprocess)}")
