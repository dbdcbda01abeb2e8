"""Tinker's RL losses (importance_sampling, ppo, cispo, dro) on the local engine and through
``tinkerkit serve``, against token-by-token computations from the model's full logits."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tinker import types

from helpers import checkpoint_dir, running_server, seeded_lora_client, service
from tinkerkit.engines.local import LocalTrainingClient
from tinkerkit.engines.local.losses import LOSSES, resolve_loss
from tinkerkit.engines.local.model import adapter_parameters
from tinkerkit.errors import EngineError
from tinkerkit.loss_rules import LOSS_CONFIG_DEFAULTS

PROMPT = 3
"""Positions of each datum that hold the prompt: advantage 0, sampler log-probability 0."""
SHIFTS = [-0.5, -0.1, 0.0, 0.15, 0.6]
"""``target_logprobs - logprobs`` cycled over the sampled tokens: ratios 0.61 .. 1.82, so a
[0.8, 1.2] clip cuts on both sides."""
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Two plus two is four, not five.",
         "Hello there, general!"]
ADVANTAGES = [1.0, -0.75, 0.5]  # positive and negative


def make_client(model, tmp_path, **kwargs) -> LocalTrainingClient:
    """A CPU client whose LoRA B matrices are non-zero (seeded), so LoRA A gets gradients."""
    return seeded_lora_client(model, tmp_path, seed=5, **kwargs)


def naive_logprobs(model, tokens: list[int], targets: list[int]) -> torch.Tensor:
    """``log_softmax(model(tokens).logits)`` gathered at the targets: float32 ``[T]``."""
    logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(targets)[:, None]).squeeze(-1)


def rl_data(model, tokenizer) -> list[types.Datum]:
    """Datums as an RL loop builds them: the sampler's log-probabilities are the learner's
    shifted by :data:`SHIFTS` on the sampled tokens, 0 on the prompt."""
    data = []
    for text, advantage in zip(TEXTS, ADVANTAGES):
        ids = tokenizer.encode(text)
        tokens, targets = ids[:-1], ids[1:]
        with torch.no_grad():
            learner = naive_logprobs(model, tokens, targets).tolist()
        logprobs = [0.0 if t < PROMPT else lp - SHIFTS[t % len(SHIFTS)]
                    for t, lp in enumerate(learner)]
        advantages = [0.0 if t < PROMPT else advantage for t in range(len(tokens))]
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens),
                                loss_fn_inputs={"target_tokens": targets, "logprobs": logprobs,
                                                "advantages": advantages}))
    return data


def reference_term(loss: str, lp: torch.Tensor, q: float, a: float,
                   config: dict[str, float]) -> torch.Tensor:
    """One token's loss, written from Tinker's formulas for a scalar."""
    ratio = torch.exp(lp - q)
    if loss == "dro":
        return -(lp * a - 0.5 * config["beta"] * (lp - q) ** 2)
    if a == 0:
        return torch.zeros(())
    if loss == "importance_sampling":
        return -ratio * a
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    if loss == "ppo":
        return -torch.minimum(ratio * a, torch.clamp(ratio, low, high) * a)
    return -(min(max(ratio.item(), low), high) * lp * a)  # cispo: a constant coefficient


def grads(client) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in adapter_parameters(client.model).items()
            if p.grad is not None}


CASES = [("importance_sampling", None), ("ppo", None), ("ppo", {"clip_low_threshold": 0.9}),
         ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}), ("cispo", None),
         ("dro", {"beta": 0.3})]


@pytest.mark.parametrize(("loss", "config"), CASES)
def test_each_loss_and_its_gradients_equal_a_computation_from_full_logits(
        tiny_model, smol_tokenizer, tmp_path, loss, config):
    client = make_client(tiny_model, tmp_path)
    data = rl_data(client.model, smol_tokenizer)
    out = client.forward_backward(data, loss, config).result()
    engine_grads = grads(client)
    client.model.zero_grad(set_to_none=True)

    _, resolved = resolve_loss(loss, config)
    total, clipped = torch.zeros(()), set()
    for i, datum in enumerate(data):
        tokens = datum.model_input.to_ints()
        targets = datum.loss_fn_inputs["target_tokens"].tolist()
        lps = naive_logprobs(client.model, tokens, targets)
        torch.testing.assert_close(out.loss_fn_outputs[i]["logprobs"].to_torch(), lps.detach(),
                                   rtol=0, atol=2e-5)
        q = datum.loss_fn_inputs["logprobs"].tolist()
        a = datum.loss_fn_inputs["advantages"].tolist()
        for t, lp in enumerate(lps):
            total = total + reference_term(loss, lp, q[t], a[t], resolved)
            ratio = math.exp(lp.item() - q[t])
            if "clip_low_threshold" in resolved and a[t] != 0:
                side = ((ratio < resolved["clip_low_threshold"]) - (ratio > resolved[
                    "clip_high_threshold"]))
                clipped.add((side, a[t] > 0))
    total.backward()
    assert out.metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-5, abs=1e-5)
    expected = grads(client)
    assert engine_grads.keys() == expected.keys() and expected
    for key, value in expected.items():
        assert (engine_grads[key] - value).abs().max() <= 1e-4 * value.abs().max(), key
    if loss in ("ppo", "cispo") and resolved["clip_high_threshold"] < 1.5:
        # the clip is active on both sides, for both signs of advantage
        assert clipped >= {(1, True), (1, False), (-1, True), (-1, False)}


def test_losses_keep_packing_padding_and_checkpointing_exact(tiny_model, smol_tokenizer,
                                                             tmp_path):
    runs = []
    for packing, checkpointing in ((True, False), (False, True)):
        client = make_client(tiny_model, tmp_path, activation_checkpointing=checkpointing,
                             microbatch_tokens=24)
        client.packing = packing
        data = rl_data(client.model, smol_tokenizer)
        out = client.forward_backward(data, "ppo").result()
        runs.append((out, grads(client)))
    (a, grads_a), (b, grads_b) = runs
    assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
    for key, value in grads_a.items():
        assert (grads_b[key] - value).abs().max() <= 1e-4 * value.abs().max(), key


def test_losses_run_under_bf16_autocast_on_float32_logprobs(tiny_model, smol_tokenizer,
                                                             tmp_path):
    client = make_client(tiny_model, tmp_path, mixed_precision="bf16")
    data = rl_data(client.model, smol_tokenizer)
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    out = client.forward_backward(data, "cispo", config).result()
    total = 0.0
    for datum, output in zip(data, out.loss_fn_outputs):
        lps = output["logprobs"].to_torch()
        assert lps.dtype == torch.float32 and lps.shape == (len(datum.model_input.to_ints()),)
        q = datum.loss_fn_inputs["logprobs"].tolist()
        a = datum.loss_fn_inputs["advantages"].tolist()
        total += sum(reference_term("cispo", lp, q[t], a[t], config).item()
                     for t, lp in enumerate(lps))
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)
    assert sum(g.abs().sum().item() for g in grads(client).values()) > 0


def test_config_defaults_are_tinkers():
    assert resolve_loss("ppo", None)[1] == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert resolve_loss("cispo", {})[1] == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert resolve_loss("dro", None)[1] == {"beta": 0.05}
    assert resolve_loss("ppo", {"clip_high_threshold": 1.5})[1] == {
        "clip_low_threshold": 0.8, "clip_high_threshold": 1.5}
    assert resolve_loss("importance_sampling", None)[1] == {}
    assert set(LOSSES) == set(LOSS_CONFIG_DEFAULTS) == {
        "cross_entropy", "importance_sampling", "ppo", "cispo", "dro"}


def test_a_default_equals_the_same_value_given(tiny_model, smol_tokenizer, tmp_path):
    client = make_client(tiny_model, tmp_path)
    data = rl_data(client.model, smol_tokenizer)
    default = client.forward(data, "ppo").result()
    given = client.forward(data, "ppo", {"clip_low_threshold": 0.8,
                                          "clip_high_threshold": 1.2}).result()
    narrow = client.forward(data, "ppo", {"clip_low_threshold": 0.99,
                                         "clip_high_threshold": 1.01}).result()
    assert default.metrics["loss:sum"] == given.metrics["loss:sum"]
    assert narrow.metrics["loss:sum"] != default.metrics["loss:sum"]


def test_bad_inputs_and_configs_are_one_line_errors(tiny_model, smol_tokenizer, tmp_path):
    client = make_client(tiny_model, tmp_path)
    good = rl_data(client.model, smol_tokenizer)[0]
    n = len(good.model_input.to_ints())

    def datum(**inputs) -> types.Datum:
        merged = {**good.loss_fn_inputs, **inputs}
        return types.Datum(model_input=good.model_input,
                           loss_fn_inputs={k: v for k, v in merged.items() if v is not None})

    cases = [
        (lambda: client.forward_backward([datum(advantages=None)], "ppo"),
         r"datum 0: loss_fn_inputs\['advantages'\] is missing \(ppo needs target_tokens, "
         r"logprobs, advantages\)"),
        (lambda: client.forward_backward([good, datum(logprobs=[0.0] * (n - 1))], "cispo"),
         rf"datum 1: loss_fn_inputs\['logprobs'\] has shape \[{n - 1}\], model_input has \[{n}\]"),
        (lambda: client.forward_backward([datum(mask=types.TensorData(
            data=[1.0] * n, dtype="float32", shape=[n]))], "importance_sampling"),
         r"datum 0: loss_fn_inputs\['mask'\] is not an input of importance_sampling"),
        (lambda: client.forward_backward([datum(advantages=[math.nan] * n)], "dro"),
         r"loss_fn_inputs\['advantages'\] holds a non-finite value"),
        (lambda: client.forward_backward([good], "ppo", {"clip_ratio": 0.2}),
         "loss_fn_config key 'clip_ratio' is not used by ppo "
         r"\(keys it takes: clip_low_threshold, clip_high_threshold\)"),
        (lambda: client.forward_backward([good], "importance_sampling", {"beta": 0.1}),
         r"key 'beta' is not used by importance_sampling \(keys it takes: none\)"),
        (lambda: client.forward_backward([good], "dro", {"beta": "0.1"}),
         r"loss_fn_config\['beta'\]='0.1' must be a finite number"),
        (lambda: client.forward_backward([good], "ppo", {"clip_low_threshold": 1.3}),
         "ppo: clip_low_threshold=1.3 and clip_high_threshold=1.2 must satisfy"),
        (lambda: client.forward([good], "dro", {"beta": -1}), "dro: beta=-1.0 must be >= 0"),
        (lambda: client.forward_backward([good], "stable_reinforce"),
         "loss_fn 'stable_reinforce' is not supported by the local engine"),
    ]
    for call, message in cases:
        with pytest.raises(EngineError, match=message):
            call()
    assert client.forward_backward([good], "ppo").result().metrics["loss:sum"] != 0  # still fine


def test_a_dropped_snapshot_samplers_tree_is_reused_with_the_new_weights(tiny_model,
                                                                        smol_tokenizer, tmp_path):
    client = make_client(tiny_model, tmp_path)
    data = rl_data(client.model, smol_tokenizer)
    tokens = data[0].model_input.to_ints() + data[0].loss_fn_inputs["target_tokens"].tolist()[-1:]
    prompt = types.ModelInput.from_ints(tokens)

    def scored(sampler) -> list[float]:
        return sampler.compute_logprobs(prompt).result()[1:]

    first = client.save_weights_and_get_sampling_client()
    before, tree = scored(first), id(first._model)
    del first
    gc.collect()
    client.forward_backward(data, "importance_sampling").result()
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    second = client.save_weights_and_get_sampling_client()
    held = client.save_weights_and_get_sampling_client()  # the second is held: a new tree
    assert id(second._model) == tree and id(held._model) != tree
    learner = client.forward([data[0]], "importance_sampling").result()
    expected = learner.loss_fn_outputs[0]["logprobs"].tolist()
    assert scored(second) == pytest.approx(expected, abs=1e-5) == scored(held)
    assert max(abs(a - b) for a, b in zip(scored(second), before)) > 1e-3  # the policy moved
    client.forward_backward(data, "importance_sampling").result()
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert scored(second) == pytest.approx(expected, abs=1e-5)  # a snapshot stays fixed


# ---------------------------------------------------------------------------- through serve

LORA = {"rank": 4, "seed": 7, "train_unembed": False}
ADAM = types.AdamParams(learning_rate=1e-4)  # small: the clip stays partly inactive


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve-root")) as running:
        yield running


def test_serve_gives_bitwise_the_in_process_outputs(server, tiny_model, smol_tokenizer, tmp_path):
    local = LocalTrainingClient(tiny_model, LORA["rank"], seed=LORA["seed"], device="cpu",
                                checkpoint_root=tmp_path / "local")
    data = rl_data(local.model, smol_tokenizer)
    with service(server.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        for loss, config in CASES:  # one optimizer step after each, so the policy moves
            remote = training.forward_backward(data, loss, config).result()
            remote_step = training.optim_step(ADAM).result()
            here = local.forward_backward(data, loss, config).result()
            here_step = local.optim_step(ADAM).result()
            assert remote.metrics["loss:sum"] == here.metrics["loss:sum"], loss
            for a, b in zip(remote.loss_fn_outputs, here.loss_fn_outputs):
                np.testing.assert_array_equal(a["logprobs"].to_numpy(), b["logprobs"].to_numpy())
            assert remote_step.metrics["grad_norm"] == here_step.metrics["grad_norm"] > 0, loss
        with pytest.raises(Exception, match="loss_fn_config key 'beta' is not used by ppo"):
            training.forward_backward(data, "ppo", {"beta": 0.1}).result()
        with pytest.raises(Exception, match=r"loss_fn_inputs\['advantages'\] is missing"):
            bare = [types.Datum(model_input=d.model_input,
                                loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"],
                                                "logprobs": d.loss_fn_inputs["logprobs"]})
                    for d in data]
            training.forward_backward(bare, "importance_sampling").result()
        # the session goes on after refused requests
        assert training.forward(data, "dro").result().metrics["loss:sum"] != 0


def test_forward_backward_custom_dpo_through_serve_gives_the_hand_gradient(
        server, tiny_model, smol_tokenizer, tmp_path):
    """DPO on one preference pair: ``-logsigmoid(beta * ((c - c_ref) - (r - r_ref)))`` with
    ``c``/``r`` the summed completion log-probabilities. One AdamW step with a huge ``eps`` is
    ``lr * g / (|g| + eps)`` per element, so the served update gives the gradient back."""
    beta, ref_chosen, ref_rejected = 0.5, -40.0, -35.0
    prompt = smol_tokenizer.encode("Question: two plus two? Answer:")
    pair = []
    for answer in (" four", " five, or maybe six"):
        ids = prompt + smol_tokenizer.encode(answer)
        weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(ids) - len(prompt))
        pair.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:], "weights": weights}))

    def dpo(data, logprobs):
        chosen, rejected = ((lp * d.loss_fn_inputs["weights"].to_torch()).sum()
                            for d, lp in zip(data, logprobs))
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = -torch.nn.functional.logsigmoid(beta * margin)
        return loss, {"dpo_margin": margin.item()}

    # the hand computation: autograd through the full logits of the same initial adapter
    local = LocalTrainingClient(tiny_model, LORA["rank"], seed=LORA["seed"], device="cpu",
                                checkpoint_root=tmp_path / "local")
    logprobs = [naive_logprobs(local.model, d.model_input.to_ints(),
                               d.loss_fn_inputs["target_tokens"].tolist()) for d in pair]
    loss, metrics = dpo(pair, logprobs)
    loss.backward()
    params = adapter_parameters(local.model)
    gradient = {k: p.grad.clone() for k, p in params.items()}
    start = {k: p.detach().clone() for k, p in params.items()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gradient.values())).item()

    eps, lr = 1e3, 1e3
    with service(server.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        result = training.forward_backward_custom(pair, dpo).result()
        step = training.optim_step(types.AdamParams(learning_rate=lr, eps=eps,
                                                    weight_decay=0.0)).result()
        path = training.save_state("after-dpo").result().path
    assert result.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
    assert result.metrics["dpo_margin"] == pytest.approx(metrics["dpo_margin"], rel=1e-5)
    assert step.metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)
    after = load_file(checkpoint_dir(server.root, path) / "adapter_model.safetensors")
    changed = 0
    for key, g in gradient.items():
        expected = start[key] - lr * g / (g.abs() + eps)
        saved = after[key]
        assert (saved - expected).abs().max() <= 1e-4 * (g.abs().max() + 1e-12) + 1e-7, key
        changed += bool((g != 0).any())
    assert changed > 0


def test_serve_keeps_the_newest_snapshot_samplers(server, tiny_model, smol_tokenizer):
    from tinkerkit.serve.state import SNAPSHOT_SAMPLERS_KEPT

    prompt = types.ModelInput.from_ints(smol_tokenizer.encode("Two plus two is"))
    params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=1)
    with service(server.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        samplers = [training.save_weights_and_get_sampling_client().result()
                    for _ in range(SNAPSHOT_SAMPLERS_KEPT + 1)]
        newest = samplers[-1].sample(prompt, 2, params).result()
        assert all(len(s.logprobs) == len(s.tokens) == 3 for s in newest.sequences)
        samplers[1].sample(prompt, 1, params).result()  # still kept
        with pytest.raises(Exception, match=f"was released: tinkerkit serve keeps the "
                                            f"{SNAPSHOT_SAMPLERS_KEPT} newest samplers"):
            samplers[0].sample(prompt, 1, params).result()


# ---------------------------------------------------------------------- examples/rl_loop_sdk.py

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def rl_loop(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import rl_loop_sdk

    return rl_loop_sdk


def test_the_example_builds_aligned_datums_and_grades_answers(rl_loop):
    sequence = types.SampledSequence(stop_reason="stop", sequence_id="s0",
                                     tokens_np=np.array([7, 8, 9], np.int32),
                                     logprobs_np=np.array([-0.5, -1.0, -2.0], np.float32))
    datum = rl_loop.rl_datum([1, 2, 3, 4], sequence, advantage=-0.25)
    assert datum.model_input.to_ints() == [1, 2, 3, 4, 7, 8]
    inputs = {k: v.tolist() for k, v in datum.loss_fn_inputs.items()}
    assert inputs == {"target_tokens": [2, 3, 4, 7, 8, 9],
                      "logprobs": [0.0, 0.0, 0.0, -0.5, -1.0, -2.0],
                      "advantages": [0.0, 0.0, 0.0, -0.25, -0.25, -0.25]}
    assert rl_loop.reward("17 + 25 = 42. The answer is 42.", "42") == (1.0, True)
    assert rl_loop.reward("The answer is 41.", "42") == (0.1, False)
    assert rl_loop.reward("I do not know", "42") == (0.0, False)


@pytest.mark.slow
def test_the_sdk_rl_loop_runs_five_iterations_on_serve_with_the_real_model(rl_loop, capsys):
    records = rl_loop.main(["--iterations", "5"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("{")]
    assert printed == records and [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    for record in records:
        assert 0 <= record["accuracy"] <= record["reward_mean"] + 1e-9 <= 1 + 1e-9
        assert record["groups"] == 4 and record["sampler_seconds"] > 0
        assert record["mean_answer_tokens"] > 0
    trained = [r for r in records if r["groups_with_signal"]]
    assert trained and all(abs(r["logprob_gap"]) < 0.05 for r in trained)
