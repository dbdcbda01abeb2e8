"""The demo: the whole main job on the project's own generated arithmetic problems.

split -> evaluate the base model -> train a LoRA adapter -> evaluate again -> export the adapter and
the merged model -> summary. Offline, on CPU, with ``smollm2-135m-instruct``; ``make demo`` runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tinkerkit import files
from tinkerkit.config import load_config
from tinkerkit.data.demo import write_demo_data
from tinkerkit.data.split import run_split
from tinkerkit.evaluate import run_evaluation
from tinkerkit.export import export_checkpoint
from tinkerkit.train import check_trackers, report_evaluation, train

DEMO_MODEL = "smollm2-135m-instruct"


def demo_settings(output_dir: Path, quick: bool) -> dict:
    """The demo's training settings (small and fast enough for a 2-core CPU)."""
    return {
        "data_files": [str(output_dir / "data" / "train_set.json")],
        "test_files": [str(output_dir / "data" / "test_set.json")],
        "base_model": DEMO_MODEL,
        "lora_rank": 16, "lora_alpha": 32,
        "learning_rate": 1e-3, "lr_schedule": "cosine", "warmup_steps": 5,
        "batch_size": 4, "max_steps": 4 if quick else 60, "num_epochs": 1,
        "max_sequence_length": 256, "save_every": 0 if quick else 30, "seed": 0,
        "max_tokens": 96, "temperature": 0.0, "eval_limit": 8 if quick else 40,
        "run_dir": str(output_dir / "run"),
    }


def run_demo(output_dir: Path, console: Console | None = None, quick: bool = False,
             overrides: list[str] | None = None) -> dict:
    """Run the demo pipeline into ``output_dir`` and print a summary.

    Args:
        output_dir: Everything is written below it (data, run, evaluations, exports).
        console: Where to print.
        quick: A few steps and examples only (a smoke test of the wiring).
        overrides: ``KEY=VALUE`` settings over the demo's (``REPORT_TO=[tensorboard]``).

    Returns:
        The summary dict (also written to ``output_dir/summary.json``).
    """

    console = console or Console()
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    source = output_dir / "data" / "arithmetic_problems.jsonl"
    write_demo_data(source, n=600, seed=0)

    console.rule("1. Split")
    run_split([source], output_dir / "data", test_ratio=0.1, seed=7, console=console)
    config = load_config(None, overrides, **demo_settings(output_dir, quick))
    check_trackers(config.report_to)  # a missing tracker package fails before any model loads

    console.rule("2. Evaluate the base model")
    before = run_evaluation(config, data=config.test_files, checkpoint=None,
                            output=output_dir / "eval_before.json", console=console)
    console.rule("3. Train a LoRA adapter")
    result = train(config, console=console)
    console.rule("4. Evaluate the fine-tuned model")
    after = run_evaluation(config, data=config.test_files, checkpoint=result.final_checkpoint,
                           output=output_dir / "eval_after.json", console=console)
    report_evaluation(result.run_dir, after.metrics)  # REPORT_TO: the run's trackers
    console.rule("5. Export")
    exported = export_checkpoint(result.final_checkpoint, output_dir / "export", merge=True,
                                 dtype="bf16")

    metrics = files.read_jsonl(Path(result.run_dir) / "metrics.jsonl")
    summary = {
        "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"],
        "accuracy_before": before.metrics["accuracy_equivalent"],
        "accuracy_after": after.metrics["accuracy_equivalent"],
        "steps": len(metrics), "checkpoint": result.final_checkpoint,
        "adapter": str(exported.adapter_dir), "merged_model": str(exported.merged_dir),
        "merged_max_logit_diff": exported.max_logit_diff,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    files.atomic_write_json(output_dir / "summary.json", summary)
    _print_summary(console, summary, output_dir)
    return summary


def _print_summary(console: Console, summary: dict, output_dir: Path) -> None:
    table = Table(title="Demo summary")
    table.add_column("")
    table.add_column("value")
    table.add_row("loss (first step -> last step)",
                  f"{summary['loss_first']:.3f} -> {summary['loss_last']:.3f}")
    table.add_row("accuracy (before -> after)",
                  f"{summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%}")
    table.add_row("optimizer steps", str(summary["steps"]))
    table.add_row("checkpoint", summary["checkpoint"])
    table.add_row("PEFT adapter", summary["adapter"])
    table.add_row("merged model", f"{summary['merged_model']} "
                  f"(max |logit diff| {summary['merged_max_logit_diff']:.3g})")
    table.add_row("evaluations", f"{output_dir / 'eval_before.json'}, {output_dir / 'eval_after.json'}")
    table.add_row("wall time", f"{summary['wall_seconds']:.0f} s")
    console.print(table)
