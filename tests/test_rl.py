"""``tinkerkit rl``: advantages, skipped groups, the Datums of a group, the KL estimate, grading,
one RL step on a tiny random model, exact resume and bad settings."""

import io
import json
import math
import re
import shutil

import numpy as np
import pytest
import tinker
from rich.console import Console
from safetensors.torch import load_file

from helpers import running_server
from tinkerkit import files
from tinkerkit.cli import main
from tinkerkit.config import load_config
from tinkerkit.data.conversation import Conversation
from tinkerkit.data.demo import write_demo_data
from tinkerkit.errors import ConfigError, DataError
from tinkerkit.grader import Grader, GraderConfig
from tinkerkit.rl import (
    Prompt,
    Rollout,
    batch_metrics,
    build_batch,
    grade_group,
    grading_error_warning,
    group_advantages,
    kl_sampler_learner,
    rl,
    rollout_datum,
    run_warnings,
    sampling_seed,
)


def rollout(tokens, logprobs, reward):
    return Rollout(tokens, logprobs, reward, reward >= 1, False)


def prompt_of(tokens):
    conversation = Conversation(messages=[{"role": "user", "content": "q"}], reference_answer="1")
    return Prompt(conversation, tinker.types.ModelInput.from_ints(tokens))


# -- advantages and skipped groups -------------------------------------------------------------

def test_advantages_are_rewards_less_the_group_mean():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1.0, 0.0, 0.0, 0.0]) == [0.75, -0.25, -0.25, -0.25]
    assert group_advantages([1.2, 0.2, 0.0]) == pytest.approx([1.2 - 1.4 / 3, 0.2 - 1.4 / 3,
                                                                -1.4 / 3])


def test_a_group_of_equal_rewards_has_no_signal():
    assert group_advantages([0.0, 0.0, 0.0]) is None
    assert group_advantages([1.0, 1.0]) is None


def test_build_batch_counts_skipped_groups_and_trains_on_the_others():
    prompts = [prompt_of([5, 6, 7]), prompt_of([8, 9]), prompt_of([3, 4])]
    groups = [[rollout([1], [-0.1], 1.0), rollout([2], [-0.2], 1.0)],    # all right: no signal
              [rollout([1, 2], [-0.1, -0.3], 1.0), rollout([3], [-0.5], 0.0)],
              [rollout([4], [-0.4], 0.0), rollout([4], [-0.4], 0.0)]]    # all wrong: no signal
    batch = build_batch(prompts, groups)
    assert batch.groups_skipped == 2
    assert len(batch.datums) == 2  # the middle group's two answers
    assert [d.model_input.to_ints() for d in batch.datums] == [[8, 9, 1], [8, 9]]
    advantages = [d.loss_fn_inputs["advantages"].tolist() for d in batch.datums]
    assert advantages == [[0.0, 0.5, 0.5], [0.0, -0.5]]


# -- the Datums of a known group ---------------------------------------------------------------

def test_rollout_datum_aligns_tokens_logprobs_advantages_and_mask():
    prompt, answer, logprobs = [10, 11, 12, 13], [20, 21, 2], [-0.5, -1.25, -0.125]
    datum, mask = rollout_datum(prompt, rollout(answer, logprobs, 1.0), 0.75)
    # Independent construction: the sequence shifted by one, the prompt's 3 positions at 0.
    sequence = prompt + answer
    assert datum.model_input.to_ints() == sequence[:-1]
    inputs = datum.loss_fn_inputs
    assert inputs["target_tokens"].tolist() == sequence[1:]
    assert inputs["target_tokens"].to_numpy().dtype == np.int64
    assert inputs["logprobs"].tolist() == [0.0, 0.0, 0.0, -0.5, -1.25, -0.125]
    assert inputs["advantages"].tolist() == [0.0, 0.0, 0.0, 0.75, 0.75, 0.75]
    assert inputs["logprobs"].to_numpy().dtype == np.float32
    assert mask.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert set(inputs) == {"target_tokens", "logprobs", "advantages"}  # Tinker's names only


def test_rollout_datum_carries_prompt_logprobs_for_dro():
    datum, _ = rollout_datum([10, 11, 12], rollout([20], [-0.5], 0.0), -0.5,
                             prompt_logprobs=[-2.0, -3.0])
    assert datum.loss_fn_inputs["logprobs"].tolist() == [-2.0, -3.0, -0.5]
    assert datum.loss_fn_inputs["advantages"].tolist() == [0.0, 0.0, -0.5]


# -- the KL estimate ---------------------------------------------------------------------------

def test_kl_sampler_learner_is_the_k3_estimate_on_answer_tokens():
    sampler = np.array([0.0, -1.0, -0.5, -2.0], np.float32)
    learner = np.array([-9.0, -1.2, -0.5, -1.5], np.float32)
    mask = np.array([0, 1, 1, 1], np.float32)  # the first position is a prompt's: ignored
    expected = np.mean([math.exp(r) - 1 - r for r in (-0.2, 0.0, 0.5)])
    assert kl_sampler_learner(sampler, learner, mask) == pytest.approx(expected, rel=1e-5)
    assert kl_sampler_learner(sampler, sampler, mask) == 0.0


def test_the_k3_estimate_averages_to_the_true_kl():
    rng = np.random.default_rng(0)
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.4, 0.2])
    draws = rng.choice(3, size=200_000, p=p)
    estimate = kl_sampler_learner(np.log(p)[draws], np.log(q)[draws], np.ones(draws.size))
    assert estimate == pytest.approx(float(np.sum(p * np.log(p / q))), abs=2e-3)


# -- sampling seeds and grading ----------------------------------------------------------------

def test_sampling_seeds_depend_on_seed_step_and_prompt_only():
    assert sampling_seed(42, 3, 1) == sampling_seed(42, 3, 1)
    seeds = {sampling_seed(42, step, i) for step in range(5) for i in range(8)}
    assert len(seeds) == 40 and all(0 <= s < 2**63 for s in seeds)
    assert sampling_seed(43, 0, 0) != sampling_seed(42, 0, 0)


def sequence(tokens, logprobs=True):
    return tinker.types.SampledSequence(
        stop_reason="stop", sequence_id="s", tokens_np=np.array(tokens, np.int32),
        logprobs_np=np.full(len(tokens), -0.1, np.float32) if logprobs else None)


def test_grade_group_rewards_as_eval_grades_with_an_optional_format_reward(smol_tokenizer):
    texts = ["The answer is 42.", "The answer is 41.", "I do not know"]
    sequences = [sequence(smol_tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    prompt = Prompt(Conversation(messages=[{"role": "user", "content": "6 x 7?"}],
                                 reference_answer="42"), tinker.types.ModelInput.from_ints([1]))
    response = tinker.types.SampleResponse(sequences=sequences)
    with Grader() as grader:
        plain = grade_group(response, prompt, smol_tokenizer, grader, 0.0)
        shaped = grade_group(response, prompt, smol_tokenizer, grader, 0.1)
        assert [r.reward for r in plain] == [grader.reward(t, "42") for t in texts]
    assert [r.reward for r in plain] == [1.0, 0.0, 0.0]
    assert [r.correct for r in plain] == [True, False, False]
    assert [r.reward for r in shaped] == pytest.approx([1.1, 0.1, 0.0])  # no answer: no bonus


def test_a_failing_grader_gives_reward_0_and_is_counted_and_named(smol_tokenizer, tmp_path):
    path = tmp_path / "broken_grader.py"
    path.write_text("def score(output, example):\n"
                    "    if '42' in output:\n        raise ValueError('no 42 here')\n"
                    "    return 0.5\n")
    texts = ["The answer is 42.", "The answer is 41."]
    response = tinker.types.SampleResponse(
        sequences=[sequence(smol_tokenizer.encode(t, add_special_tokens=False)) for t in texts])
    prompt = Prompt(Conversation(messages=[{"role": "user", "content": "6 x 7?"}],
                                 reference_answer="42"), tinker.types.ModelInput.from_ints([1]))
    with GraderConfig(path=str(path)).build() as grader:
        rollouts = grade_group(response, prompt, smol_tokenizer, grader, 0.0)
    assert [r.reward for r in rollouts] == [0.0, 0.5]
    assert "no 42 here" in rollouts[0].grading_error and rollouts[1].grading_error is None
    batch = build_batch([prompt], [rollouts])
    assert batch_metrics(batch)["grading_errors"] == 1
    warning = grading_error_warning(batch, 3)
    assert warning.startswith("the grader failed on 1 of 2 answers at step 3 (reward 0")
    assert "no 42 here" in warning
    assert grading_error_warning(build_batch([prompt], [rollouts[1:]]), 3) is None


def test_run_warnings_name_steps_without_signal_and_truncated_answers():
    def step(signal, truncated):
        return {"groups_with_signal": signal, "answers_truncated": truncated}

    assert run_warnings([step(0.5, 1), step(0.25, 0)], answers_per_step=8) == []
    assert run_warnings([], answers_per_step=8) == []
    some, = run_warnings([step(0.0, 0), step(0.5, 4)], answers_per_step=8)
    assert some.startswith("1 of 2 steps had no group with signal") and "When RL helps" in some
    every, cut = run_warnings([step(0.0, 8), step(0.0, 5)], answers_per_step=8)
    assert every.startswith("every step had no group with signal")
    assert cut.startswith("13 of 16 answers were cut at RL_MAX_TOKENS")


def test_a_sequence_without_logprobs_is_a_clear_error(smol_tokenizer):
    response = tinker.types.SampleResponse(sequences=[sequence([5, 6], logprobs=False)])
    with pytest.raises(DataError, match="log-probability"):
        grade_group(response, prompt_of([1]), smol_tokenizer, Grader(), 0.0)


# -- the loop on a tiny random model -----------------------------------------------------------

# A random model never answers arithmetic right; this grader's reward varies with the answer's
# length, so groups have signal and steps train.
PARITY_GRADER = "def score(output, example):\n    return float(len(output) % 2)\n"


@pytest.fixture
def rl_config(tiny_model, tmp_path):
    data = write_demo_data(tmp_path / "train.jsonl", n=8, seed=0)
    grader = tmp_path / "parity_grader.py"
    grader.write_text(PARITY_GRADER)
    return load_config(None, [f"DATA_FILES={data}", f"BASE_MODEL={tiny_model}", "LORA_RANK=4",
                              f"GRADER={grader}", "RL_GROUP_SIZE=3", "RL_PROMPTS_PER_STEP=2",
                              "RL_MAX_TOKENS=6", "MAX_STEPS=4", "SAVE_EVERY=2", "SEED=0",
                              "LEARNING_RATE=1e-2", "DEVICE=cpu", "MAX_SEQUENCE_LENGTH=128"])


RL_KEYS = {"step", "epoch", "loss", "lr", "weighted_tokens", "total_tokens", "reward_mean",
           "accuracy", "groups_with_signal", "groups_skipped", "answer_tokens_mean",
           "answers_truncated", "grading_errors", "kl_sampler_learner", "seconds"}


def test_rl_steps_run_and_log_their_metrics(rl_config, tmp_path):
    held_out = write_demo_data(tmp_path / "held_out.jsonl", n=2, seed=5)
    config = rl_config.model_copy(update={"eval_data_files": [str(held_out)], "max_tokens": 6,
                                          "sample_eval_every": 4, "sample_eval_limit": 2})
    result = rl(config, run_dir=tmp_path / "run")
    lines = files.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert set(lines[0]) == RL_KEYS
    assert set(lines[3]) == RL_KEYS | {"eval_accuracy", "eval_grading_errors", "eval_score"}
    # The steps trained: LoRA's B factors start at 0 and are not 0 at the end.
    final = load_file(f"{result.final_checkpoint}/adapter_model.safetensors")
    assert any(t.abs().max() > 0 for name, t in final.items() if "lora_B" in name)
    for line in lines:
        assert 0 <= line["reward_mean"] <= 1 and line["accuracy"] == 0.0
        assert 1 <= line["answer_tokens_mean"] <= 6
        assert line["groups_with_signal"] == 1 - line["groups_skipped"] / 2
        if line["groups_skipped"] < 2:  # something trained: on-policy, so the KL is ~0
            assert line["weighted_tokens"] > 0 and math.isfinite(line["loss"])
            assert 0 <= line["kl_sampler_learner"] < 1e-3
    assert result.rewards == [line["reward_mean"] for line in lines]
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["first_10_mean_reward"] == pytest.approx(np.mean(result.rewards))
    assert summary["grading_errors"] == 0 and all(line["grading_errors"] == 0 for line in lines)
    steps = [entry["step"] for entry in files.read_jsonl(tmp_path / "run" / "checkpoints.jsonl")]
    assert steps == [2, 4]


def test_resume_logs_the_same_metrics_as_the_uninterrupted_run(rl_config, tmp_path):
    rl(rl_config, run_dir=tmp_path / "full")
    # The run as a kill after step 3 leaves it: its step-2 checkpoint is the latest.
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    killed = tmp_path / "killed"
    files.rewrite_jsonl(killed / "checkpoints.jsonl",
                        files.read_jsonl(killed / "checkpoints.jsonl")[:1])
    files.rewrite_jsonl(killed / "metrics.jsonl", files.read_jsonl(killed / "metrics.jsonl")[:3])
    shutil.rmtree(killed / "checkpoints" / "step_000004")
    rl(rl_config, resume=str(killed))
    assert comparable(killed) == comparable(tmp_path / "full")
    # Resuming a finished run does nothing and says so.
    console = Console(file=io.StringIO(), width=300)
    again = rl(rl_config, resume=str(tmp_path / "full"), console=console)
    assert (again.steps, again.rewards) == (4, [])
    assert "has finished: it is at step 4 of 4; nothing to do" in console.file.getvalue()


def comparable(run_dir):
    return [{k: v for k, v in line.items() if k != "seconds"}
            for line in files.read_jsonl(run_dir / "metrics.jsonl")]


def test_rl_through_tinkerkit_serve_logs_what_the_local_engine_logs(rl_config, tmp_path,
                                                                    monkeypatch):
    rl(rl_config, run_dir=tmp_path / "local")
    monkeypatch.setenv("TINKER_API_KEY", "tml-rl-test")
    with running_server(tmp_path / "serve-root") as server:
        config = rl_config.model_copy(update={"backend": "tinker", "tinker_base_url": server.url})
        result = rl(config, run_dir=tmp_path / "tinker")
    assert result.final_checkpoint.startswith("tinker://")
    local, served = comparable(tmp_path / "local"), comparable(tmp_path / "tinker")
    for a, b in zip(served, local, strict=True):  # the same samples, rewards and losses
        assert a.pop("loss") == pytest.approx(b.pop("loss"), abs=1e-5)
        assert a.pop("kl_sampler_learner") == pytest.approx(b.pop("kl_sampler_learner"), abs=1e-6)
        assert a == b


# -- bad settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, message", [
    ("RL_GROUP_SIZE=1", "RL_GROUP_SIZE=1: Input should be greater than or equal to 2"),
    ("RL_LOSS=grpo", "RL_LOSS='grpo': Input should be"),
    ("RL_TEMPERATURE=0", "RL_TEMPERATURE=0: Input should be greater than 0"),
    ("RL_FORMAT_REWARD=2", "RL_FORMAT_REWARD=2: Input should be less than or equal to 1"),
    ("RL_LOSS_CONFIG={beta: 0.1}", "RL_LOSS_CONFIG={'beta': 0.1}: loss_fn_config key 'beta' "
                                   "is not used by importance_sampling (keys it takes: none)"),
])
def test_bad_rl_settings_are_one_line_errors(setting, message, capsys, tmp_path):
    data = write_demo_data(tmp_path / "train.jsonl", n=4, seed=0)
    assert main(["rl", "--data", str(data), "--set", setting]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("loss, loss_config, message", [
    ("ppo", "{beta: 0.1}", "loss_fn_config key 'beta' is not used by ppo"),
    ("cispo", "{clip_low_threshold: 2, clip_high_threshold: 1}", "must satisfy 0 <= low <= high"),
    ("dro", "{beta: -1}", "dro: beta=-1.0 must be >= 0"),
])
def test_loss_config_is_checked_against_its_loss_when_the_config_loads(loss, loss_config,
                                                                       message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        load_config(None, [f"RL_LOSS={loss}", f"RL_LOSS_CONFIG={loss_config}"])
    assert "--set: RL_LOSS_CONFIG=" in str(refused.value)
    # From a config file, the error names the file (as every other setting's does).
    path = tmp_path / "rl.toml"
    path.write_text(f'RL_LOSS = "{loss}"\nRL_LOSS_CONFIG = {loss_config.replace(":", " =")}\n')
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        load_config(path)
    assert str(path) in str(refused.value)


@pytest.mark.parametrize("value", ["'0.8'", "true"])
def test_a_loss_config_value_must_be_a_number_not_a_string_or_boolean(value):
    with pytest.raises(ConfigError, match=re.escape("must be a finite number")):
        load_config(None, ["RL_LOSS=ppo", f"RL_LOSS_CONFIG={{clip_low_threshold: {value}}}"])


def test_a_loss_config_the_loss_takes_is_kept():
    config = load_config(None, ["RL_LOSS=ppo", "RL_LOSS_CONFIG={clip_low_threshold: 0.9, "
                                               "clip_high_threshold: 1.1}"])
    assert config.rl_loss_config == {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}


def test_more_prompts_per_step_than_prompts_is_an_error(rl_config):
    config = rl_config.model_copy(update={"rl_prompts_per_step": 9})
    with pytest.raises(ConfigError, match="RL_PROMPTS_PER_STEP=9 is larger than the 8"):
        rl(config)


def test_records_without_reference_answers_are_skipped_and_none_left_is_an_error(
        rl_config, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    config = rl_config.model_copy(update={"data_files": [str(data)]})
    with pytest.raises(DataError, match="no prompt left for RL"):
        rl(config, run_dir=tmp_path / "run")


def test_resume_refuses_a_run_of_the_other_kind(rl_config, tmp_path):
    """`rl --resume` continues RL runs only and `train --resume` supervised runs only: one
    run's metrics.jsonl holds one kind of step."""
    from tinkerkit.train import train

    rl(rl_config.model_copy(update={"max_steps": 2}), run_dir=tmp_path / "rl")
    with pytest.raises(ConfigError, match=r"is an RL run: `tinkerkit train --resume` continues "
                                          r"train runs only; .*--init-from"):
        train(rl_config.model_copy(update={"max_steps": 4}), resume=str(tmp_path / "rl"))
    # a supervised run: the same checkpoints, its metrics lines without the RL metrics
    shutil.copytree(tmp_path / "rl", tmp_path / "sft")
    files.rewrite_jsonl(tmp_path / "sft" / "metrics.jsonl",
                        [{"step": 1, "epoch": 0, "loss": 2.0}, {"step": 2, "epoch": 0, "loss": 1.9}])
    with pytest.raises(ConfigError, match=r"is a supervised run: `tinkerkit rl --resume` "
                                          r"continues rl runs only"):
        rl(rl_config.model_copy(update={"max_steps": 4}), resume=str(tmp_path / "sft"))
    assert len(files.read_jsonl(tmp_path / "sft" / "metrics.jsonl")) == 2  # nothing appended
