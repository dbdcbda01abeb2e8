"""GGUF export checked in llama.cpp itself: logits and greedy answers against the merged model.

For a merged model directory (``tinkerkit export CKPT --output DIR --merge`` writes DIR/merged;
the demo writes demo_output/export/merged) this writes the GGUF files (f16 and q8_0 by default,
each checked by transformers' GGUF loader as ``tinkerkit export --gguf`` does) and then, for each
file, runs llama.cpp through ``llama-cpp-python`` on one chat prompt and prints:

* whether llama.cpp tokenizes the chat-templated prompt to the same ids as the merged model's
  tokenizer;
* the largest |logit difference| between llama.cpp's logits over the prompt and the merged
  model's (transformers, float32);
* llama.cpp's greedy answer next to transformers' greedy answer of the merged model, and whether
  they agree.

Needs the optional extra ``tinkerkit[llama]`` (``llama-cpp-python``, built from source).

Usage::

    python benchmarks/gguf_llama_cpp.py demo_output/export/merged --output /tmp/gguf-check
    python benchmarks/gguf_llama_cpp.py MERGED --types q8_0 --question "What is 12 + 30?"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from tinkerkit.export_gguf import GGUF_TYPES, export_gguf
from tinkerkit.models import load_tokenizer

DEMO_QUESTION = "Dan buys 5 books at $6 each and a bag for $6. How many dollars does Dan spend?"


def llama_cpp_run(gguf_path: Path, prompt_ids: list[int], max_tokens: int):
    """llama.cpp's logits over the prompt, shape (T, vocab), and its greedy continuation ids."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=max(512, len(prompt_ids) + max_tokens + 8),
                logits_all=True, verbose=False, seed=0, n_threads=2)
    llm.eval(prompt_ids)
    logits = np.array(llm.scores[: len(prompt_ids)], dtype=np.float32)
    llm.reset()
    generated = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if llm.token_eos() == token or len(generated) >= max_tokens:
            break
        generated.append(token)
    return logits, generated, llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("merged", help="merged HF model directory")
    parser.add_argument("--output", default="gguf_check", help="directory for the GGUF files")
    parser.add_argument("--types", nargs="+", default=list(GGUF_TYPES), choices=GGUF_TYPES)
    parser.add_argument("--question", default=DEMO_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    merged, output = Path(args.merged), Path(args.output)
    tokenizer = load_tokenizer(str(merged))
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.question}],
                                         tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([prompt_ids])).logits[0].float().numpy()
        ours = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                              max_new_tokens=args.max_tokens,
                              eos_token_id=tokenizer.eos_token_id)[0, len(prompt_ids):].tolist()
    ours = [t for t in ours if t != tokenizer.eos_token_id]
    ours_text = tokenizer.decode(ours, skip_special_tokens=True)
    print(f"prompt: {len(prompt_ids)} tokens; transformers greedy (merged, float32): {ours_text!r}")

    for gguf_type in args.types:
        start = time.perf_counter()
        result = export_gguf(merged, output / f"model-{gguf_type}.gguf", gguf_type)
        seconds = time.perf_counter() - start
        size_mb = result.path.stat().st_size / 2**20
        print(f"\n{gguf_type}: {result.path} ({size_mb:.1f} MiB, written and checked in "
              f"{seconds:.0f} s); transformers' GGUF loader: max |logit diff| "
              f"{result.max_logit_diff:.4g} (tolerance {result.tolerance:.4g})")
        logits, generated, llm = llama_cpp_run(result.path, prompt_ids, args.max_tokens)
        cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        print(f"  llama.cpp tokenizes the prompt to the same ids: {cpp_ids == prompt_ids}")
        diff = float(np.abs(logits - reference[: len(logits)]).max())
        print(f"  llama.cpp logits vs merged model: max |diff| {diff:.4g} "
              f"(logit scale {np.abs(reference).max():.3g})")
        answer = llm.detokenize(generated).decode("utf-8", errors="replace")
        same = generated == ours
        print(f"  llama.cpp greedy: {answer!r}")
        print(f"  same greedy tokens as transformers: {same}"
              + ("" if same else f" (first difference at token "
                 f"{next((i for i, (a, b) in enumerate(zip(generated, ours)) if a != b), min(len(generated), len(ours)))})"))


if __name__ == "__main__":
    main()
