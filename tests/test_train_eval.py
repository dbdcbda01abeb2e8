"""Evaluation during training and export at the end, on the local engine and a tiny random model."""

import io as _io

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tinkerkit import files
from tinkerkit.config import load_config
from tinkerkit.data.demo import write_demo_data
from tinkerkit.data.formats import load_conversations
from tinkerkit.data.split import split_conversations
from tinkerkit.errors import ConfigError
from tinkerkit.evaluate import run_evaluation
from tinkerkit.render import Renderer
from tinkerkit.train import load_examples, load_held_out, train

# 6 training examples in batches of 2: 3 steps. Dropout on, so that any use of the training
# RNG by evaluation would change the adapter.
BASE = ["LORA_RANK=4", "BATCH_SIZE=2", "NUM_EPOCHS=1", "SEED=0", "LORA_DROPOUT=0.1",
        "LEARNING_RATE=1e-2", "LR_SCHEDULE=constant", "DEVICE=cpu", "MAX_SEQUENCE_LENGTH=128",
        "SAVE_EVERY=1"]
EVALUATED = ["EVAL_EVERY=2", "SAMPLE_EVAL_EVERY=2", "SAMPLE_EVAL_LIMIT=2", "MAX_TOKENS=4",
             "EXPORT_AFTER_TRAINING=true", "EXPORT_MERGED=true", "EXPORT_DTYPE=fp32"]


def quiet():
    return Console(file=_io.StringIO(), width=200)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The same run twice: without evaluation, and with eval_loss, eval_accuracy and export."""
    root = tmp_path_factory.mktemp("eval-runs")
    train_file = write_demo_data(root / "train.jsonl", n=6, seed=0)
    held_out = write_demo_data(root / "held_out.jsonl", n=3, seed=1)  # 2 chunks of BATCH_SIZE
    common = [f"DATA_FILES={train_file}", f"BASE_MODEL={tiny_model}", *BASE]
    plain = load_config(None, common)
    evaluated = load_config(None, [*common, f"EVAL_DATA_FILES={held_out}", *EVALUATED])
    return {"plain": train(plain, run_dir=root / "plain", console=quiet()),
            "evaluated": train(evaluated, run_dir=root / "evaluated", console=quiet()),
            "config": evaluated, "held_out": held_out, "model": tiny_model}


def mean_nll(model_dir, checkpoint, data_file):
    """Mean NLL per weighted token of the data under base + adapter, with plain PEFT/torch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                      checkpoint).eval()
    renderer = Renderer(AutoTokenizer.from_pretrained(model_dir), max_length=128)
    nll, weight = 0.0, 0.0
    with torch.no_grad():
        for conversation in load_conversations([data_file]).conversations:
            example = renderer.render(conversation)
            tokens = torch.tensor([example.datum.model_input.to_ints()])
            targets = torch.as_tensor(example.datum.loss_fn_inputs["target_tokens"].to_numpy())
            weights = torch.as_tensor(example.datum.loss_fn_inputs["weights"].to_numpy())
            logprobs = torch.log_softmax(model(tokens).logits[0].float(), dim=-1)
            nll -= float((logprobs[torch.arange(len(targets)), targets] * weights).sum())
            weight += float(weights.sum())
    return nll / weight


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_eval_loss_is_the_mean_nll_of_the_held_out_set_at_that_step(runs):
    run_dir = runs["evaluated"].run_dir
    records = files.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]  # evaluations join the step's own line
    assert ["eval_loss" in r for r in records] == [False, True, True]  # every 2 steps and the end
    for record in records[1:]:
        checkpoint = run_dir / "checkpoints" / f"step_{record['step']:06d}"
        expected = mean_nll(runs["model"], checkpoint, runs["held_out"])
        assert record["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert records[1]["eval_loss"] != records[2]["eval_loss"]
    summary = files.read_json(run_dir / "summary.json")
    assert summary["final_eval_loss"] == records[2]["eval_loss"]


def test_evaluation_leaves_the_trained_adapter_bitwise_unchanged(runs):
    plain, evaluated = runs["plain"], runs["evaluated"]
    assert plain.losses == evaluated.losses
    final, expected = load_file(f"{evaluated.final_checkpoint}/adapter_model.safetensors"), \
        load_file(f"{plain.final_checkpoint}/adapter_model.safetensors")
    assert final.keys() == expected.keys()
    for key in final:
        assert torch.equal(final[key], expected[key]), key


def test_eval_accuracy_matches_tinkerkit_eval_on_the_same_checkpoint(runs, tmp_path):
    run_dir = runs["evaluated"].run_dir
    records = files.read_jsonl(run_dir / "metrics.jsonl")
    assert ["eval_accuracy" in r for r in records] == [False, True, True]
    config = runs["config"].model_copy(update={"eval_limit": 2})
    standalone = run_evaluation(config, [runs["held_out"]],
                                checkpoint=str(run_dir / "checkpoints" / "step_000002"),
                                output=tmp_path / "results.json", console=quiet())
    assert standalone.metrics["num_graded"] == 2
    assert records[1]["eval_accuracy"] == standalone.metrics["accuracy_equivalent"]


def test_export_after_training_writes_what_tinkerkit_export_writes(runs):
    result = runs["evaluated"]
    export = result.run_dir / "export"
    exported = load_file(export / "adapter" / "adapter_model.safetensors")
    final = load_file(f"{result.final_checkpoint}/adapter_model.safetensors")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert (export / "merged" / "config.json").is_file()
    summary = files.read_json(result.run_dir / "summary.json")
    assert summary["export_adapter"] == str(export / "adapter")
    assert summary["export_merged"] == str(export / "merged")
    assert not (runs["plain"].run_dir / "export").exists()


def test_eval_split_ratio_holds_out_whole_prompts_and_trains_on_the_rest(tmp_path,
                                                                        smol_tokenizer):
    data = write_demo_data(tmp_path / "all.jsonl", n=20, seed=2)
    config = load_config(None, [f"DATA_FILES={data}", "EVAL_SPLIT_RATIO=0.25", "EVAL_EVERY=1",
                                "BATCH_SIZE=2", "SEED=5"])
    examples = load_examples(config, smol_tokenizer, quiet())
    held_out = load_held_out(config, smol_tokenizer, quiet())
    everything = load_conversations([data]).conversations
    expected_train, expected_held_out = split_conversations(everything, 0.25, None, seed=5)
    assert held_out.conversations == expected_held_out and len(expected_held_out) == 5
    assert [e.source for e in examples] == [c.source for c in expected_train]
    assert not {c.prompt_key for c in expected_train} & {c.prompt_key for c in expected_held_out}
    # Weights are normalized over the whole held-out set: they sum to 1 across the chunks.
    assert [len(b) for b in held_out.batches] == [2, 2, 1]
    total = sum(d.loss_fn_inputs["weights"].to_numpy().sum() for b in held_out.batches for d in b)
    assert total == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["EVAL_EVERY=5"], "EVAL_EVERY=5: needs held-out data: set EVAL_DATA_FILES or EVAL_SPLIT_RATIO"),
    (["SAMPLE_EVAL_EVERY=5"], "SAMPLE_EVAL_EVERY=5: needs held-out data"),
    (["EVAL_SPLIT_RATIO=0.1", f"EVAL_DATA_FILES={__file__}"],
     "EVAL_SPLIT_RATIO=0.1: give EVAL_DATA_FILES or EVAL_SPLIT_RATIO, not both"),
])
def test_evaluation_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_grader_changes_eval_accuracy_in_training_and_in_eval_alike(tiny_model, tmp_path):
    """One step on the tiny random model, graded by a GRADER that accepts any answer: its
    eval_accuracy during training and `tinkerkit eval`'s accuracy on that checkpoint are both 1,
    where the built-in grader finds nothing right in the random model's output."""
    grader = tmp_path / "anything_goes.py"
    grader.write_text("def extract_final_answer(text):\n    return text\n\n\n"
                      "def check_answer_exact_match(pred, ref):\n    return True\n")
    train_file = write_demo_data(tmp_path / "train.jsonl", n=2, seed=0)
    held_out = write_demo_data(tmp_path / "held_out.jsonl", n=2, seed=1)
    config = load_config(None, [f"DATA_FILES={train_file}", f"BASE_MODEL={tiny_model}",
                                f"EVAL_DATA_FILES={held_out}", "SAMPLE_EVAL_EVERY=1",
                                "SAMPLE_EVAL_LIMIT=2", "MAX_TOKENS=4", "LORA_RANK=4",
                                "BATCH_SIZE=2", "DEVICE=cpu", "MAX_SEQUENCE_LENGTH=128"],
                         grader=str(grader))
    result = train(config, run_dir=tmp_path / "run", console=quiet())
    [record] = files.read_jsonl(result.run_dir / "metrics.jsonl")
    assert (record["eval_accuracy"], record["eval_grading_errors"]) == (1.0, 0)
    assert files.read_json(result.run_dir / "config.json")["GRADER"] == str(grader)

    evaluations = {}
    for name, used in (("grader", str(grader)), ("built-in", None)):
        evaluations[name] = run_evaluation(
            config.model_copy(update={"eval_limit": 2, "grader": used}), [held_out],
            checkpoint=result.final_checkpoint, output=tmp_path / f"{name}.json", console=quiet())
    assert evaluations["grader"].metrics["accuracy_equivalent"] == record["eval_accuracy"] == 1.0
    assert evaluations["built-in"].metrics["accuracy_equivalent"] == 0.0
    assert evaluations["grader"].grader["file"] == str(grader)
    assert files.read_json(tmp_path / "grader.json")["grader"]["sha256"] == \
        evaluations["grader"].grader["sha256"]
