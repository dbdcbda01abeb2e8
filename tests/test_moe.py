"""Mixture-of-experts models: LoRA on the experts in Tinker's layout, in the local engine.

Values are checked against an independent naive computation: for every (token, slot) pair, the
expert's weight plus its LoRA change, ``x · (W_e + s · B_e · A_e)ᵀ``, formed explicitly.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from tinker import types
from transformers import AutoModelForCausalLM, GPT2Config

import tinkerkit.engines.local.kernels.expert_lora as expert_lora
from helpers import checkpoint_dir, running_server, service
from tinkerkit.engines.local import (
    LocalSamplingClient,
    LocalTrainingClient,
    create_training_client_from_state,
)
from tinkerkit.engines.local.model import (
    adapter_parameters,
    resolve_target_modules,
    wrap_lora,
)
from tinkerkit.errors import ConfigError
from tinkerkit.models import qwen3_moe_tiny_config

HIDDEN, WIDTH, EXPERTS, RANK = 64, 32, 8, 4


def tiny_moe_config(**overrides):
    """A 2-layer Qwen3-MoE of width 64 (8 experts of width 32, 2 routed) over 512 token ids."""
    fields = dict(vocab_size=512, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, moe_intermediate_size=WIDTH,
                  num_experts=EXPERTS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.2)
    fields.update(overrides)
    return qwen3_moe_tiny_config(**fields)


def wrapped_experts(seed: int = 0):
    """The first layer's experts of a LoRA-wrapped tiny MoE, LoRA factors all non-zero."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config())
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=["experts"])
    experts = wrap_lora(model, config, seed).base_model.model.model.layers[0].mlp.experts
    with torch.no_grad():
        for param in experts.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
    return experts


def naive_experts(experts, x, index, weights):
    """``sum_j weights[t, j] · down_e(act(gate_e(x_t)) · up_e(x_t))`` with each expert's weights
    ``W_e + s · B_e · A_e`` built explicitly (shared factors indexed at 0)."""
    base, s = experts.base_layer, experts.scaling["default"]
    pairs = {name: (getattr(experts, name)["default"].lora_A.weight,
                    getattr(experts, name)["default"].lora_B.weight) for name in ("w1", "w3", "w2")}

    def weight(name, base_weight, e):
        a, b = pairs[name]
        return base_weight + s * b[e if b.shape[0] > 1 else 0] @ a[e if a.shape[0] > 1 else 0]

    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros(HIDDEN)
        for j in range(index.shape[1]):
            e = int(index[t, j])
            gate = x[t] @ weight("w1", base.gate_up_proj[e, :WIDTH], e).T
            up = x[t] @ weight("w3", base.gate_up_proj[e, WIDTH:], e).T
            row = row + weights[t, j] * ((base.act_fn(gate) * up) @ weight("w2", base.down_proj[e], e).T)
        rows.append(row)
    return torch.stack(rows)


def routing(tokens: int, seed: int = 1):
    """Top-2 routes over experts 0-5 only (6 and 7 get no token), random positive weights."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 6, (tokens,), generator=g)
    second = (first + torch.randint(1, 6, (tokens,), generator=g)) % 6
    return torch.stack([first, second], 1), torch.rand(tokens, 2, generator=g)


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_expert_lora_equals_naive_per_expert_loop(grouped_mm, monkeypatch):
    if not grouped_mm:  # the per-expert loop that runs where grouped_mm does not
        monkeypatch.setattr(expert_lora, "_grouped_mm_applies", lambda x, w: False)
    experts = wrapped_experts()
    x = torch.randn(29, HIDDEN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    index, weights = routing(29)
    params = [p for p in experts.parameters() if p.requires_grad]
    assert len(params) == 6  # w1, w3, w2 x (lora_A, lora_B); the base stays frozen

    got = experts(x, index, weights)
    expected = naive_experts(experts, x, index, weights)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    got_grads = torch.autograd.grad(got, [x, *params], grad_out)
    expected_grads = torch.autograd.grad(expected, [x, *params], grad_out)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        assert (got_grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()
    # Experts 6 and 7 received no token: their own factors get exactly zero gradient.
    by_name = dict(zip([n for n, p in experts.named_parameters() if p.requires_grad],
                       got_grads[1:]))
    assert by_name["w1.default.lora_B.weight"][6:].abs().max() == 0
    assert by_name["w2.default.lora_A.weight"][6:].abs().max() == 0
    assert by_name["w1.default.lora_B.weight"][:6].abs().max() > 0


def test_expert_lora_merge_equals_unmerged_and_lands_in_gate_up_down():
    experts = wrapped_experts()
    x = torch.randn(11, HIDDEN, generator=torch.Generator().manual_seed(4))
    index, weights = routing(11)
    with torch.no_grad():
        unmerged = experts(x, index, weights)
        gate_up, down = experts.base_layer.gate_up_proj.clone(), experts.base_layer.down_proj.clone()
        experts.merge(safe_merge=True)
        merged = experts(x, index, weights)
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    s = experts.scaling["default"]
    pair = {n: (getattr(experts, n)["default"].lora_A.weight, getattr(experts, n)["default"].lora_B.weight)
            for n in ("w1", "w3", "w2")}
    for e in (0, 7):  # every expert, whether routed to or not
        expected_gate = gate_up[e, :WIDTH] + s * pair["w1"][1][e] @ pair["w1"][0][0]
        expected_up = gate_up[e, WIDTH:] + s * pair["w3"][1][e] @ pair["w3"][0][0]
        expected_down = down[e] + s * pair["w2"][1][0] @ pair["w2"][0][e]
        torch.testing.assert_close(experts.base_layer.gate_up_proj[e, :WIDTH], expected_gate)
        torch.testing.assert_close(experts.base_layer.gate_up_proj[e, WIDTH:], expected_up)
        torch.testing.assert_close(experts.base_layer.down_proj[e], expected_down)


def test_lora_init_is_peft_kaiming_for_a_zero_for_b_and_seeded():
    a, b = wrapped_experts(seed=5), wrapped_experts(seed=5)
    torch.manual_seed(0)
    fresh = wrap_lora(AutoModelForCausalLM.from_config(tiny_moe_config()),
                      LoraConfig(r=RANK, lora_alpha=8, target_modules=["experts"]), seed=5)
    experts = fresh.base_model.model.model.layers[0].mlp.experts
    for name, fan_in in (("w1", HIDDEN), ("w3", HIDDEN), ("w2", WIDTH)):
        lora_a = getattr(experts, name)["default"].lora_A.weight
        assert lora_a.abs().max() <= 1 / fan_in ** 0.5  # kaiming_uniform(a=sqrt(5)): 1/sqrt(in)
        assert lora_a.abs().max() > 0.5 / fan_in ** 0.5
        assert getattr(experts, name)["default"].lora_B.weight.abs().max() == 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def expected_layout(layers: int) -> dict[str, list[int]]:
    """Tinker's expert keys and shapes (module docstring of expert_lora) for every layer."""
    prefix = "base_model.model.model.layers.{}.mlp.experts."
    shapes = {"w1": ([1, RANK, HIDDEN], [EXPERTS, WIDTH, RANK]),
              "w3": ([1, RANK, HIDDEN], [EXPERTS, WIDTH, RANK]),
              "w2": ([EXPERTS, RANK, WIDTH], [1, HIDDEN, RANK])}
    return {prefix.format(i) + f"{name}.lora_{part}.weight": shape
            for i in range(layers) for name, (a, b) in shapes.items()
            for part, shape in (("A", a), ("B", b))}


def moe_client(path, tmp_path, targets="mlp", **kwargs) -> LocalTrainingClient:
    return LocalTrainingClient(path, RANK, seed=0, device="cpu", target_modules=targets,
                               checkpoint_root=tmp_path / "ckpt", mixed_precision="no", **kwargs)


def test_checkpoint_holds_exactly_tinkers_expert_layout(tiny_qwen3_moe, tmp_path):
    client = moe_client(tiny_qwen3_moe, tmp_path)
    assert client.target_modules == ["experts"]
    saved = load_file(f"{client.save_state('s').result().path}/adapter_model.safetensors")
    assert {k: list(v.shape) for k, v in saved.items()} == expected_layout(2)

    everything = moe_client(tiny_qwen3_moe, tmp_path, targets="all-linear")
    assert everything.target_modules == ["experts", "k_proj", "o_proj", "q_proj", "v_proj"]
    keys = set(load_file(f"{everything.save_weights_for_sampler('w').result().path}"
                         "/adapter_model.safetensors"))
    assert expected_layout(2).keys() <= keys
    assert len(keys - expected_layout(2).keys()) == 2 * 4 * 2  # q, k, v, o: A and B, 2 layers
    assert not any(".mlp.gate." in k for k in keys)  # the router is never trained


def moe_datums() -> list[types.Datum]:
    """Two next-token datums of 24 and 17 random token ids (seeded)."""
    g = torch.Generator().manual_seed(0)
    datums = []
    for length in (24, 17):
        tokens = torch.randint(0, 5000, (length,), generator=g).tolist()
        datums.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                  loss_fn_inputs={"target_tokens": tokens[1:],
                                                  "weights": [1.0] * (length - 1)}))
    return datums


def train_steps(client: LocalTrainingClient, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(client.forward_backward(moe_datums()).result().metrics["loss:sum"])
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return losses


def test_training_lowers_the_loss_and_resume_is_bitwise(tiny_qwen3_moe, tmp_path):
    """With LoRA dropout (on the experts' LoRA inputs too), so that the resumed RNG matters."""
    straight = moe_client(tiny_qwen3_moe, tmp_path, targets="all-linear", dropout=0.1)
    losses = train_steps(straight, 4)
    assert losses[-1] < losses[0] - 1.0, losses

    first = moe_client(tiny_qwen3_moe, tmp_path, targets="all-linear", dropout=0.1)
    assert train_steps(first, 2) == losses[:2]
    path = first.save_state("half").result().path
    resumed = create_training_client_from_state(path, with_optimizer=True, device="cpu",
                                                checkpoint_root=tmp_path / "resumed",
                                                mixed_precision="no")
    assert train_steps(resumed, 2) == losses[2:]
    final, again = adapter_parameters(straight.model), adapter_parameters(resumed.model)
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_packing_and_activation_checkpointing_change_nothing(tiny_qwen3_moe, tmp_path):
    client = moe_client(tiny_qwen3_moe, tmp_path, activation_checkpointing=False)
    assert client.packing  # Qwen3-MoE packs datums end to end
    datums = moe_datums()
    together = client.forward(datums).result().loss_fn_outputs
    alone = [client.forward([d]).result().loss_fn_outputs[0] for d in datums]
    for packed, single in zip(together, alone):
        torch.testing.assert_close(packed["logprobs"].to_torch(), single["logprobs"].to_torch())

    def expert_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        client.activation_checkpointing = checkpointing
        client.forward_backward(datums).result()
        grads = {k: p.grad.clone() for k, p in adapter_parameters(client.model).items()}
        client.model.zero_grad(set_to_none=True)
        return grads

    plain, checkpointed = expert_grads(False), expert_grads(True)
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    assert all(plain[k].abs().max() > 0 for k in plain if ".lora_B." in k)


def test_a_kind_of_layer_that_no_target_matches_is_refused():
    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(tiny_moe_config())
    assert resolve_target_modules(moe, "mlp", False) == ["experts"]
    with pytest.raises(ConfigError, match=r"\['gate_proj'\] match no layer"):
        resolve_target_modules(moe, ["gate_proj"], False)
    moe.model.layers[1].mlp.experts.has_bias = True  # a layout ExpertLora does not compute
    with pytest.raises(ConfigError, match="cannot adapt this model's experts: Qwen3MoeExperts "
                                          r"\(has_bias=True"):
        resolve_target_modules(moe, "all-linear", False)
    assert resolve_target_modules(moe, "attention", True) == [
        "k_proj", "o_proj", "q_proj", "v_proj", "lm_head"]

    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ConfigError, match="ask for attention layers, but no attention layer"):
        resolve_target_modules(gpt2, "all-linear", False)  # GPT-2's c_attn is a Conv1D


def test_serve_trains_samples_and_exports_the_expert_layout(tiny_qwen3_moe, tmp_path):
    """Through the real tinker SDK against ``tinkerkit serve``: the per-step losses equal the
    local engine's, sampling works, and ``save_weights_external`` holds Tinker's expert keys."""
    lora = {"rank": RANK, "seed": 0, "train_mlp": True, "train_attn": False,
            "train_unembed": False}
    local = moe_client(tiny_qwen3_moe, tmp_path)
    with running_server(tmp_path / "root") as server, service(server.url) as client:
        training = client.create_lora_training_client(tiny_qwen3_moe, **lora).result()
        remote_losses = []
        for _ in range(2):
            remote_losses.append(training.forward_backward(moe_datums(), "cross_entropy")
                                 .result().metrics["loss:sum"])
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        sampler = training.save_weights_and_get_sampling_client()
        sample = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1,
                                types.SamplingParams(max_tokens=4, temperature=0.0)).result()
        external = training.save_weights_external("export").result().path
        saved = load_file(checkpoint_dir(server.root, external) / "adapter_model.safetensors")
    assert remote_losses == pytest.approx(train_steps(local, 2), rel=1e-6)
    assert len(sample.sequences[0].tokens) == 4
    assert {k: list(v.shape) for k, v in saved.items()} == expected_layout(2)


def test_sampling_merges_the_experts_and_matches_the_unmerged_model(tiny_qwen3_moe, tmp_path):
    client = moe_client(tiny_qwen3_moe, tmp_path, targets="all-linear")
    train_steps(client, 2)
    path = client.save_weights_for_sampler("w").result().path
    prompt = moe_datums()[0].model_input
    unmerged = client.save_weights_and_get_sampling_client().compute_logprobs(prompt).result()
    merged_client = LocalSamplingClient(tiny_qwen3_moe, path, device="cpu")  # merge_lora
    assert not any(isinstance(m, expert_lora.ExpertLora)
                   for m in merged_client._model.modules())  # folded into gate_up / down
    merged = merged_client.compute_logprobs(prompt).result()
    base = LocalSamplingClient(tiny_qwen3_moe, device="cpu").compute_logprobs(prompt).result()
    assert max(abs(a - b) for a, b in zip(unmerged[1:], merged[1:])) < 1e-4
    assert max(abs(a - b) for a, b in zip(unmerged[1:], base[1:])) > 1e-2  # the adapter counts
