"""The pieces of ``benchmarks/train_throughput.py`` that decide its figures, on small inputs.

The benchmark itself (the real model, both engines, minutes of CPU) prints its figures when run;
these tests check the arithmetic of its cold/steady-state throughput, the TRL rows it builds from
rendered examples, the config file its users'-path mode hands to ``tinkerkit train``, and that
its busy processes live exactly as long as their segment.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import tinker

from tinkerkit.config import load_config
from tinkerkit.render import RenderedExample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_throughput  # noqa: E402


def test_step_figures_cold_and_steady_state_over_runs():
    runs = [{"seconds": [4.0, 1.0, 2.0], "tokens": [100, 50, 150], "peak_rss_gib": 1.5},
            {"seconds": [6.0, 3.0, 1.0], "tokens": [200, 60, 40], "peak_rss_gib": 2.0}]
    figures = train_throughput.step_figures(runs, warmup=1)
    assert figures["tokens"] == 600 and figures["seconds"] == 17.0
    assert math.isclose(figures["cold"], 600 / 17)
    assert math.isclose(figures["steady"], (50 + 150 + 60 + 40) / (1 + 2 + 3 + 1))
    assert math.isclose(figures["first"], 5.0)
    assert math.isclose(figures["first_speed"], 300 / 10)
    assert math.isclose(figures["step"], 7 / 4)
    assert math.isclose(figures["overhead"], 5.0 - 7 / 4)
    assert figures["peak_rss_gib"] == 2.0


def test_step_figures_without_steady_steps_is_nan():
    figures = train_throughput.step_figures(
        [{"seconds": [2.0], "tokens": [10], "peak_rss_gib": 1.0}], warmup=5)
    assert figures["cold"] == 5.0
    assert math.isnan(figures["steady"]) and math.isnan(figures["step"])


def rendered(inputs: list[int], targets: list[int], weights: list[float]) -> RenderedExample:
    datum = tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(inputs),
        loss_fn_inputs={
            "target_tokens": tinker.types.TensorData.from_numpy(np.array(targets, np.int64)),
            "weights": tinker.types.TensorData.from_numpy(np.array(weights, np.float32))})
    return RenderedExample(datum, len(inputs) + 1, False, False)


def test_trl_rows_are_the_full_sequences_with_the_weighted_targets_as_completion():
    # Sequence 5 6 7 8: the model input is 5 6 7, the targets 6 7 8, weighted on 7 and 8.
    first = rendered([5, 6, 7], [6, 7, 8], [0.0, 1.0, 1.0])
    second = rendered([9, 10], [10, 11], [1.0, 0.0])
    rows = train_throughput.trl_rows([second, first])
    assert rows["input_ids"] == [[9, 10, 11], [5, 6, 7, 8]]
    assert rows["completion_mask"] == [[0, 1, 0], [0, 0, 1, 1]]


def test_users_config_file_is_read_back_by_tinkerkit_train(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n', encoding="utf-8")
    path = tmp_path / "config.yaml"
    train_throughput.write_users_config(path, data, "smollm2-135m-instruct", "bf16")
    config = load_config(path)
    assert config.data_files == [str(data)]
    assert (config.lora_rank, config.lora_alpha, config.lora_targets) == (16, 32, "all-linear")
    assert (config.max_sequence_length, config.batch_size, config.num_epochs) == (512, 4, 1)
    assert (config.learning_rate, config.lr_schedule, config.adam_beta2) == (1e-4, "constant",
                                                                            0.999)
    assert (config.mixed_precision, config.dtype, config.device) == ("bf16", "float32", "cpu")
    assert (config.eval_every, config.sample_eval_every, config.save_every) == (0, 0, 0)
    assert config.export_after_training is False and config.report_to == []


def test_busy_processes_live_for_their_segment_only():
    with train_throughput.busy_processes(2) as spinners:
        assert len(spinners) == 2
        assert all(spinner.poll() is None for spinner in spinners)
    assert all(spinner.returncode is not None for spinner in spinners)
    with train_throughput.busy_processes(0) as none:
        assert none == []
