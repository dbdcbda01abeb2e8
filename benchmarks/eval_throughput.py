"""Evaluation throughput: ``tinkerkit eval``'s batched sampler vs a per-example ``generate`` loop.

Both run greedy decoding of the same prompts (GSM8K test questions rendered by the training
renderer, exactly as ``tinkerkit eval`` sends them) on the same model object, with the same
``max_tokens`` and the same stop tokens, one after the other in one process. Printed: generated
tokens, wall seconds and generated tokens/s for each, the speed ratio (goal: >= 3.0x), and the
fraction of identical outputs (goal: >= 98%), with the first differing example.

    .venv/bin/python benchmarks/eval_throughput.py            # 100 prompts, 256 tokens
    .venv/bin/python benchmarks/eval_throughput.py --limit 20 --max-tokens 64

The reference is ``model.generate(ids, do_sample=False, max_new_tokens=N, eos_token_id=stops)``
on one prompt at a time (transformers' KV-cached greedy loop, the usual evaluation script).

Outputs differ only through batched numerics: a batch runs the same float32 matmuls on other
shapes (and left-padded rows), so logits can differ in the last bits, and greedy picks can flip
where the top two candidates tie within that noise; once a token differs, the rest follows.

Results, and what each change to the sampler bought: ``docs/PERFORMANCE.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from tinker import types
from transformers import GenerationConfig

from tinkerkit.data.formats import load_conversations
from tinkerkit.engines import EVAL_BATCH_SIZE
from tinkerkit.engines.local import LocalSamplingClient
from tinkerkit.engines.local.model import load_model
from tinkerkit.models import load_tokenizer
from tinkerkit.render import Renderer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def ours(client: LocalSamplingClient, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """All prompts submitted at once, as ``tinkerkit eval`` does; the tokens of each answer."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    futures = [client.sample(types.ModelInput.from_ints(p), 1, params) for p in prompts]
    return [list(f.result().sequences[0].tokens) for f in futures]


@torch.no_grad()
def per_example(model, prompts: list[list[int]], max_tokens: int, stops: list[int],
                pad: int) -> list[list[int]]:
    """One ``model.generate`` call per prompt; the tokens after the prompt (stop token kept)."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=stops,
                              pad_token_id=pad)
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, "float32").eval()
    renderer = Renderer(tokenizer)
    conversations = load_conversations([args.data]).conversations[:args.limit]
    prompts = [renderer.build_prompt(c).to_ints() for c in conversations]
    client = LocalSamplingClient(args.model, model=model, tokenizer=tokenizer,
                                 max_batch_size=args.batch_size)
    stops = sorted(client.default_stop_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    print(f"{len(prompts)} prompts from {args.data}, max_tokens {args.max_tokens}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")

    rows = []
    for name, run in (("tinkerkit eval (batched)", lambda: ours(client, prompts, args.max_tokens)),
                      ("per-example generate", lambda: per_example(
                          model, prompts, args.max_tokens, stops, pad))):
        start = time.perf_counter()
        outputs = run()
        seconds = time.perf_counter() - start
        tokens = sum(len(o) for o in outputs)
        rows.append((name, outputs, tokens, seconds))
        print(f"{name:<26} {tokens:>7} tokens {seconds:>8.1f} s {tokens / seconds:>8.1f} tokens/s"
              f"  (load average {os.getloadavg()[0]:.1f})")
    client.close()

    (_, batched, t_ours, s_ours), (_, single, t_ref, s_ref) = rows
    same = [a == b for a, b in zip(batched, single)]
    print(f"speed ratio: {(t_ours / s_ours) / (t_ref / s_ref):.2f}x (goal >= 3.0x)")
    print(f"identical outputs: {sum(same)}/{len(same)} = {sum(same) / len(same):.1%} "
          "(goal >= 98%)")
    for i, equal in enumerate(same):
        if not equal:
            a, b = batched[i], single[i]
            at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"  example {i}: first difference at generated token {at} of {len(a)}/{len(b)}")


if __name__ == "__main__":
    main()
