"""Streaming merge at a real size: peak memory and wall time of ``tinkerkit export --merge``.

Generates a random Qwen3 model at a real width (hidden 4,096, MLP 12,288, 32 heads of 128, 8
key/value heads, the 151,936-token vocabulary, untied embeddings; 11 layers by default: 3.36 B
parameters, 6.3 GiB in bf16) shard by shard (``--shard-gib``, 2 GiB by default: 4 shards and an
index), never holding more than one shard in memory, and a rank-32 LoRA adapter in Tinker's
layout on every linear layer and the output head (``model.unembed_tokens``). Then it runs
``tinkerkit export ADAPTER --output OUT --merge --dtype bf16 --no-logit-check`` as a subprocess and
prints its wall time and its peak resident memory: ``ru_maxrss`` of the child (everything
resident, the pages of the shard being read through safetensors' memory map included), and the
peaks of its anonymous and file-backed resident memory (``RssAnon``/``RssFile`` of
``/proc/PID/status``, sampled every 0.1 s; file-backed pages are the page cache of the mapped
shard, which the kernel reclaims under pressure), beside the largest shard and the model's size.
The generated files are deleted afterwards (``--keep`` keeps them).

Goal (issue 17): peak memory near one shard plus the adapter, whatever the model's size.

Example::

    .venv/bin/python benchmarks/streaming_merge.py                     # 6.3 GiB, 4 shards
    .venv/bin/python benchmarks/streaming_merge.py --layers 2 --shard-gib 0.5   # a quick run
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen3Config

from tinkerkit.models import load_tokenizer

GIB = 1024 ** 3


def real_width_config(layers: int) -> Qwen3Config:
    """Qwen3-8B's widths (hidden 4,096, MLP 12,288, 32 x 128 query heads, 8 key/value heads,
    151,936 tokens) with ``layers`` layers."""
    return Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=False, max_position_embeddings=40960,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, dtype="bfloat16")


def generate_model(out: Path, config: Qwen3Config, shard_bytes: int, seed: int = 0) -> list[int]:
    """Write a random bf16 checkpoint shard by shard (one shard in memory at a time), with its
    index, config and the Qwen3 tokenizer; returns the shard sizes in bytes."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    groups, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = shape.numel() * 2
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    groups.append(current)
    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, sizes = {}, []
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for key in keys:
            if key.endswith("norm.weight"):
                shard[key] = torch.ones(shapes[key], dtype=torch.bfloat16)
            else:
                shard[key] = (torch.randn(shapes[key], generator=generator) * 0.02).bfloat16()
            weight_map[key] = name
        save_file(shard, out / name, metadata={"format": "pt"})
        sizes.append(sum(t.numel() * 2 for t in shard.values()))
        del shard
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)
    load_tokenizer("qwen3-tokenizer").save_pretrained(out)
    return sizes


def generate_adapter(out: Path, base: Path, config: Qwen3Config, rank: int, seed: int = 1) -> int:
    """A rank-``rank`` adapter in Tinker's layout on all linear layers and the output head;
    returns its size in bytes."""
    generator = torch.Generator().manual_seed(seed)
    h, f, q, kv = (config.hidden_size, config.intermediate_size,
                   config.num_attention_heads * config.head_dim,
                   config.num_key_value_heads * config.head_dim)
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
              "mlp.down_proj": (h, f)}
    modules = {f"model.layers.{i}.{name}": shape for i in range(config.num_hidden_layers)
               for name, shape in shapes.items()}
    modules["model.unembed_tokens"] = (config.vocab_size, h)
    tensors = {}
    for module, (rows, cols) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(
            rank, cols, generator=generator) / cols ** 0.5
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(
            rows, rank, generator=generator) * 1e-3
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(
        {"r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": str(base),
         "target_modules": "all-linear"}))
    return sum(t.numel() * 4 for t in tensors.values())


def sample_memory(process: subprocess.Popen, every_seconds: float = 0.1) -> dict[str, int]:
    """Peak ``RssAnon`` and ``RssFile`` (bytes) of a running process, until it ends."""
    peaks = {"RssAnon": 0, "RssFile": 0}
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            break
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in peaks:
                peaks[name] = max(peaks[name], int(value.split()[0]) * 1024)  # kB
        time.sleep(every_seconds)
    process.wait()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--shard-gib", type=float, default=2.0)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dir", help="where to generate (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="streaming-merge-"))
    config = real_width_config(args.layers)
    try:
        started = time.perf_counter()
        sizes = generate_model(root / "base", config, int(args.shard_gib * GIB))
        adapter_bytes = generate_adapter(root / "adapter", root / "base", config, args.rank)
        print(f"generated {sum(sizes) / GIB:.2f} GiB in {len(sizes)} bf16 shards (largest "
              f"{max(sizes) / GIB:.2f} GiB), adapter {adapter_bytes / GIB:.3f} GiB, in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        command = [sys.executable, "-c", "from tinkerkit.cli import run; run()", "export",
                   str(root / "adapter"), "--output", str(root / "out"), "--merge",
                   "--dtype", "bf16", "--no-logit-check"]
        started = time.perf_counter()
        process = subprocess.Popen(command)
        sampled = sample_memory(process)
        if process.returncode != 0:
            sys.exit(f"the export failed (exit code {process.returncode})")
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        merged = sorted((root / "out" / "merged").glob("*.safetensors"))
        print(f"\nstreaming merge of {sum(sizes) / GIB:.2f} GiB ({len(sizes)} shards, "
              f"{len(merged)} written), --no-logit-check:")
        print(f"  wall time          {wall:8.1f} s")
        print(f"  peak RSS           {peak / GIB:8.2f} GiB  (whole export command, ru_maxrss)")
        print(f"  peak anonymous     {sampled['RssAnon'] / GIB:8.2f} GiB  (sampled)")
        print(f"  peak file-backed   {sampled['RssFile'] / GIB:8.2f} GiB  (sampled: mapped shard)")
        print(f"  largest shard      {max(sizes) / GIB:8.2f} GiB")
        print(f"  adapter (float32)  {adapter_bytes / GIB:8.3f} GiB")
        print(f"  model              {sum(sizes) / GIB:8.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
