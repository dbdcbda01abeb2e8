"""The local sampling client: batched KV-cache generation with Tinker's SamplingParams."""

from __future__ import annotations

import threading

import pytest
from tinker import types

from tinkerkit.engines.local import LocalSamplingClient, LocalTrainingClient
from tinkerkit.engines.local.kernels.packing import PACKED_ATTENTION
from tinkerkit.errors import EngineError

PROMPTS = ["The quick brown fox", "Hello", "Two plus two is four, and three plus three is", "Why?"]


@pytest.fixture(scope="module")
def sampler(tiny_model) -> LocalSamplingClient:
    return LocalSamplingClient(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def prompts(sampler) -> list[types.ModelInput]:
    tokenizer = sampler.get_tokenizer()
    return [types.ModelInput.from_ints(tokenizer.encode(p)) for p in PROMPTS]


def greedy(max_tokens: int, stop=None) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)


def test_greedy_is_deterministic_and_logprobs_are_the_models(sampler, prompts):
    prompt = prompts[0]
    first = sampler.sample(prompt, 2, greedy(12, stop=[])).result()
    again = sampler.sample(prompt, 1, greedy(12, stop=[])).result()
    tokens = first.sequences[0].tokens
    assert tokens == first.sequences[1].tokens == again.sequences[0].tokens
    assert len(tokens) == 12 and len(set(tokens)) > 3
    # The reported logprobs are those of the sampled tokens under the model: compare with the
    # prompt log-probabilities of prompt + completion, computed by an independent forward pass.
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(prompt.to_ints() + tokens))
    expected = scored.result()[prompt.length:]
    assert first.sequences[0].logprobs == pytest.approx(expected, abs=1e-4)


def test_max_tokens_gives_length(sampler, prompts):
    result = sampler.sample(prompts[1], 1, greedy(5, stop=[])).result()
    assert result.sequences[0].stop_reason == "length"
    assert len(result.sequences[0].tokens) == 5


def test_stop_token_and_stop_string(sampler, prompts):
    tokenizer = sampler.get_tokenizer()
    free = sampler.sample(prompts[0], 1, greedy(12, stop=[])).result().sequences[0].tokens
    by_id = sampler.sample(prompts[0], 1, greedy(12, stop=[free[4]])).result().sequences[0]
    assert by_id.stop_reason == "stop"
    assert by_id.tokens == free[:free.index(free[4]) + 1]  # the stop token is kept

    stop_text = tokenizer.decode(free[5:7])
    cut = next(i for i in range(len(free)) if stop_text in tokenizer.decode(free[:i + 1]))
    by_text = sampler.sample(prompts[0], 1, greedy(12, stop=stop_text)).result().sequences[0]
    assert by_text.stop_reason == "stop"
    assert by_text.tokens == free[:cut + 1]
    assert tokenizer.decode(by_text.tokens).endswith(stop_text)


def test_default_stop_tokens_include_im_end(sampler):
    vocab = sampler.get_tokenizer().get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= sampler._default_stop


def test_seeded_sampling_is_reproducible(sampler, prompts):
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=42, stop=[])
    a = sampler.sample(prompts[0], 3, params).result()
    b = sampler.sample(prompts[0], 3, params).result()
    c = sampler.sample(prompts[0], 3, params.model_copy(update={"seed": 43})).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) == 3  # samples of one request differ


def test_top_k_one_and_tiny_top_p_are_greedy(sampler, prompts):
    expected = sampler.sample(prompts[2], 1, greedy(6, stop=[])).result().sequences[0].tokens
    for update in ({"top_k": 1}, {"top_p": 1e-6}):
        params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=0, stop=[], **update)
        assert sampler.sample(prompts[2], 1, params).result().sequences[0].tokens == expected


def test_batched_greedy_equals_one_at_a_time(sampler, prompts):
    max_tokens = [3, 8, 5, 8]  # rows finish at different steps and leave the batch
    alone = [sampler.sample(p, 1, greedy(n, stop=[])).result().sequences[0]
             for p, n in zip(prompts, max_tokens)]

    prefills = []
    hook = sampler._model.register_forward_hook(
        lambda module, args, kwargs, out: prefills.append(kwargs["input_ids"].shape)
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    gate = threading.Event()
    sampler._worker.submit(gate.wait)  # hold the worker so that all requests queue up
    futures = [sampler.sample(p, 1, greedy(n, stop=[])) for p, n in zip(prompts, max_tokens)]
    gate.set()
    together = [f.result().sequences[0] for f in futures]
    hook.remove()

    assert len(prefills) == 1 and prefills[0][0] == len(prompts)  # one batched prefill
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens and a.stop_reason == b.stop_reason == "length"
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_compute_logprobs_matches_training_forward(tiny_model, sampler, prompts):
    tokens = prompts[2].to_ints()
    logprobs = sampler.compute_logprobs(prompts[2]).result()
    assert logprobs[0] is None and len(logprobs) == len(tokens)

    trainer = LocalTrainingClient(tiny_model, rank=4, device="cpu")  # LoRA B = 0: the base model
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:]})
    forward = trainer.forward([datum]).result().loss_fn_outputs[0]["logprobs"].tolist()
    assert logprobs[1:] == pytest.approx(forward, abs=1e-5)

    response = sampler.sample(prompts[2], 1, greedy(1), include_prompt_logprobs=True,
                              topk_prompt_logprobs=3).result()
    assert response.prompt_logprobs == pytest.approx(logprobs, abs=1e-6)
    top = response.topk_prompt_logprobs
    assert top[0] is None and len(top[1]) == 3
    assert top[1][0][1] >= top[1][1][1] >= top[1][2][1] >= logprobs[1] - 1e-6


def test_training_snapshots_and_saved_adapters_sample_alike(tiny_model, prompts, tmp_path):
    trainer = LocalTrainingClient(tiny_model, rank=4, device="cpu", checkpoint_root=tmp_path)
    tokens = prompts[0].to_ints()
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:]})
    trainer.forward_backward([datum])
    trainer.optim_step(types.AdamParams(learning_rate=5e-2))
    snapshot = trainer.save_weights_and_get_sampling_client()
    before = snapshot.compute_logprobs(prompts[0]).result()
    path = trainer.save_weights_for_sampler("s1").result().path

    trainer.forward_backward([datum])
    trainer.optim_step(types.AdamParams(learning_rate=5e-2))  # training on: snapshot unchanged
    assert snapshot.compute_logprobs(prompts[0]).result() == before
    from_path = trainer.create_sampling_client(path).compute_logprobs(prompts[0]).result()
    fresh = LocalSamplingClient(tiny_model, path, device="cpu").compute_logprobs(prompts[0])
    assert from_path[1:] == pytest.approx(before[1:], abs=1e-6)
    # a fresh client merges the adapter into the weights: the same function up to float32 rounding
    assert fresh.result()[1:] == pytest.approx(before[1:], abs=1e-5)
    base = LocalSamplingClient(tiny_model, device="cpu").compute_logprobs(prompts[0]).result()
    assert base[1:] != pytest.approx(before[1:], abs=1e-3)  # the adapter changed the model

    # The snapshot keeps the training model's packed attention (tinkerkit.engines.local.kernels.packing); in a
    # left-padded batch with an attention mask it is transformers' SDPA attention unchanged.
    assert snapshot._model.config._attn_implementation == PACKED_ATTENTION
    fresh_sampler = LocalSamplingClient(tiny_model, path, device="cpu")
    assert fresh_sampler._model.config._attn_implementation == "sdpa"
    gate = threading.Event()
    snapshot._worker.submit(gate.wait)  # hold the worker: the four prompts become one batch
    pending = [snapshot.sample(p, 1, greedy(8, stop=[])) for p in prompts]
    gate.set()
    batched = [f.result().sequences[0].tokens for f in pending]
    alone = [fresh_sampler.sample(p, 1, greedy(8, stop=[])).result().sequences[0].tokens
             for p in prompts]
    assert batched == alone


def test_bad_requests_raise_engine_error(sampler, prompts):
    with pytest.raises(EngineError, match="prompt is empty"):
        sampler.sample(types.ModelInput.from_ints([]), 1, greedy(3))
    with pytest.raises(EngineError, match="temperature"):
        sampler.sample(prompts[0], 1, types.SamplingParams(temperature=-1.0))
    # the rule of config and evaluation (tinkerkit.sampling_rules): top_k 0 is no setting
    with pytest.raises(EngineError) as error:
        sampler.sample(prompts[0], 1, types.SamplingParams(temperature=1.0, top_k=0))
    assert str(error.value) == "SamplingParams: top_k = 0: must be -1 (off) or at least 1"
    with pytest.raises(EngineError, match="outside"):
        sampler.compute_logprobs(types.ModelInput.from_ints([1, 10**6]))



def test_prompts_past_the_models_positions_are_refused_and_max_tokens_is_capped(sampler):
    """The tiny model has 512 positions (max_position_embeddings): a prompt must leave one to
    sample into, a scored prompt may fill them all; a sample that would run past the last one
    ends there with stop_reason "length" (as when max_tokens is reached)."""
    with pytest.raises(EngineError) as info:
        sampler.sample(types.ModelInput.from_ints([17] * 512), 1, greedy(3))
    assert str(info.value) == ("prompt of 512 tokens is too long: the model has 512 positions "
                               "(max_position_embeddings), so it takes at most 511 to sample from")
    with pytest.raises(EngineError) as info:
        sampler.compute_logprobs(types.ModelInput.from_ints([17] * 513))
    assert str(info.value) == ("prompt of 513 tokens is too long: the model has 512 positions "
                               "(max_position_embeddings), so it takes at most 512 to score")
    assert len(sampler.compute_logprobs(types.ModelInput.from_ints([17] * 512)).result()) == 512
    capped = sampler.sample(types.ModelInput.from_ints([17] * 509), 2, greedy(10, stop=[]))
    assert [(len(s.tokens), s.stop_reason) for s in capped.result().sequences] == [
        (3, "length"), (3, "length")]

@pytest.mark.slow
def test_real_smollm2_answers_and_stops_at_im_end():
    sampler = LocalSamplingClient("smollm2-135m-instruct", device="cpu")
    tokenizer = sampler.get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3? Answer briefly."}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    result = sampler.sample(types.ModelInput.from_ints(list(prompt)), 1, greedy(40)).result()
    sequence = result.sequences[0]
    assert sequence.stop_reason == "stop"
    assert sequence.tokens[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "5" in tokenizer.decode(sequence.tokens)


def test_a_merged_output_projection_adapter_leaves_the_tied_input_embedding_alone(tiny_model,
                                                                                 prompts, tmp_path):
    """LoRA on a tied lm_head (train_unembed): the sampler that merges the adapter into freshly
    loaded weights gives the log-probabilities of the unmerged adapter; merging into the shared
    matrix would change the input embedding as well."""
    import torch

    client = LocalTrainingClient(tiny_model, 4, train_unembed=True, seed=1, device="cpu",
                                 checkpoint_root=tmp_path)
    with torch.no_grad():  # a delta large enough to matter on every logit
        for name, param in client.model.named_parameters():
            if "lm_head.lora_B" in name:  # random rows: a uniform shift would cancel out
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    path = client.save_weights_for_sampler("head").result().path
    unmerged = client.sampling_snapshot().result()
    merged = LocalSamplingClient(tiny_model, path, device="cpu")
    prompt = prompts[2]
    expected = unmerged.compute_logprobs(prompt).result()
    got = merged.compute_logprobs(prompt).result()
    assert max(abs(a - b) for a, b in zip(expected[1:], got[1:])) < 1e-4
    base = LocalSamplingClient(tiny_model, device="cpu").compute_logprobs(prompt).result()
    assert max(abs(a - b) for a, b in zip(base[1:], got[1:])) > 0.1  # the adapter does matter
    client.close()


def test_a_fixed_cpu_threads_setting_reaches_the_samplers(tiny_model, tmp_path):
    import torch

    from tinkerkit.config import build_config
    from tinkerkit.engines import create_sampling_client

    before = torch.get_num_threads()
    config = build_config({"base_model": str(tiny_model), "device": "cpu", "cpu_threads": 1})
    sampler = create_sampling_client(config)  # `tinkerkit eval`'s sampler
    trainer = LocalTrainingClient(str(tiny_model), rank=2, device="cpu", cpu_threads=1,
                                  checkpoint_root=tmp_path)
    snapshot = trainer.save_weights_and_get_sampling_client("s")  # sampling during training
    seen = []
    for client in (sampler, snapshot):
        with client._cpu_share.measure() as count:
            seen.append((count, torch.get_num_threads()))
    torch.set_num_threads(before)
    trainer.close()
    assert seen == [(1, 1), (1, 1)]
