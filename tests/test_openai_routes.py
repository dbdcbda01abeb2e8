"""The OpenAI-compatible routes of ``tinkerkit serve``, driven by the ``openai`` package.

A server in a thread serves a tiny random Llama (SmolLM2 tokenizer and chat template) and one
checkpoint trained on it through the tinker SDK; every answer is compared with the local sampler
run in process on the same prompt tokens.
"""

from __future__ import annotations

import threading

import httpx
import numpy as np
import openai
import pytest
from tinker import types

from helpers import KEY, checkpoint_dir, running_server, service
from tinkerkit.data.conversation import Message
from tinkerkit.engines.local import LocalSamplingClient
from tinkerkit.render import Renderer

OTHER_KEY = "tml-someone-else"
QUESTION = "What is 12 plus 30?"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """The server, with one sampler checkpoint of KEY's (``server.checkpoint``)."""
    with running_server(tmp_path_factory.mktemp("openai-root")) as running:
        with service(running.url) as client:
            training = client.create_lora_training_client(tiny_model, rank=4, seed=3)
            datum = types.Datum(model_input=types.ModelInput.from_ints([1, 17, 305, 4431, 9]),
                                loss_fn_inputs={"target_tokens": [17, 305, 4431, 9, 28],
                                                "weights": [0, 1, 1, 1, 1]})
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=0.05)).result()
            running.checkpoint = training.save_weights_for_sampler("chat").result().path
        yield running


def client_of(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def local(server, tiny_model):
    """Local samplers of the base model and of the checkpoint (the server's own reference)."""
    base = LocalSamplingClient(tiny_model)
    tuned = LocalSamplingClient(tiny_model, str(checkpoint_dir(server.root, server.checkpoint)))
    yield {"base": base, "tuned": tuned}
    base.close()
    tuned.close()


def chat_prompt(client: LocalSamplingClient, text: str = QUESTION) -> types.ModelInput:
    return Renderer(client.get_tokenizer()).chat_prompt([Message(role="user", content=text)])


def local_sample(client, prompt, **params) -> types.SampleResponse:
    num_samples = params.pop("n", 1)
    return client.sample(prompt, num_samples, types.SamplingParams(**params)).result()


def visible(client, tokens) -> str:
    """The text of generated tokens without a final end token (what OpenAI answers)."""
    tokens = list(tokens)
    if tokens and tokens[-1] in client.default_stop_ids:
        tokens = tokens[:-1]
    return client.get_tokenizer().decode(tokens, skip_special_tokens=False)


def test_models_lists_served_models_and_only_the_keys_checkpoints(server):
    mine = [m.id for m in client_of(server).models.list()]
    assert "smollm2-135m-instruct" in mine and server.checkpoint in mine
    theirs = [m.id for m in client_of(server, OTHER_KEY).models.list()]
    assert "smollm2-135m-instruct" in theirs and server.checkpoint not in theirs


def test_greedy_chat_equals_the_local_sampler_streamed_and_not(server, local):
    expected = local_sample(local["tuned"], chat_prompt(local["tuned"]), max_tokens=12,
                            temperature=0.0).sequences[0]
    text = visible(local["tuned"], expected.tokens)
    assert len(text) > 0
    messages = [{"role": "user", "content": QUESTION}]
    answer = client_of(server).chat.completions.create(
        model=server.checkpoint, messages=messages, temperature=0, max_tokens=12)
    choice = answer.choices[0]
    assert choice.message.content == text
    assert choice.finish_reason == ("stop" if expected.stop_reason == "stop" else "length")
    assert answer.usage.completion_tokens == len(expected.tokens)
    assert answer.usage.prompt_tokens == chat_prompt(local["tuned"]).length
    chunks = list(client_of(server).chat.completions.create(
        model=server.checkpoint, messages=messages, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.tokens)


def test_completions_equal_the_local_sampler(server, local, tiny_model):
    tokenizer = local["base"].get_tokenizer()
    prompt = "The capital of France is"
    tokens = tokenizer.encode(prompt, add_special_tokens=True)
    expected = local_sample(local["base"], types.ModelInput.from_ints(tokens), max_tokens=9,
                            temperature=0.0).sequences[0]
    answer = client_of(server).completions.create(model=tiny_model, prompt=prompt,
                                                  temperature=0, max_tokens=9)
    assert answer.choices[0].text == visible(local["base"], expected.tokens)
    streamed = "".join(c.choices[0].text for c in client_of(server).completions.create(
        model=tiny_model, prompt=prompt, temperature=0, max_tokens=9, stream=True))
    assert streamed == answer.choices[0].text
    by_ids = client_of(server).completions.create(model=tiny_model, prompt=tokens, temperature=0,
                                                  max_tokens=9)
    assert by_ids.choices[0].text == answer.choices[0].text


def test_stop_strings_end_the_text_before_them(server, local):
    full = visible(local["tuned"], local_sample(local["tuned"], chat_prompt(local["tuned"]),
                                                max_tokens=12, temperature=0.0).sequences[0]
                   .tokens)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), "the greedy text should have a non-blank middle"
    for stream in (False, True):
        answer = client_of(server).chat.completions.create(
            model=server.checkpoint, messages=[{"role": "user", "content": QUESTION}],
            temperature=0, max_tokens=12, stop=[stop], stream=stream)
        if stream:
            chunks = [c.choices[0] for c in answer if c.choices]
            text, reason = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
        else:
            text, reason = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert (text, reason) == (full[:full.find(stop)], "stop")


def test_n_with_seed_is_reproducible_and_equals_the_local_sampler(server, local, tiny_model):
    def ask():
        return client_of(server).chat.completions.create(
            model=tiny_model, messages=[{"role": "user", "content": QUESTION}], n=3, seed=11,
            temperature=1.0, max_tokens=8)

    first, again = ask(), ask()
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # three draws of a random model, not one answer three times
    expected = local_sample(local["base"], chat_prompt(local["base"]), n=3, seed=11,
                            temperature=1.0, max_tokens=8)
    assert texts == [visible(local["base"], s.tokens) for s in expected.sequences]


def test_logprobs_equal_the_samplers(server, local, tiny_model):
    expected = local_sample(local["base"], chat_prompt(local["base"]), max_tokens=6,
                            temperature=0.0).sequences[0]
    answer = client_of(server).chat.completions.create(
        model=tiny_model, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=6, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    count = len(content)
    assert count == len([t for t in expected.tokens if t not in local["base"].default_stop_ids])
    np.testing.assert_allclose([e.logprob for e in content], expected.logprobs[:count],
                               atol=1e-4)
    tokenizer = local["base"].get_tokenizer()
    for entry, token in zip(content, expected.tokens):
        assert entry.token == tokenizer.decode([token])
        tops = entry.top_logprobs
        assert len(tops) == 3 and tops[0].token == entry.token  # greedy: the chosen is the top
        assert tops[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
    completion = client_of(server).completions.create(
        model=tiny_model, prompt=tokenizer.decode(chat_prompt(local["base"]).to_ints()),
        temperature=0, max_tokens=6, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.top_logprobs) == len(logprobs.tokens)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    streamed = [c.choices[0].logprobs for c in client_of(server).chat.completions.create(
        model=tiny_model, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=6, logprobs=True, stream=True) if c.choices and c.choices[0].logprobs]
    np.testing.assert_allclose([e.logprob for lp in streamed for e in lp.content],
                               [e.logprob for e in content], atol=1e-6)


def test_errors_have_openais_shape_and_status(server, tiny_model):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as error:
        client_of(server).chat.completions.create(model="no-such-model", messages=messages)
    assert error.value.status_code == 404 and error.value.code == "model_not_found"
    assert error.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as error:
        client_of(server).chat.completions.create(model=tiny_model, messages=messages,
                                                  temperature=3)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as error:
        client_of(server).chat.completions.create(model=tiny_model, messages=messages,
                                                  extra_body={"top_k": 0})
    assert error.value.body["param"] == "top_k" and "at least 1" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        client_of(server).chat.completions.create(
            model=tiny_model, messages=[{"role": "wizard", "content": "hi"}])
    assert error.value.body["param"] == "messages" and "wizard" in error.value.message
    reply = httpx.post(server.url + "/v1/chat/completions",
                       json={"model": tiny_model, "messages": messages})
    assert reply.status_code == 401
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_another_key_cannot_use_a_checkpoint_it_does_not_own(server):
    with pytest.raises(openai.NotFoundError) as error:
        client_of(server, OTHER_KEY).chat.completions.create(
            model=server.checkpoint, messages=[{"role": "user", "content": "hi"}])
    assert error.value.code == "model_not_found"


def test_concurrent_requests_answer_as_alone(server, local, tiny_model):
    """Eight requests at once share the sampler's batches and still get their own answers."""
    questions = [f"What is {i} times {i + 3}?" for i in range(8)]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = client_of(server).chat.completions.create(
            model=tiny_model, messages=[{"role": "user", "content": questions[i]}],
            temperature=0, max_tokens=6).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i, question in enumerate(questions):
        expected = local_sample(local["base"], chat_prompt(local["base"], question),
                                max_tokens=6, temperature=0.0).sequences[0]
        assert answers[i] == visible(local["base"], expected.tokens)


def test_chat_prompt_on_a_tinker_path_answers_as_the_openai_route(server, monkeypatch, capsys):
    """``tinkerkit chat tinker://...`` samples through the SDK (whole answers) and gives the
    greedy answer the OpenAI route gives for the same checkpoint."""
    from tinkerkit.cli import main

    expected = client_of(server).chat.completions.create(
        model=server.checkpoint, messages=[{"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=12).choices[0].message.content
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    assert main(["chat", server.checkpoint, "--prompt", QUESTION, "--temperature", "0",
                 "--max-tokens", "12", "--set", f"TINKER_BASE_URL={server.url}"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_enable_thinking_false_asks_qwen3_for_the_answer_alone(server, tiny_qwen3):
    """vLLM's ``chat_template_kwargs.enable_thinking``: the prompt ends with Qwen3's empty
    think block (4 more tokens: ``<think>``, ``\\n\\n``, ``</think>``, ``\\n\\n``)."""
    client = LocalSamplingClient(tiny_qwen3)
    renderer = Renderer(client.get_tokenizer())
    messages = [Message(role="user", content=QUESTION)]
    thinking, plain = renderer.chat_prompt(messages), renderer.chat_prompt(messages, False)
    client.close()
    assert plain.length == thinking.length + 4
    for kwargs, expected in (({}, thinking), ({"enable_thinking": False}, plain)):
        answer = client_of(server).chat.completions.create(
            model=tiny_qwen3, messages=[{"role": "user", "content": QUESTION}], temperature=0,
            max_tokens=1, extra_body={"chat_template_kwargs": kwargs})
        assert answer.usage.prompt_tokens == expected.length


def test_samplers_beyond_the_limit_are_closed_and_rebuilt(server, local, tiny_model,
                                                          monkeypatch):
    """With room for one shared sampler, asking the base model, the checkpoint and the base
    model again evicts (and closes) each one; every answer is still the local sampler's."""
    monkeypatch.setattr("tinkerkit.serve.state.SHARED_SAMPLERS", 1)
    for model, name in ((tiny_model, "base"), (server.checkpoint, "tuned"), (tiny_model, "base")):
        answer = client_of(server).chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0,
            max_tokens=5).choices[0].message.content
        expected = local_sample(local[name], chat_prompt(local[name]), max_tokens=5,
                                temperature=0.0).sequences[0]
        assert answer == visible(local[name], expected.tokens)
        assert len(server.state._shared) == 1


def test_an_answer_stops_generating_when_its_client_has_gone(local, tiny_model):
    """A request without ``stream`` whose client closed the connection stops at the next token
    (it would otherwise hold the shared sampler for all its max_tokens)."""
    from tinkerkit.serve.openai import CompletionRequest, _Generation

    checks = []

    def client_gone() -> bool:
        checks.append(1)
        return len(checks) > 3  # the client leaves after the third token

    body = CompletionRequest(model=tiny_model, prompt="Count: one two", temperature=0)
    prompt = types.ModelInput.from_ints(local["base"].get_tokenizer().encode("Count: one two"))
    stayed = _Generation(local["base"], prompt, body, 200, None, chat=False).whole()
    left = _Generation(local["base"], prompt, body, 200, None, chat=False,
                       client_gone=client_gone).whole()
    assert stayed["usage"]["completion_tokens"] > 10  # a long answer when the client stays
    assert left["usage"]["completion_tokens"] == 4  # three kept, the fourth's check ended it
    assert left["choices"][0]["finish_reason"] == "stop"
