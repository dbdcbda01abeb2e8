"""Rendering: weight masks token by token, prompt prefixes, truncation and its counts."""

import copy

import numpy as np
import pytest

from tinkerkit.config import TrainOn
from tinkerkit.data.conversation import Conversation, Message
from tinkerkit.data.formats import normalize_record
from tinkerkit.errors import DataError
from tinkerkit.render import Renderer, RenderSkip, end_of_turn_ids


def conv(*turns, system=None):
    messages = [Message(role="system", content=system)] if system else []
    roles = ["user", "assistant"]
    messages += [Message(role=roles[i % 2], content=t) for i, t in enumerate(turns)]
    return Conversation(messages=tuple(messages), source="test:1")


TWO_TURNS = conv("2+2?", "4", "Times 3?", "12", system="Be brief.")

# (token text, weight) for the whole ChatML rendering: loss on both answers and their <|im_end|>,
# never on the newline after it, the prompts or the generation prompts.
CHATML_ALL_ASSISTANT = [
    ("<|im_start|>", 0), ("system", 0), ("\n", 0), ("Be", 0), (" brief", 0), (".", 0),
    ("<|im_end|>", 0), ("\n", 0), ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("2", 0), ("+", 0),
    ("2", 0), ("?", 0), ("<|im_end|>", 0), ("\n", 0), ("<|im_start|>", 0), ("ass", 0),
    ("istant", 0), ("\n", 0), ("4", 1), ("<|im_end|>", 1), ("\n", 0), ("<|im_start|>", 0),
    ("user", 0), ("\n", 0), ("Times", 0), (" ", 0), ("3", 0), ("?", 0), ("<|im_end|>", 0),
    ("\n", 0), ("<|im_start|>", 0), ("ass", 0), ("istant", 0), ("\n", 0), ("1", 1), ("2", 1),
    ("<|im_end|>", 1), ("\n", 0),
]

# A Zephyr-style template (end of turn = the EOS token), loss on the last answer only.
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ZEPHYR_LAST_ASSISTANT_TAIL = [  # the last 12 tokens; every earlier token has weight 0
    ("|", 0), (">", 0), ("\n", 0), ("<", 0), ("|", 0), ("ass", 0), ("istant", 0), ("|", 0),
    (">", 0), ("\n", 0), ("1", 1), ("2", 1), ("<|im_end|>", 1), ("\n", 0),
][-12:]


def pairs(tokenizer, tokens, weights):
    return [(tokenizer.decode([t]), int(w)) for t, w in zip(tokens, weights)]


def test_chatml_two_turn_mask(smol_tokenizer):
    tokens, weights = Renderer(smol_tokenizer).render_tokens(TWO_TURNS)
    assert pairs(smol_tokenizer, tokens, weights) == CHATML_ALL_ASSISTANT


def test_chatml_matches_hf_apply_chat_template(smol_tokenizer):
    tokens, _ = Renderer(smol_tokenizer).render_tokens(TWO_TURNS)
    chat = [m.model_dump(exclude_none=True) for m in TWO_TURNS.messages]
    expected = smol_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert tokens == list(expected)


def test_other_template_last_assistant_mask(smol_tokenizer):
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = ZEPHYR
    tokens, weights = Renderer(tokenizer, train_on=TrainOn.LAST_ASSISTANT).render_tokens(TWO_TURNS)
    got = pairs(tokenizer, tokens, weights)
    assert got[-12:] == ZEPHYR_LAST_ASSISTANT_TAIL
    assert sum(w for _, w in got) == 3  # "1", "2", end of turn — the first answer "4" has none


def test_pad_equal_to_eos_still_trains_end_of_turn(smol_tokenizer):
    assert smol_tokenizer.pad_token_id == smol_tokenizer.eos_token_id  # SmolLM2: both <|im_end|>
    example = Renderer(smol_tokenizer).render(conv("Hi", "Hello"))
    targets = example.datum.loss_fn_inputs["target_tokens"].to_numpy()
    weights = example.datum.loss_fn_inputs["weights"].to_numpy()
    eos_positions = np.flatnonzero(targets == smol_tokenizer.eos_token_id)
    assert weights[eos_positions[-1]] == 1.0


def test_datum_is_one_token_shift_and_prompt_is_prefix(smol_tokenizer):
    renderer = Renderer(smol_tokenizer)
    tokens, weights = renderer.render_tokens(TWO_TURNS)
    datum = renderer.render(TWO_TURNS).datum
    assert datum.model_input.to_ints() == tokens[:-1]
    assert datum.loss_fn_inputs["target_tokens"].to_numpy().tolist() == tokens[1:]
    assert datum.loss_fn_inputs["weights"].to_numpy().tolist() == weights[1:]
    prompt = renderer.build_prompt(TWO_TURNS).to_ints()
    assert tokens[: len(prompt)] == prompt
    assert smol_tokenizer.decode(prompt).endswith("Times 3?<|im_end|>\n<|im_start|>assistant\n")
    hf_prompt = smol_tokenizer.apply_chat_template(
        [m.model_dump(exclude_none=True) for m in TWO_TURNS.prompt_messages()],
        tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt == list(hf_prompt)


def test_truncation_inside_answer_counts_lost_end_of_turn(smol_tokenizer):
    c = conv("Count.", "one two three four five six")
    full = len(Renderer(smol_tokenizer).render_tokens(c)[0])
    example = Renderer(smol_tokenizer, max_length=full - 4).render(c)
    assert example.truncated and example.lost_end_of_turn
    assert example.n_tokens == full - 5 and example.full_length == full


def test_truncation_before_answer_is_skipped_and_counted(smol_tokenizer):
    long_question = conv("word " * 50, "ok")
    short = conv("Hi", "Hello")
    renderer = Renderer(smol_tokenizer, max_length=40)
    with pytest.raises(RenderSkip) as skip:
        renderer.render(long_question)
    assert skip.value.kind == "skipped"
    examples, stats = renderer.render_dataset([long_question, short, conv("no answer")])
    assert (stats.processed, stats.truncated, stats.skipped, stats.failed) == (1, 0, 1, 1)
    assert stats.reasons[1] == ("test:1", "no assistant message to learn from")
    assert len(examples) == 1


def test_truncation_off_skips(smol_tokenizer):
    c = conv("Count.", "one two three four five six")
    with pytest.raises(RenderSkip, match="truncation off"):
        Renderer(smol_tokenizer, max_length=20, truncate=False).render(c)


def test_thinking_rendered_inside_think_tags(smol_tokenizer):
    c = Conversation(messages=(Message(role="user", content="Q"),
                               Message(role="assistant", content="A", thinking="step 1")))
    tokens, weights = Renderer(smol_tokenizer).render_tokens(c)
    trained = smol_tokenizer.decode([t for t, w in zip(tokens, weights) if w])
    assert trained == "<think>\nstep 1\n</think>\n\nA<|im_end|>"


def test_end_of_turn_ids(smol_tokenizer):
    assert end_of_turn_ids(smol_tokenizer) == [0, 2]  # <|endoftext|>, <|im_end|>


def test_tokenizer_without_template_is_a_clear_error(smol_tokenizer):
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        Renderer(tokenizer)


# Qwen3 (tinkerkit's template on the real Qwen tokenizer): "What is 2+2?" answered "4".
QWEN_PROMPT = [(151644, 0), (872, 0), (198, 0), (3838, 0), (374, 0), (220, 0), (17, 0), (10, 0),
               (17, 0), (30, 0), (151645, 0), (198, 0), (151644, 0), (77091, 0), (198, 0)]
# With reasoning "2+2=4": <think>\n2+2=4\n</think>\n\n4<|im_end|> is trained; the final \n is not.
QWEN_THINKING = QWEN_PROMPT + [
    (151667, 1), (198, 1), (17, 1), (10, 1), (17, 1), (28, 1), (19, 1), (198, 1), (151668, 1),
    (271, 1), (19, 1), (151645, 1), (198, 0)]
# Without reasoning: Qwen3's thinking-disabled generation prompt ends with the empty think block
# <think>\n\n</think>\n\n (weight 0); only 4<|im_end|> is trained.
QWEN_NO_THINKING = QWEN_PROMPT + [
    (151667, 0), (271, 0), (151668, 0), (271, 0), (19, 1), (151645, 1), (198, 0)]


@pytest.mark.parametrize("thinking, expected", [("2+2=4", QWEN_THINKING),
                                                (None, QWEN_NO_THINKING)])
def test_qwen3_thinking_masks(qwen_tokenizer, thinking, expected):
    c = Conversation(messages=(Message(role="user", content="What is 2+2?"),
                               Message(role="assistant", content="4", thinking=thinking)))
    renderer = Renderer(qwen_tokenizer)
    tokens, weights = renderer.render_tokens(c)
    assert list(zip(tokens, [int(w) for w in weights])) == expected
    # The same ids as the template renders the whole conversation in one piece, and the
    # evaluation prompt is the untrained prefix (thinking disabled when there is no reasoning).
    chat = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": thinking}]
    whole = qwen_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)
    assert list(whole["input_ids"]) == tokens
    prompt = renderer.build_prompt(c).to_ints()
    assert prompt == [t for t, _ in expected[:len(prompt)]] and expected[len(prompt)][1] == 1


@pytest.mark.parametrize("content, thinking, expected", [
    ("<think>\n2+2=4\n</think>\n\n4", None, QWEN_THINKING),    # DeepSeek-R1 / Qwen3 output style
    ("<think>\n\n</think>\n\n4", None, QWEN_NO_THINKING),      # Qwen3 with thinking disabled
    ("<think>2+2=4</think>4", "2+2=4", QWEN_THINKING),          # both, equal: read once
])
def test_qwen3_reasoning_written_in_the_answer(qwen_tokenizer, content, thinking, expected):
    # Rendered as with a thinking field: one think block, not an empty one before the answer's.
    record = {"messages": [{"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": content, "thinking": thinking}]}
    c = normalize_record(record, None, "f:1")
    tokens, weights = Renderer(qwen_tokenizer).render_tokens(c)
    assert list(zip(tokens, [int(w) for w in weights])) == expected


def test_qwen3_no_thinking_prompt_is_qwen3_inference_with_thinking_disabled(qwen_tokenizer):
    c = Conversation(messages=(Message(role="user", content="What is 2+2?"),
                               Message(role="assistant", content="4")))
    prompt = qwen_tokenizer.decode(Renderer(qwen_tokenizer).build_prompt(c).to_ints())
    assert prompt == qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False,
        add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_two_turns_train_both_answers(qwen_tokenizer):
    c = Conversation(messages=(
        Message(role="user", content="2+2?"), Message(role="assistant", content="4"),
        Message(role="user", content="Times 3?"),
        Message(role="assistant", content="12", thinking="4*3")))
    tokens, weights = Renderer(qwen_tokenizer).render_tokens(c)
    trained = qwen_tokenizer.decode([t for t, w in zip(tokens, weights) if w])
    assert trained == "4<|im_end|><think>\n4*3\n</think>\n\n12<|im_end|>"
    assert qwen_tokenizer.decode(tokens).count("<think>\n\n</think>\n\n4<|im_end|>") == 1
