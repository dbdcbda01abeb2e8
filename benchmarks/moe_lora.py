"""Expert LoRA: tinkerkit's grouped computation against PEFT's ``target_parameters`` path.

One sparse MLP layer of Qwen3-MoE (router and experts, transformers 5's fused
``Qwen3MoeExperts``), forward and backward on random hidden states, LoRA on the experts only:

* ``ours``: :class:`tinkerkit.engines.local.kernels.expert_lora.ExpertLora` (through
  ``wrap_lora``, ``target_modules=["experts"]``): Tinker's shared-outer layout, rank ``r`` per
  projection (w1, w3, w2), the LoRA path computed on the routed tokens, ``W + ΔW`` never formed.
* ``peft``: PEFT's LoRA on ``nn.Parameter`` (``LoraConfig(target_parameters=[...gate_up_proj,
  ...down_proj])``): one per-expert pair on each fused parameter, applied as a parametrization
  that forms ``W + ΔW`` for every expert on every forward pass. Rank ``2r`` on ``gate_up_proj``
  (gate and up together) and ``r`` on ``down_proj`` hold the same function as ours.

Two layer sizes: ``tiny`` (``qwen3-moe-tiny-random``'s layer: hidden 256, 8 experts of width
128, top-2) and ``30b`` (Qwen3-30B-A3B's layer: hidden 2048, 128 experts of width 768, top-8).
Each (size, path) runs in its own subprocess and reports the median seconds of a forward plus
backward pass (after one warm-up) and the peak resident memory above the memory after building
the layer (``ru_maxrss``, so torch's allocator caching included). Before the timing, one process
checks that both paths compute the same output and input gradient for the same LoRA weights
(ours mapped into PEFT's layout).

The machine may be shared: a case whose expected need does not fit in ``MemAvailable`` is
skipped. Results: ``docs/PERFORMANCE.md``.

Example::

    .venv/bin/python benchmarks/moe_lora.py                         # both sizes, both paths
    .venv/bin/python benchmarks/moe_lora.py --sizes tiny --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

from long_context import GIB, available_gib  # this folder is on sys.path when run as a script

SIZES = {"tiny": dict(hidden_size=256, moe_intermediate_size=128, num_experts=8,
                      num_experts_per_tok=2),
         "30b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8)}
"""Layer sizes: qwen3-moe-tiny-random's and Qwen3-30B-A3B's (its config.json)."""


def expected_gib(size: str, path: str, tokens: int) -> float:
    """Rough peak need (GiB, float32): the experts' weights once, PEFT twice more (``W + ΔW`` and
    its gradient), plus per routed copy the activations of both paths."""
    fields = SIZES[size]
    hidden, width, experts = (fields[k] for k in ("hidden_size", "moe_intermediate_size",
                                                  "num_experts"))
    weights = 3 * experts * hidden * width * 4 / GIB
    routed = tokens * fields["num_experts_per_tok"] * (6 * width + 4 * hidden) * 4 / GIB
    return 0.6 + weights * (3 if path == "peft" else 1) + routed


def _rss() -> int:
    """Peak resident memory of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------ one case


def build(size: str, path: str, rank: int, seed: int):
    """The MoE layer with LoRA on its experts (LoRA B drawn non-zero, so that it counts)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from tinkerkit.engines.local.model import wrap_lora
    from tinkerkit.models import qwen3_moe_tiny_config

    config = qwen3_moe_tiny_config(**SIZES[size])
    config._experts_implementation = "grouped_mm"  # transformers' own choice on this torch
    torch.manual_seed(seed)
    layer = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.02)
    if path == "ours":
        model = wrap_lora(layer, LoraConfig(r=rank, lora_alpha=rank,
                                            target_modules=["experts"]), seed)
    else:
        peft_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=[],
                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                                 rank_pattern={"gate_up_proj": 2 * rank},
                                 alpha_pattern={"gate_up_proj": 2 * rank})
        with warnings.catch_warnings():  # PEFT warns that the patterns missed the outer wrapper
            warnings.simplefilter("ignore", RuntimeWarning)
            model = get_peft_model(layer, peft_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def inputs(size: str, tokens: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, tokens, SIZES[size]["hidden_size"], generator=g, requires_grad=True)


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.size, args.worker, args.rank, args.seed)
    x = inputs(args.size, args.tokens, args.seed)
    built = _rss()
    seconds = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        out = model(x)
        out.square().mean().backward()
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        x.grad = None
    print(json.dumps({"seconds": statistics.median(seconds[1:]), "peak_extra_gib":
                      (_rss() - built) / GIB, "built_gib": built / GIB}))


def peft_factors(ours, rank: int) -> dict[str, tuple]:
    """Our experts' LoRA weights in PEFT's ``ParamWrapper`` layout, same function.

    PEFT keeps, per fused parameter, ``lora_A.weight [R·E, in]`` (expert ``e``'s ``[R, in]``
    block at rows ``e·R ...``) and ``lora_B.weight [out, R·E]`` (expert ``e``'s ``[out, R]``
    matrix at columns ``k·E + e``). gate_up (``R = 2r``): ``A_e = [A1; A3]``, ``B_e =
    blockdiag(B1_e, B3_e)``; down (``R = r``): ``A_e = A2_e``, ``B_e = B2``.

    Returns:
        ``{"gate_up_proj" | "down_proj": (lora_A.weight, lora_B.weight)}``.
    """
    import torch

    pairs = {n: (getattr(ours, n)["default"].lora_A.weight.detach(),
                 getattr(ours, n)["default"].lora_B.weight.detach()) for n in ("w1", "w3", "w2")}
    experts, width = pairs["w1"][1].shape[:2]
    hidden = pairs["w2"][1].shape[1]
    a_gate_up = torch.cat([pairs["w1"][0], pairs["w3"][0]], 1).expand(experts, -1, -1)
    b_gate_up = torch.zeros(experts, 2 * width, 2 * rank)
    b_gate_up[:, :width, :rank], b_gate_up[:, width:, rank:] = pairs["w1"][1], pairs["w3"][1]
    a_down, b_down = pairs["w2"][0], pairs["w2"][1].expand(experts, hidden, rank)

    def to_peft(a, b):
        return a.reshape(-1, a.shape[-1]), b.permute(1, 2, 0).reshape(b.shape[1], -1)

    return {"gate_up_proj": to_peft(a_gate_up, b_gate_up), "down_proj": to_peft(a_down, b_down)}


def check_same_function(size: str, rank: int, seed: int, tokens: int) -> tuple[float, float]:
    """Largest relative difference of the outputs and of the input gradients of both paths for
    the same LoRA weights."""
    import torch

    ours, peft = build(size, "ours", rank, seed), build(size, "peft", rank, seed)
    experts = ours.base_model.model.experts
    factors = peft_factors(experts, rank)
    with torch.no_grad():
        for module in peft.modules():
            name = getattr(module, "parameter_name", None)
            if name in factors:
                module.lora_A["default"].weight.copy_(factors[name][0])
                module.lora_B["default"].weight.copy_(factors[name][1])
    results = []
    for model in (ours, peft):
        x = inputs(size, tokens, seed)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad))
    (out_a, grad_a), (out_b, grad_b) = results
    return (float((out_a - out_b).abs().max() / out_b.abs().max()),
            float((grad_a - grad_b).abs().max() / grad_b.abs().max()))


# ---------------------------------------------------------------------------------- driver


def run_case(args, size: str, path: str) -> dict:
    need, free = expected_gib(size, path, args.tokens), available_gib()
    if need > free:
        return {"status": f"does not fit (needs ~{need:.1f} GiB, {free:.1f} GiB available)"}
    command = [sys.executable, __file__, "--worker", path, "--size", size, "--rank",
               str(args.rank), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
               "--seed", str(args.seed), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"status": f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,30b", help="comma-separated: tiny, 30b")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per forward pass")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after a warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    sizes = [s.strip() for s in args.sizes.split(",")]
    if not set(sizes) <= set(SIZES):
        parser.error(f"--sizes: use {', '.join(SIZES)} (got {args.sizes})")
    import torch

    print(f"one Qwen3-MoE layer, LoRA rank {args.rank} on the experts, {args.tokens} tokens, "
          f"float32, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for size in sizes:
        out_diff, grad_diff = check_same_function(size, args.rank, args.seed, min(args.tokens, 256))
        print(f"  {size}: same LoRA weights, max relative difference: output {out_diff:.1e}, "
              f"input gradient {grad_diff:.1e}", flush=True)
        results = {path: run_case(args, size, path) for path in ("ours", "peft")}
        for path, result in results.items():
            print(f"  {size}, {path}: {json.dumps(result)}", flush=True)
        rows.append((size, results, out_diff))
    header = (f"{'layer':>6} | {'ours s':>7} | {'peft s':>7} | {'speed-up':>8} | "
              f"{'ours +GiB':>9} | {'peft +GiB':>9} | {'max rel. diff':>13}")
    print("\n" + header + "\n" + "-" * len(header))
    for size, results, diff in rows:
        ours, peft = results["ours"], results["peft"]
        both = ours["status"] == peft["status"] == "ok"

        def cell(result, key, fmt):
            return format(result[key], fmt) if result["status"] == "ok" else result["status"]

        speedup = f"{peft['seconds'] / ours['seconds']:.1f}x" if both else ""
        print(f"{size:>6} | {cell(ours, 'seconds', '.3f'):>7} | {cell(peft, 'seconds', '.3f'):>7} "
              f"| {speedup:>8} | {cell(ours, 'peak_extra_gib', '.2f'):>9} | "
              f"{cell(peft, 'peak_extra_gib', '.2f'):>9} | {diff:>13.1e}")


if __name__ == "__main__":
    main()
