"""The local training engine against independent computations on a tiny random Llama."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tinker import types

from helpers import VOCAB, seeded_lora_client
from tinkerkit.engines.local import (
    LocalTrainingClient,
    batching,
    create_training_client_from_state,
    training,
)
from tinkerkit.engines.local.batching import (
    MICROBATCH_OVERHEAD_TOKENS,
    Example,
    MicroBatch,
    plan_packs,
    plan_padded,
)
from tinkerkit.engines.local.kernels.logprobs import token_logprobs
from tinkerkit.engines.local.model import adapter_parameters, causal_lm
from tinkerkit.errors import CheckpointError, EngineError
from tinkerkit.models import load_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Two plus two is four.",
         "Hello!",
         "A longer sentence, so that micro-batches and padding really differ in length here."]


@pytest.fixture(scope="module")
def token_lists(tiny_model) -> list[list[int]]:
    tokenizer = load_tokenizer(tiny_model)
    return [tokenizer.encode(text) for text in TEXTS]


def make_datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    """Next-token datum: input tokens[:-1], targets tokens[1:]."""
    weights = weights if weights is not None else [1.0] * (len(tokens) - 1)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def make_client(tiny_model, tmp_path, **kwargs) -> LocalTrainingClient:
    """A CPU client whose LoRA B matrices are non-zero (seeded), so LoRA changes the outputs."""
    return seeded_lora_client(tiny_model, tmp_path, **kwargs)


def grads(client) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in adapter_parameters(client.model).items()}


def weights_of(client) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in adapter_parameters(client.model).items()}


def assert_grads_close(got: dict, expected: dict, rel: float = 1e-4) -> None:
    """Equal up to float32 summation order: max |diff| <= rel * max |expected| per tensor."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert (got[key] - value).abs().max() <= rel * value.abs().max(), key


def naive_logprobs(model, datum: types.Datum) -> torch.Tensor:
    """Full-logits reference: log_softmax(model(tokens).logits) gathered at the targets."""
    tokens = torch.tensor([datum.model_input.to_ints()])
    targets = datum.loss_fn_inputs["target_tokens"].to_torch()
    logits = model(input_ids=tokens).logits[0].float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def test_loss_logprobs_and_gradients_match_full_logits(tiny_model, token_lists, tmp_path):
    client = make_client(tiny_model, tmp_path, train_unembed=True)
    weights = [[float(i % 3) for i in range(len(t) - 1)] for t in token_lists]  # 0, 1, 2, ...
    data = [make_datum(t, w) for t, w in zip(token_lists, weights)]
    out = client.forward_backward(data, "cross_entropy").result()
    engine_grads = grads(client)

    client.model.zero_grad(set_to_none=True)
    reference_loss = 0.0
    for i, datum in enumerate(data):
        logprobs = naive_logprobs(client.model, datum)
        w = datum.loss_fn_inputs["weights"].to_torch()
        loss = -(w * logprobs).sum()
        loss.backward()
        reference_loss += loss.item()
        got = out.loss_fn_outputs[i]["logprobs"].to_torch()
        assert got.dtype == torch.float32 and got.shape == logprobs.shape
        torch.testing.assert_close(got, logprobs.detach(), rtol=0, atol=2e-5)
    assert out.metrics["loss:sum"] == pytest.approx(reference_loss, rel=1e-5)
    assert reference_loss > 100  # real values: about ln(49152) ~ 10.8 nats per weighted token
    assert_grads_close(engine_grads, grads(client))
    assert any(".lm_head.lora_" in key for key in engine_grads)


def test_chunked_projection_equals_full_logits_in_values_and_gradients(tiny_model, tmp_path):
    client = make_client(tiny_model, tmp_path, train_unembed=True)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(tokens, -1, dims=1)
    chunked = token_logprobs(client.model, tokens, targets, chunk=4)  # 22 positions, 6 chunks
    chunked.sum().backward()
    chunked_grads = grads(client)
    client.model.zero_grad(set_to_none=True)
    full = client.model(input_ids=tokens).logits.float().log_softmax(-1)
    full = full.gather(-1, targets[..., None]).squeeze(-1)
    full.sum().backward()
    torch.testing.assert_close(chunked, full, rtol=0, atol=2e-5)
    assert_grads_close(chunked_grads, grads(client))


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("budget", [40, 8192])  # several micro-batches, one
def test_packing_padding_and_microbatches_change_nothing(tiny_model, token_lists, tmp_path,
                                                         packing, budget):
    data = [make_datum(t) for t in token_lists]
    batched = make_client(tiny_model, tmp_path, microbatch_tokens=budget)
    assert batched.packing  # a Llama on SDPA attention packs
    batched.packing = packing  # False: the right-padded micro-batches of models that cannot pack
    together = batched.forward_backward(data).result()
    single = make_client(tiny_model, tmp_path)
    alone = [single.forward_backward([d]).result() for d in data]  # one at a time, accumulated
    for i, result in enumerate(alone):
        torch.testing.assert_close(together.loss_fn_outputs[i]["logprobs"].to_torch(),
                                   result.loss_fn_outputs[0]["logprobs"].to_torch(),
                                   rtol=0, atol=1e-5)
    assert together.metrics["loss:sum"] == pytest.approx(
        sum(r.metrics["loss:sum"] for r in alone), rel=1e-6)
    assert_grads_close(grads(batched), grads(single))


def test_packs_fill_up_to_the_budget_in_order():
    def cut(lengths: list[int], budget: int) -> list[list[int]]:
        examples = [Example(i, torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64),
                             {"weights": torch.ones(n)}) for i, n in enumerate(lengths)]
        return [[e.index for e in pack] for pack in plan_packs(examples, budget)]

    assert cut([109, 233, 159, 215], 8192) == [[0, 1, 2, 3]]  # a GSM8K batch: one pass of 716
    assert cut([300, 10, 290, 95, 100], 400) == [[0, 1], [2, 3], [4]]
    assert cut([100] * 4, 200) == [[0, 1], [2, 3]]  # exactly the budget fits
    assert cut([50, 500, 50], 400) == [[0], [1], [2]]  # a datum over the budget runs alone


def test_packed_micro_batch_inputs():
    examples = [Example(i, torch.arange(n) + 10 * i, torch.arange(n) + 1,
                        {"weights": torch.full((n,), 0.5)})
                for i, n in enumerate([3, 1, 2])]
    batch = MicroBatch.packed(examples)
    assert batch.tokens.tolist() == [[0, 1, 2, 10, 20, 21]]
    assert batch.targets.tolist() == [[1, 2, 3, 1, 1, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]  # each datum from position 0
    assert batch.segments == [3, 1, 2] and batch.valid.all()
    assert [(e.index, row, start) for e, row, start in batch.places] == [(0, 0, 0), (1, 0, 3),
                                                                         (2, 0, 4)]
    padded = MicroBatch.padded(examples)
    assert padded.tokens.tolist() == [[0, 1, 2], [10, 0, 0], [20, 21, 0]]
    assert padded.valid.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    assert padded.position_ids is None and padded.segments is None


def test_models_with_sliding_windows_or_eager_attention_do_not_pack(tmp_path):
    from tinkerkit.engines.local.kernels.packing import packed_sdpa_attention, supports_packing

    def tiny(config_class, **extra):
        config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              **extra)
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    assert supports_packing(tiny(transformers.LlamaConfig))
    assert supports_packing(tiny(transformers.Qwen3Config))  # sliding window configured, unused
    assert not supports_packing(tiny(transformers.MistralConfig, sliding_window=16))
    assert not supports_packing(tiny(transformers.Qwen3Config, use_sliding_window=True,
                                     sliding_window=16, max_window_layers=1))
    eager = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4),
        attn_implementation="eager")
    assert not supports_packing(eager)
    query = torch.zeros(1, 4, 6, 8)
    with pytest.raises(EngineError, match="sliding_window=16; this model needs padded"):
        packed_sdpa_attention(torch.nn.Module(), query, query, query, None,
                              sliding_window=16, tinkerkit_segments=[3, 3])


def test_microbatches_trade_padding_against_passes():
    def cut(lengths: list[int], budget: int = 8192) -> list[list[int]]:
        examples = [Example(i, torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64),
                             {"weights": torch.ones(n)}) for i, n in enumerate(lengths)]
        return [[e.index for e in batch] for batch in plan_padded(examples, budget)]

    assert MICROBATCH_OVERHEAD_TOKENS == 64
    # A GSM8K batch: 4 * 233 = 932 padded tokens in one pass, 2 * 233 + 2 * 159 = 784 in two.
    assert cut([109, 233, 159, 215]) == [[1, 3], [2, 0]]
    assert cut([100] * 5) == [[0, 1, 2, 3, 4]]  # no padding: one pass
    assert cut([300, 10, 290, 95, 100]) == [[0, 2], [4, 3], [1]]
    assert cut([50, 30, 30, 30]) == [[0, 1, 2, 3]]  # 60 padded tokens cost less than a pass
    assert cut([50, 20, 20, 20]) == [[0], [1, 2, 3]]  # 90 padded tokens cost more
    assert cut([100] * 5, budget=250) == [[0, 1], [2, 3], [4]]  # the budget caps a pass
    assert cut([400, 300], budget=250) == [[0], [1]]  # a datum over the budget runs alone


def test_gradients_accumulate_until_optim_step(tiny_model, token_lists, tmp_path):
    adam = types.AdamParams(learning_rate=1e-2)
    data = [make_datum(t) for t in token_lists[:2]]
    split = make_client(tiny_model, tmp_path)
    split.forward_backward(data[:1])
    split.forward_backward(data[1:])  # submitted before the first result is awaited
    split.optim_step(adam).result()
    joint = make_client(tiny_model, tmp_path)
    joint.forward_backward(data)
    joint.optim_step(adam).result()
    for key, value in weights_of(joint).items():
        torch.testing.assert_close(weights_of(split)[key], value, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in adapter_parameters(joint.model).values())


def test_optim_step_is_clipped_adamw_with_decoupled_weight_decay(tiny_model, token_lists, tmp_path):
    client = make_client(tiny_model, tmp_path)
    client.forward_backward([make_datum(token_lists[0])]).result()
    g, before = grads(client), weights_of(client)
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))
    lr, b1, b2, eps, wd, clip = 1e-2, 0.9, 0.95, 1e-8, 0.1, norm / 4
    response = client.optim_step(types.AdamParams(learning_rate=lr, beta1=b1, beta2=b2, eps=eps,
                                                  weight_decay=wd, grad_clip_norm=clip)).result()
    assert response.metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
    scale = clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_
    for key, p in before.items():
        grad = g[key] * scale
        m_hat = (1 - b1) * grad / (1 - b1)  # first AdamW step, bias-corrected moments
        v_hat = (1 - b2) * grad**2 / (1 - b2)
        expected = p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(weights_of(client)[key], expected, rtol=1e-5, atol=1e-6)


def test_resume_with_optimizer_is_bitwise_exact(tiny_model, token_lists, tmp_path):
    adam = types.AdamParams(learning_rate=1e-2, weight_decay=0.01)
    data = [make_datum(t) for t in token_lists]
    first = make_client(tiny_model, tmp_path, dropout=0.1)  # dropout exercises the saved RNG
    for datum in data[:2]:
        first.forward_backward([datum])
        first.optim_step(adam)
    path = first.save_state("step2").result().path
    losses = []
    for datum in data[2:]:
        losses.append(first.forward_backward([datum]).result().metrics["loss:sum"])
        first.optim_step(adam).result()

    resumed = create_training_client_from_state(path, with_optimizer=True, device="cpu",
                                                checkpoint_root=tmp_path / "ckpt2")
    assert (resumed.rank, resumed.alpha, resumed.dropout) == (4, 4.0, 0.1)
    for datum, loss in zip(data[2:], losses):
        assert resumed.forward_backward([datum]).result().metrics["loss:sum"] == loss
        assert resumed.optim_step(adam).result().metrics["step"] in (3.0, 4.0)
    for key, value in weights_of(first).items():
        assert torch.equal(weights_of(resumed)[key], value), key


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_resumed_optimizer_state_is_the_uninterrupted_one(tiny_model, token_lists, tmp_path,
                                                          device):
    """Restored AdamW state equals the state the optimizer built itself, tensor by tensor.

    Fused AdamW keeps ``step`` on the parameter's device; a CPU ``step`` beside CUDA
    parameters makes its next step fail ("Expected all tensors to be on the same device").
    """
    adam = types.AdamParams(learning_rate=1e-2)
    data = [make_datum(t) for t in token_lists]
    first = make_client(tiny_model, tmp_path, device=device)
    first.forward_backward([data[0]])
    first.optim_step(adam)
    path = first.save_state("one").result().path
    resumed = create_training_client_from_state(path, with_optimizer=True, device=device,
                                                checkpoint_root=tmp_path / "ckpt2")
    expected, got = first._optimizer.state_dict(), resumed._optimizer.state_dict()
    # (the group's hyperparameters are set from AdamParams at every step, so they are not compared)
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in
                                                          expected["param_groups"]]
    assert list(got["state"]) == list(range(len(first._params))) == list(expected["state"])
    for index, state in expected["state"].items():
        assert got["state"][index].keys() == state.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in state.items():
            restored = got["state"][index][name]
            assert (restored.device, restored.dtype) == (value.device, value.dtype), name
            assert torch.equal(restored, value), (index, name)
    for client in (first, resumed):
        client.forward_backward([data[1]])
        assert client.optim_step(adam).result().metrics["step"] == 2.0
    for key, value in weights_of(first).items():
        assert torch.equal(weights_of(resumed)[key], value), key


def test_load_state_restores_weights_and_restarts_optimizer(tiny_model, token_lists, tmp_path):
    client = make_client(tiny_model, tmp_path)
    client.forward_backward([make_datum(token_lists[0])])
    client.optim_step(types.AdamParams(learning_rate=1e-2))
    path = client.save_state("one").result().path
    fresh = LocalTrainingClient(tiny_model, rank=4, device="cpu", checkpoint_root=tmp_path)
    assert fresh.load_state(path).result().path == path
    for key, value in weights_of(client).items():
        assert torch.equal(weights_of(fresh)[key], value)
    fresh.forward_backward([make_datum(token_lists[1])])
    assert fresh.optim_step(types.AdamParams()).result().metrics["step"] == 1.0


def test_checkpoint_files_load_in_peft_without_warnings(tiny_model, token_lists, tmp_path):
    from peft import PeftModel

    client = make_client(tiny_model, tmp_path, target_modules="attention", train_unembed=True)
    client.forward_backward([make_datum(token_lists[0])])
    client.optim_step(types.AdamParams(learning_rate=1e-2))
    path = client.save_state("peft").result().path

    meta = json.loads((tmp_path / "ckpt" / "peft" / "tinkerkit_state.json").read_text())
    assert meta["kind"] == "state" and meta["format"] == 1 and meta["optimizer_step"] == 1
    assert meta["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert meta["base_model"] == tiny_model and meta["train_unembed"] is True
    adapter_keys = set(load_file(f"{path}/adapter_model.safetensors"))
    assert len(adapter_keys) == 2 * (4 * 2 + 1)  # A and B of q/k/v/o in 2 layers, plus lm_head
    assert set(load_file(f"{path}/optimizer.safetensors")) == {
        f"{k}.{m}" for k in adapter_keys for m in ("exp_avg", "exp_avg_sq")}

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, path).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()]
    tokens = torch.tensor([token_lists[0]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=tokens).logits,
                                   client.model.eval()(input_ids=tokens).logits)


def test_bad_checkpoints_raise_checkpoint_error(tiny_model, token_lists, tmp_path):
    client = make_client(tiny_model, tmp_path)
    path = client.save_state("good").result().path
    sampler_path = client.save_weights_for_sampler("good").result().path
    assert sampler_path != path
    with pytest.raises(CheckpointError, match="rank=4"):
        LocalTrainingClient(tiny_model, rank=8, device="cpu").load_state(path).result()
    with pytest.raises(CheckpointError, match="not a directory"):
        client.load_state(str(tmp_path / "nope")).result()
    with pytest.raises(CheckpointError, match="no optimizer state"):
        client.load_state_with_optimizer(sampler_path).result()
    weights = tmp_path / "ckpt" / "good" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is corrupted"):
        client.load_state(path).result()


def test_bad_requests_raise_engine_error_naming_the_datum(tiny_model, token_lists, tmp_path):
    client = make_client(tiny_model, tmp_path)
    good = make_datum(token_lists[0])
    with pytest.raises(EngineError, match="'gspo' is not supported .*supported: cross_entropy, "
                                          "importance_sampling, ppo, cispo, dro"):
        client.forward_backward([good], "gspo")
    short = types.Datum(model_input=good.model_input,
                        loss_fn_inputs={"target_tokens": token_lists[0][1:], "weights": [1.0]})
    with pytest.raises(EngineError, match=r"datum 1: loss_fn_inputs\['weights'\] has shape"):
        client.forward_backward([good, short])
    with pytest.raises(EngineError, match="datum 0: target_tokens holds a token id outside"):
        client.forward_backward([make_datum([5, VOCAB + 1])])
    with pytest.raises(EngineError, match="non-finite"):
        client.forward_backward([make_datum([5, 6, 7], [1.0, math.nan])])
    with pytest.raises(EngineError, match="learning_rate"):
        client.optim_step(types.AdamParams(learning_rate=-1.0))


def test_seed_fixes_lora_init_and_targets_resolve(tiny_model, tmp_path):
    def lora_a(client):
        return {k: v for k, v in weights_of(client).items() if ".lora_A." in k}

    a = LocalTrainingClient(tiny_model, rank=4, seed=7, device="cpu", target_modules="mlp")
    b = LocalTrainingClient(tiny_model, rank=4, seed=7, device="cpu", target_modules="mlp")
    c = LocalTrainingClient(tiny_model, rank=4, seed=8, device="cpu", target_modules="mlp")
    assert a.target_modules == ["down_proj", "gate_proj", "up_proj"]
    assert all(torch.equal(v, lora_a(b)[k]) for k, v in lora_a(a).items())
    assert not any(torch.equal(v, lora_a(c)[k]) for k, v in lora_a(a).items())
    assert a.get_info().lora_rank == 4 and a.alpha == 4.0
    with pytest.raises(EngineError, match="not linear layers"):
        LocalTrainingClient(tiny_model, rank=4, device="cpu", target_modules=["c_attn"])


# ------------------------------------------------------------------ long sequences (issue 6)
# A 2-layer Qwen3 with the real 151,936-entry vocabulary: the chunked projection runs over many
# chunks (220 positions each) with the sizes that matter for long-text training.


@pytest.fixture(scope="module")
def qwen_datums(tiny_qwen3) -> list[types.Datum]:
    """Real Qwen tokens; weights 0 on the first third, then 1 and 2 (a prompt and an answer)."""
    tokenizer = load_tokenizer(tiny_qwen3)
    text = " ".join(TEXTS) * 12
    data = []
    for length in (300, 171):  # two micro-batch rows of different lengths; 300 > one chunk
        tokens = tokenizer.encode(text)[:length + 1]
        weights = [0.0 if i < length // 3 else float(1 + i % 2) for i in range(length)]
        data.append(make_datum(tokens, weights))
    return data


def naive_loss_and_grads(client, data) -> tuple[float, list[torch.Tensor], dict]:
    """Full-logits reference of cross_entropy: loss sum, per-datum logprobs and LoRA grads."""
    client.model.zero_grad(set_to_none=True)
    total, logprobs = 0.0, []
    for datum in data:
        lp = naive_logprobs(client.model, datum)
        loss = -(datum.loss_fn_inputs["weights"].to_torch() * lp).sum()
        loss.backward()
        total += loss.item()
        logprobs.append(lp.detach())
    return total, logprobs, grads(client)


@pytest.mark.parametrize("train_unembed", [False, True], ids=["frozen-head", "lora-head"])
def test_chunked_loss_equals_full_logits_on_the_qwen_vocabulary(tiny_qwen3, qwen_datums,
                                                                 tmp_path, train_unembed):
    client = make_client(tiny_qwen3, tmp_path, train_unembed=train_unembed)
    out = client.forward_backward(qwen_datums).result()
    engine_grads = grads(client)
    loss, logprobs, reference_grads = naive_loss_and_grads(client, qwen_datums)
    assert out.metrics["loss:sum"] == pytest.approx(loss, rel=1e-5)
    assert loss > 3000  # 440 weighted positions, weights 1 and 2, ~12 nats each
    for i, lp in enumerate(logprobs):  # weight-0 positions come back too, exactly
        torch.testing.assert_close(out.loss_fn_outputs[i]["logprobs"].to_torch(), lp,
                                   rtol=0, atol=5e-5)
    assert_grads_close(engine_grads, reference_grads)
    assert any(".lm_head." in k for k in engine_grads) == train_unembed


def test_only_weighted_positions_are_projected_under_autograd(tiny_qwen3, tmp_path):
    client = make_client(tiny_qwen3, tmp_path)
    tokens = torch.randint(0, 151936, (2, 260), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros(2, 260, dtype=torch.bool)
    mask[0, 10:240] = mask[1, 200:] = True  # row 0 spans two chunks of 220 positions
    logprobs = token_logprobs(client.model, tokens, targets, grad_mask=mask)
    logprobs.sum().backward()  # positions outside the mask add nothing to the gradient
    masked_grads = grads(client)
    client.model.zero_grad(set_to_none=True)
    full = client.model(input_ids=tokens).logits.float().log_softmax(-1)
    full = full.gather(-1, targets[..., None]).squeeze(-1)
    full[mask].sum().backward()
    torch.testing.assert_close(logprobs, full, rtol=0, atol=5e-5)
    assert_grads_close(masked_grads, grads(client))


def test_activation_checkpointing_changes_nothing_but_recomputes(tiny_qwen3, qwen_datums,
                                                                 tmp_path, monkeypatch):

    results = {}
    for setting in (False, True, "auto"):
        client = make_client(tiny_qwen3, tmp_path, activation_checkpointing=setting, dropout=0.1)
        calls: list[str] = []
        for layer in causal_lm(client.model).model.layers:
            layer.self_attn.register_forward_pre_hook(lambda module, args, seen=calls:
                                                      seen.append(module))
        monkeypatch.setattr(training, "ACTIVATION_CHECKPOINTING_MIN_TOKENS", 300)
        monkeypatch.setattr(batching, "MICROBATCH_OVERHEAD_TOKENS", 10**6)  # both datums in one micro-batch
        out = client.forward_backward(qwen_datums).result()  # one micro-batch of 471 tokens
        results[setting] = (out.metrics["loss:sum"], grads(client), len(calls))
        client.forward_backward(qwen_datums[1:]).result()  # 171 tokens: auto turns it off
        assert causal_lm(client.model).is_activation_checkpointing == (setting is True)
    loss, reference_grads, calls = results[False]
    assert calls == 2  # one forward per layer; checkpointing recomputes each layer once more
    for setting in (True, "auto"):
        assert results[setting][0] == pytest.approx(loss, rel=1e-6)  # dropout masks replayed
        assert_grads_close(results[setting][1], reference_grads, rel=1e-5)
        assert results[setting][2] == 4


def test_attention_is_sdpa_causal_without_a_mask(tiny_qwen3, qwen_datums, tmp_path, monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        seen.append((attn_mask is None, is_causal, query.shape[-2]))
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, **kwargs)

    client = make_client(tiny_qwen3, tmp_path)  # (its layer checks call attention too)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(batching, "MICROBATCH_OVERHEAD_TOKENS", 10**6)  # both datums in one micro-batch
    client.forward_backward(qwen_datums).result()  # one packed row of 300 + 171 tokens
    # 2 layers, each datum on its own: no [T, T] mask, the causal kernel
    assert seen == [(True, True, 300), (True, True, 171)] * 2
    seen.clear()
    client.packing = False
    client.forward_backward(qwen_datums).result()  # padded rows
    assert seen == [(True, True, 300)] * 2


def test_bf16_mixed_precision_is_close_to_float32(tiny_qwen3, qwen_datums, tmp_path):
    assert not make_client(tiny_qwen3, tmp_path).autocast  # auto: float32 on the CPU
    full = make_client(tiny_qwen3, tmp_path, mixed_precision="no")
    half = make_client(tiny_qwen3, tmp_path, mixed_precision="bf16")
    loss = full.forward_backward(qwen_datums).result().metrics["loss:sum"]
    bf16_loss = half.forward_backward(qwen_datums).result().metrics["loss:sum"]
    assert bf16_loss != loss and bf16_loss == pytest.approx(loss, rel=2e-2)
    assert all(p.grad.dtype == torch.float32 for p in adapter_parameters(half.model).values())
    with pytest.raises(EngineError, match="mixed_precision 'fp8'"):
        make_client(tiny_qwen3, tmp_path, mixed_precision="fp8")
