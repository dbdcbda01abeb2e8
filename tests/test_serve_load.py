"""``tinkerkit serve`` under load: concurrent SDK clients, each replayed alone afterwards.

The load test itself is ``benchmarks/serve_load.py`` (8 clients x 60 s prints the figures); the
test runs a short version of the same code and checks its verdict item by item.
"""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from tinkerkit.engines.local.model import adapter_parameters, load_model, wrap_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serve_load  # noqa: E402


def in_threads(work, threads: int = 3, times: int = 3) -> list:
    """Run ``work()`` ``times`` times in each of ``threads`` threads at once; its results."""
    results, errors = [], []

    def loop() -> None:
        for _ in range(times):
            try:
                results.append(work())
            except Exception as e:  # collected: the caller's assertion names it
                errors.append(repr(e))

    running = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    assert errors == []
    return results


def test_models_loaded_at_once_in_threads_are_complete(tiny_model):
    """transformers' from_pretrained patches process-wide state while it loads; a server loads
    its clients' models in parallel threads, and each must still come out whole."""
    expected = load_model(tiny_model).state_dict()
    for model in in_threads(lambda: load_model(tiny_model)):
        state = model.state_dict()
        assert not any(t.is_meta for t in state.values())
        assert all(torch.equal(state[k], v) for k, v in expected.items())
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_lora_init_drawn_at_once_in_threads_follows_each_seed(tiny_model):
    """The LoRA init draws from torch's global RNG; models wrapped in parallel threads must each
    get the init of their own seed."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    bases = in_threads(lambda: load_model(tiny_model), threads=1, times=10)

    def lora(model, seed: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in
                adapter_parameters(wrap_lora(model, copy.deepcopy(config), seed)).items()}

    expected = {seed: lora(bases.pop(), seed) for seed in (1, 2)}
    seeds = iter([1, 2] * 4)
    lock = threading.Lock()

    def wrap() -> tuple[int, dict[str, torch.Tensor]]:
        with lock:
            seed, base = next(seeds), bases.pop()
        return seed, lora(base, seed)

    for seed, weights in in_threads(wrap, threads=4, times=2):
        assert all(torch.equal(weights[k], v) for k, v in expected[seed].items()), seed


@pytest.mark.slow
def test_four_clients_for_ten_seconds_equal_their_sequential_replays(tmp_path, tiny_model):
    report = serve_load.run(clients=4, seconds=10, work=tmp_path, model=tiny_model)
    report.print()
    kinds = {op.kind for op in report.ops}
    assert {"forward_backward", "optim_step", "save_state", "save_sampler", "sample_checkpoint",
            "sample_snapshot", "failure:vocab"} <= kinds
    assert report.lost == 0 and report.duplicate_request_ids == 0
    assert report.unexpected_failures() == []
    assert [log.crashed for log in report.logs] == [None] * 4
    assert len(report.replays) == 4 and all(r.mismatches == [] for r in report.replays)
    assert all(r.compared["optim_step"] >= 2 and r.compared["checkpoints"] >= 2
               for r in report.replays)
    assert report.listing_errors == [] and report.server_errors == []
    assert report.passed
