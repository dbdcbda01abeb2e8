"""Secrets: a canary ``TINKER_API_KEY`` never leaves the process (local engine).

With a unique canary in the environment, the test runs the whole local workflow through the CLI
(split, stats, training with held-out loss, sampled accuracy and export at the end, evaluation,
export with merge) and three failing runs (bad data, a corrupted checkpoint on resume, and the
library call that raises), then looks for the canary — as text, base64, hex and UTF-16 — in
every line printed to stdout/stderr, every exception message and traceback, and every file under
the test's directory: data splits, run directory (config.json, metrics, checkpoints,
summary, plot), export and evaluation results.
"""

from __future__ import annotations

import base64
import json
import shutil
import traceback
import uuid
from pathlib import Path

import pytest

from tinkerkit.cli import main
from tinkerkit.config import load_config
from tinkerkit.data.demo import write_demo_data
from tinkerkit.errors import DataError
from tinkerkit.train import train

CANARY = f"tk-canary-{uuid.uuid4().hex}"


def encodings(secret: str) -> list[bytes]:
    raw = secret.encode()
    return [raw, base64.b64encode(raw), raw.hex().encode(), secret.encode("utf-16-le")]


def files_holding(root: Path, secret: str) -> list[str]:
    needles = encodings(secret)
    return [str(p) for p in sorted(root.rglob("*"))
            if p.is_file() and any(n in p.read_bytes() for n in needles)]


def test_a_canary_api_key_appears_in_no_output_file_or_exception(tiny_model, tmp_path,
                                                                  monkeypatch, capfd):
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    data = write_demo_data(tmp_path / "all.jsonl", n=16, seed=0)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    common = ["--set", "DEVICE=cpu", "--set", "MAX_TOKENS=4"]
    runs = {
        "split": ["split", str(data), "--test-size", "4", "--output-dir", str(tmp_path / "data")],
        "stats": ["stats", str(data), "--model", tiny_model, "--max-length", "128"],
        "train": ["train", "--data", str(tmp_path / "data" / "train_set.json"), "--model",
                  tiny_model, "--rank", "4", "--batch-size", "4", "--max-steps", "2",
                  "--max-length", "128", "--run-dir", str(run_dir), *common,
                  "--set", "EVAL_SPLIT_RATIO=0.25", "--set", "EVAL_EVERY=2",
                  "--set", "SAMPLE_EVAL_EVERY=2", "--set", "SAMPLE_EVAL_LIMIT=2",
                  "--set", "EXPORT_AFTER_TRAINING=true", "--set", "SAVE_EVERY=1"],
        "eval": ["eval", "--checkpoint", str(run_dir), "--data",
                 str(tmp_path / "data" / "test_set.json"), "--limit", "2",
                 "--output", str(out / "results.json"), *common],
        "export": ["export", str(run_dir), "--output", str(out / "export"), "--merge",
                   "--dtype", "fp32"],
        "failing_data": ["train", "--data", str(tmp_path / "bad.jsonl"), "--model", tiny_model,
                         "--run-dir", str(tmp_path / "failed"), *common],
        "failing_resume": ["train", "--resume", str(tmp_path / "broken" / "checkpoints" /
                                                    "step_000001")],
    }
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    codes = {}
    for name, argv in runs.items():
        if name == "failing_resume":  # a copy of the run whose step-1 optimizer state is torn
            shutil.copytree(run_dir, tmp_path / "broken")
            torn = tmp_path / "broken" / "checkpoints" / "step_000001" / "optimizer.safetensors"
            torn.write_bytes(torn.read_bytes()[:64])
        codes[name] = main(argv)
    assert codes == {"split": 0, "stats": 0, "train": 0, "eval": 0, "export": 0,
                     "failing_data": 1, "failing_resume": 1}
    printed, errors = capfd.readouterr()
    assert "eval_accuracy" in printed and "error:" in errors  # the runs did what they say

    config = load_config(None, [f"DATA_FILES={tmp_path / 'bad.jsonl'}",
                                f"BASE_MODEL={tiny_model}", "DEVICE=cpu"])
    with pytest.raises(DataError) as failure:
        train(config, run_dir=tmp_path / "failed-library")
    text = "".join(traceback.format_exception(failure.value))

    for needle in encodings(CANARY):
        for where, content in (("stdout", printed), ("stderr", errors), ("exception", text)):
            assert needle.decode("latin-1") not in content, where
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (run_dir / "config.json").is_file() and (out / "results.json").is_file()
    assert (out / "export" / "merged").is_dir() and (run_dir / "export" / "adapter").is_dir()
    assert len(written) > 30
    assert files_holding(tmp_path, CANARY) == []
    assert files_holding(Path(tiny_model), CANARY) == []


def test_the_scan_finds_a_canary_in_any_of_its_encodings(tmp_path):
    for i, needle in enumerate(encodings(CANARY)):
        (tmp_path / f"f{i}.bin").write_bytes(b"prefix " + needle + b" suffix")
    (tmp_path / "clean.json").write_text('{"TINKER_API_KEY": null}')
    assert files_holding(tmp_path, CANARY) == [str(tmp_path / f"f{i}.bin") for i in range(4)]
