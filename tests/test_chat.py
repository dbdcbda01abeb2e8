"""``tinkerkit chat``: the answer of ``--prompt`` is the local sampler's, streamed as generated;
the conversation commands; and the text pieces (:mod:`tinkerkit.streaming`) that chat and the
OpenAI routes share."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinker import types

from tinkerkit.chat import Chat, model_and_checkpoint
from tinkerkit.cli import main
from tinkerkit.data.conversation import Message
from tinkerkit.engines.local import LocalSamplingClient
from tinkerkit.render import Renderer
from tinkerkit.streaming import TextStream, ThinkSplit, split_thinking

QUESTION = "What is 7 times 6?"


def greedy_text(client: LocalSamplingClient, messages, max_tokens: int) -> str:
    prompt = Renderer(client.get_tokenizer()).chat_prompt(messages)
    tokens = list(client.sample(prompt, 1, types.SamplingParams(
        max_tokens=max_tokens, temperature=0.0)).result().sequences[0].tokens)
    if tokens and tokens[-1] in client.default_stop_ids:
        tokens = tokens[:-1]
    return client.get_tokenizer().decode(tokens)


def test_prompt_prints_the_samplers_greedy_answer(tiny_model, capsys):
    client = LocalSamplingClient(tiny_model)
    expected = greedy_text(client, [Message(role="user", content=QUESTION)], 10)
    client.close()
    assert main(["chat", tiny_model, "--prompt", QUESTION, "--temperature", "0",
                 "--max-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_streams_keeps_turns_and_resets(tiny_model):
    client = LocalSamplingClient(tiny_model)
    chat = Chat(client, types.SamplingParams(max_tokens=6, temperature=0.0), system="Be brief.")
    shown: list[tuple[str, str]] = []
    reply = chat.ask(QUESTION, lambda kind, text: shown.append((kind, text)))
    assert len(shown) > 1  # piece by piece, as generated
    assert "".join(text for _, text in shown) == reply.answer
    assert reply.answer == greedy_text(client, [Message(role="system", content="Be brief."),
                                                Message(role="user", content=QUESTION)], 6)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant"]
    chat.ask("And 7 times 7?", lambda kind, text: None)
    assert len(chat.messages) == 5
    chat.reset()
    assert [m.content for m in chat.messages] == ["Be brief."]
    chat.set_system("")
    assert chat.messages == []
    client.close()


def test_interrupting_the_callback_stops_the_answer(tiny_model):
    """A reader that stops listening (Ctrl-C in chat, a closed stream) ends its sample at once."""
    client = LocalSamplingClient(tiny_model)
    seen: list[int] = []

    def on_token(index, token, logprob):
        seen.append(token)
        return len(seen) < 3

    prompt = types.ModelInput.from_ints([1, 17, 305])
    response = client.sample(prompt, 1, types.SamplingParams(max_tokens=50, temperature=0.0,
                                                              stop=[]), on_token=on_token).result()
    assert list(response.sequences[0].tokens) == seen and len(seen) == 3
    assert response.sequences[0].stop_reason == "stop"
    client.close()


def test_model_argument_resolves_like_the_other_commands(tmp_path, tiny_model):
    assert model_and_checkpoint("smollm2-135m-instruct") == ("smollm2-135m-instruct", None)
    assert model_and_checkpoint(tiny_model) == (tiny_model, None)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert model_and_checkpoint(str(adapter)) == (None, str(adapter))
    path = "TINKER://abc:train:0/sampler_weights/final"
    assert model_and_checkpoint(path) == (None, "tinker://abc:train:0/sampler_weights/final")


def test_text_stream_holds_back_partial_characters_and_stop_strings(qwen_tokenizer):
    text = "Café: 2+2 is 4. Done<|im_end|>"
    ids = qwen_tokenizer.encode(text)
    stream = TextStream(qwen_tokenizer, stop_strings=["is 4", "<|im_end|>"])
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == stream.text == "Café: 2+2 "
    assert all("\ufffd" not in p for p in pieces)
    assert stream.stopped
    assert qwen_tokenizer.decode(ids[:stream.visible_tokens()]).startswith("Café: 2+2")
    ended = TextStream(qwen_tokenizer, stop_ids={qwen_tokenizer.convert_tokens_to_ids(
        "<|im_end|>")})
    assert "".join([ended.push(i) for i in ids] + [ended.finish()]) == "Café: 2+2 is 4. Done"


@pytest.mark.parametrize("text, thinking, answer", [
    ("<think>\nAdd them.\n</think>\n\n4", "Add them.\n", "4"),
    ("  <think>x</think>y", "x", "y"),
    ("4, no thinking", "", "4, no thinking"),
    ("<thi", "", "<thi"),
    ("<think>unfinished", "unfinished", ""),
])
def test_think_split_streams_what_it_splits_whole(text, thinking, answer):
    assert split_thinking(text) == (thinking, answer)
    split = ThinkSplit()
    pieces = [p for c in text for p in split.feed(c)] + split.finish()  # one character at a time
    assert ("".join(t for k, t in pieces if k == "thinking"),
            "".join(t for k, t in pieces if k == "answer")) == (thinking, answer)


def test_think_split_of_a_prompt_that_opened_the_block():
    assert split_thinking("Add.</think>\n\n4", thinking=True) == ("Add.", "4")


def test_chat_refuses_a_missing_model(capsys):
    assert main(["chat", str(Path("/nonexistent/model")), "--prompt", "hi"]) == 1
    assert "error:" in capsys.readouterr().err


def test_chat_refuses_an_empty_prompt_before_loading_the_model(capsys):
    assert main(["chat", str(Path("/nonexistent/model")), "--prompt", "  "]) == 1
    err = capsys.readouterr().err
    assert "--prompt is empty" in err and "/nonexistent" not in err  # before the model loads


def test_interactive_session_commands_and_end_of_input(tiny_model, monkeypatch, capsys):
    import io

    client = LocalSamplingClient(tiny_model)
    first = greedy_text(client, [Message(role="user", content=QUESTION)], 5)
    client.close()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/system Be brief.\n/reset\n"
                                                 "/nonsense\n"))  # then end of input
    assert main(["chat", tiny_model, "--temperature", "0", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert first.strip() in out
    assert "(system prompt set; new conversation)" in out and "(new conversation)" in out
    assert "unknown command /nonsense" in out
