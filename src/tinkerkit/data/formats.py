"""Load data files and normalize every record shape to a :class:`Conversation`.

Files are JSON arrays (``.json`` starting with ``[``), JSON Lines (``.jsonl``, or any file that does
not start with ``[``) or Parquet (needs ``pyarrow``); UTF-8 with or without a byte-order mark, LF or
CRLF line ends. Each file's record shape is detected from its first recognizable record (or forced
with ``format=``) and every record of the file is normalized with it:

==================  ===============================================  ===============================
format              fields                                           reference answer
==================  ===============================================  ===============================
messages            ``messages`` [{role, content, thinking?}]        ``reference_answer``, else
                    (TRL / OpenAI chat; also ``tinkerkit split``     the last assistant message's
                    output)                                          (``grading`` extraction)
prompt_completion   ``prompt``, ``completion`` (strings, or TRL's    as for messages
                    conversational lists of messages)
question_answer     ``question``, ``answer`` (GSM8K)                 rest of the last ``####`` line
                                                                     (``gsm8k_final_answer``)
math                ``problem``, ``answer``, ``solution?`` (MATH,    ``answer`` (a number becomes
                    AIME, AMC)                                       ``"27"`` for ``27.0``)
s1k                 ``question``, ``thinking_trajectories``,         ``solution``, if present
                    ``attempt`` (simplescaling/s1K)
alpaca              ``instruction``, ``input?``, ``output``          none
==================  ===============================================  ===============================

A message's ``content`` is a string or, as in OpenAI's chat API, a list of content parts
(``[{"type": "text", "text": "…"}, …]``): its text parts are joined with a newline, the way vLLM's
OpenAI-compatible server joins them before the chat template (``"\n".join(texts)`` in
``vllm/entrypoints/chat_utils.py``), so a model trained here sees what it is later served. (HF
multimodal templates concatenate text parts with no separator, which glues words across parts.) A
non-text part (``image_url``, ``input_audio``, ``file``, …) is an error naming the part
(``messages[1].content[0]``), or a skipped record with ``on_error="skip"``.

Locations are written ``path:N``: N is the 1-based line on which the record starts (JSON Lines and
JSON arrays), or the 1-based record number in Parquet files.

Example::

    result = load_conversations(["gsm8k/test.jsonl"])
    result.conversations[0].reference_answer   # "18"
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tinkerkit.data.conversation import Conversation, Message
from tinkerkit.errors import ConfigError, DataError
from tinkerkit.grading import extract_final_answer, gsm8k_final_answer

ROLES = ("system", "user", "assistant")

# Shape of each format, in the order users read them; also the error help for unknown shapes.
_SHAPES = {
    "messages": "{messages: [{role, content}, ...]}",
    "prompt_completion": "{prompt, completion}",
    "question_answer": "{question, answer} (GSM8K)",
    "math": "{problem, answer, solution?} (MATH, AIME, AMC)",
    "s1k": "{question, thinking_trajectories, attempt} (s1K)",
    "alpaca": "{instruction, input?, output}",
}
FORMATS: tuple[str, ...] = tuple(_SHAPES)

# Fields that identify each format, checked in this order: the more specific shapes first (AIME
# records carry both ``problem`` and ``question``/``answer``; s1K carries ``question``).
_SIGNATURES = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "s1k": ("thinking_trajectories",),
    "math": ("problem",),
    "question_answer": ("question", "answer"),
    "alpaca": ("instruction", "output"),
}


@dataclass
class LoadResult:
    """The conversations of one or more files, with what was skipped and why.

    Attributes:
        conversations: Every normalized record, files in the given order, records in file order.
        skipped: ``(where, reason)`` of each record skipped with ``on_error="skip"``; ``where`` is
            ``"path:N"`` (see the module docstring).
        counts: Loaded records per file, keyed by the path as given.
        formats: Detected (or forced) format per file; absent for a file with no valid record.
    """

    conversations: list[Conversation] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- loading files

def load_conversations(paths: Sequence[str | Path], format: str | None = None,
                       on_error: Literal["raise", "skip"] = "raise") -> LoadResult:
    """Load and normalize the records of several data files.

    Args:
        paths: JSON, JSON Lines or Parquet files; merged in the given order.
        format: Force one of :data:`FORMATS` for every file; ``None`` detects it per file.
        on_error: ``"raise"`` stops at the first bad record; ``"skip"`` records it in
            :attr:`LoadResult.skipped` and goes on. File-level problems always raise.

    Returns:
        The conversations, skipped records, and per-file counts and formats.

    Raises:
        DataError: An unknown ``format``; a missing, empty, non-UTF-8 or syntactically invalid
            file (naming the file and line); a bad record with ``on_error="raise"`` (naming file,
            line and field); or no valid record at all.
        ConfigError: ``on_error`` is neither ``"raise"`` nor ``"skip"``.
    """
    _check_format_name(format)
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"--on-error must be 'raise' or 'skip', got {on_error!r}")
    if not paths:
        raise DataError("no data files given")
    result = LoadResult()
    for path in paths:
        key = str(path)
        records = _read_records(Path(path))
        file_format = format or _detect_file_format(records)
        loaded = 0
        for n, record in records:
            try:
                if isinstance(record, DataError):
                    raise record
                result.conversations.append(normalize_record(record, file_format, f"{key}:{n}"))
                loaded += 1
            except DataError as e:
                if on_error == "raise":
                    raise
                result.skipped.append((f"{key}:{n}", _reason(e)))
        result.counts[key] = loaded
        if file_format is not None:
            result.formats[key] = file_format
    if not result.conversations:
        first = f"; first: {result.skipped[0][0]}: {result.skipped[0][1]}" if result.skipped else ""
        raise DataError(f"no valid records in {', '.join(map(str, paths))} "
                        f"({len(result.skipped)} skipped{first})")
    return result


def _read_records(path: Path) -> list[tuple[int, Any]]:
    """``(N, record)`` pairs of a file; a malformed JSON line becomes a :class:`DataError` value."""
    if not path.exists():
        raise DataError("file not found", path=str(path))
    if path.is_dir():
        raise DataError("is a directory; pass the data files inside it", path=str(path))
    if path.suffix.lower() == ".parquet":
        records = list(enumerate(_read_parquet(path), start=1))
    else:
        text = _decode(path)
        if not text.strip():
            raise DataError("file is empty", path=str(path))
        if text.lstrip().startswith("["):  # a JSON array, whatever the file's suffix
            records = _parse_json_array(text, str(path))
        else:
            records = _parse_json_lines(text, str(path))
    if not records:
        raise DataError("file holds no records", path=str(path))
    return records


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow",
                        path=str(path)) from None
    import pyarrow

    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file: {e}", path=str(path)) from None


def _decode(path: Path) -> str:
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        raise DataError(f"invalid UTF-8 at byte offset {offset}; save the file as UTF-8",
                        path=str(path), line=data[:offset].count(b"\n") + 1) from None


def _parse_json_lines(text: str, path: str) -> list[tuple[int, Any]]:
    records = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON allows U+2028
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((n, DataError(f"invalid JSON: {e.msg} (column {e.colno})",
                                         path=path, line=n)))
    return records


def _parse_json_array(text: str, path: str) -> list[tuple[int | str, Any]]:
    """``(line, record)`` pairs of a JSON array; ``line`` is where the record starts, with the
    record number added (``"1 (record 2)"``) when several records start on one line."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        message = e.msg
        if e.msg == "Expecting value" and text[e.pos:e.pos + 1] == "]" \
                and text[:e.pos].rstrip().endswith(","):
            message = "trailing comma before ']'"  # Python < 3.13 reports only "Expecting value"
        raise DataError(f"invalid JSON at column {e.colno}: {message}", path=path,
                        line=e.lineno) from None
    if not isinstance(records, list):
        raise DataError(f"expected a JSON array of records, got {_kind(records)}", path=path)
    lines = _array_item_lines(text, len(records))
    shared = {line for line in lines if lines.count(line) > 1} if len(set(lines)) < len(lines) else ()
    labels = [f"{line} (record {i})" if line in shared else line
              for i, line in enumerate(lines, start=1)]
    return list(zip(labels, records))


def _array_item_lines(text: str, count: int) -> list[int]:
    """The 1-based line on which each of the ``count`` items of a valid JSON array starts."""
    decoder, lines = json.JSONDecoder(), []
    pos, line, counted = text.index("[") + 1, 1, 0
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
    return lines


def _detect_file_format(records: list[tuple[int, Any]]) -> str | None:
    """The format of the first record whose shape is recognized; ``None`` if there is none."""
    for _, record in records:
        if isinstance(record, dict):
            try:
                return detect_format(record)
            except DataError:
                continue
    return None


def _reason(error: DataError) -> str:
    return f"field '{error.field}': {error.reason}" if error.field else error.reason


# ------------------------------------------------------------------------------ detecting a shape

def detect_format(record: dict) -> str:
    """The format name of one record, from the fields it has.

    Args:
        record: One decoded JSON object.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        DataError: No known shape matches; the message lists the record's fields and every shape.
    """
    for name, fields in _SIGNATURES.items():
        if all(f in record for f in fields):
            return name
    shapes = "; ".join(f"{name} {shape}" for name, shape in _SHAPES.items())
    raise DataError(f"unknown record shape with fields {sorted(record)}; known shapes: {shapes}; "
                    f"force one with --format")


def _check_format_name(format: str | None) -> None:
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")


# ------------------------------------------------------------------------------------ normalizing

def normalize_record(record: dict, format: str | None, where: str) -> Conversation:
    """Normalize one record to a :class:`Conversation`.

    Args:
        record: One decoded JSON object.
        format: One of :data:`FORMATS`, or ``None`` to detect it from this record.
        where: ``"path:N"``, kept as :attr:`Conversation.source` and named in errors.

    Returns:
        The conversation, with its reference answer where the format has one.

    Raises:
        DataError: Not an object, an unknown shape or format, a missing field, a field of the wrong
            type (e.g. a number or null where text is expected), an empty conversation or an unknown
            role; the message names ``where`` and the field.
    """
    if not isinstance(record, dict):
        raise _error(where, None, f"expected a JSON object, got {_kind(record)}")
    _check_format_name(format)
    if format is None:
        try:
            format = detect_format(record)
        except DataError as e:
            raise _error(where, None, e.reason) from None
    messages, reference = _NORMALIZERS[format](record, where)
    return Conversation(messages=messages, reference_answer=reference, source=where)


Normalized = tuple[list[Message], str | None]


def _from_messages(record: dict, where: str) -> Normalized:
    messages = _messages(record, "messages", where)
    return messages, _reference_or_extracted(record, messages, where)


def _from_prompt_completion(record: dict, where: str) -> Normalized:
    if isinstance(record.get("prompt"), list) and isinstance(record.get("completion"), list):
        # TRL's conversational prompt/completion: two lists of messages
        messages = _messages(record, "prompt", where) + _messages(record, "completion", where)
    else:
        thinking, completion = _inline_thinking(_text(record, "completion", where), where,
                                                "completion")
        messages = [Message(role="user", content=_text(record, "prompt", where)),
                    Message(role="assistant", content=completion, thinking=thinking)]
    return messages, _reference_or_extracted(record, messages, where)


def _from_question_answer(record: dict, where: str) -> Normalized:
    question, answer = _text(record, "question", where), _text(record, "answer", where)
    messages = [Message(role="user", content=question),
                Message(role="assistant", content=_strip_calculator_annotations(answer))]
    if record.get("reference_answer") is not None:  # an explicit reference, as for messages
        return messages, _answer_text(record, "reference_answer", where)
    return messages, gsm8k_final_answer(answer)


def _from_math(record: dict, where: str) -> Normalized:
    """MATH-style; without ``solution`` (AMC) the record is evaluation-only: a user turn alone."""
    messages = [Message(role="user", content=_text(record, "problem", where))]
    if "solution" in record:
        messages.append(Message(role="assistant", content=_text(record, "solution", where)))
    if "answer" in record:
        return messages, _answer_text(record, "answer", where)
    if "solution" in record:  # the original MATH release has no answer field: use its \boxed{}
        return messages, extract_final_answer(messages[-1].content)
    raise _error(where, "answer", "required field is missing")


def _from_s1k(record: dict, where: str) -> Normalized:
    trajectories = record.get("thinking_trajectories")
    if not isinstance(trajectories, list) or not trajectories:
        raise _error(where, "thinking_trajectories",
                     f"expected a non-empty array of strings, got {_kind(trajectories)}")
    for i, item in enumerate(trajectories):
        if not isinstance(item, str):
            raise _error(where, f"thinking_trajectories[{i}]",
                         f"expected a string, got {_kind(item)}")
    messages = [Message(role="user", content=_text(record, "question", where)),
                Message(role="assistant", content=_text(record, "attempt", where),
                        thinking="\n".join(trajectories))]
    reference = _text(record, "solution", where) if "solution" in record else None
    return messages, reference


def _from_alpaca(record: dict, where: str) -> Normalized:
    prompt = _text(record, "instruction", where)
    extra = _text(record, "input", where, allow_empty=True) if "input" in record else ""
    if extra.strip():
        prompt += "\n\n" + extra
    return [Message(role="user", content=prompt),
            Message(role="assistant", content=_text(record, "output", where))], None


_NORMALIZERS: dict[str, Callable[[dict, str], Normalized]] = {
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
    "question_answer": _from_question_answer,
    "math": _from_math,
    "s1k": _from_s1k,
    "alpaca": _from_alpaca,
}
assert tuple(_NORMALIZERS) == FORMATS


def _messages(record: dict, key: str, where: str) -> list[Message]:
    """Validate a list of ``{role, content, thinking?|reasoning_content?}`` turns."""
    turns = record.get(key)
    if not isinstance(turns, list):
        raise _error(where, key, f"expected an array of messages, got {_kind(turns)}")
    if not turns:
        raise _error(where, key, "empty conversation")
    messages = []
    for i, turn in enumerate(turns):
        name = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _error(where, name, f"expected an object {{role, content}}, got {_kind(turn)}")
        role = _text(turn, "role", where, prefix=name)
        if role not in ROLES:
            raise _error(where, f"{name}.role",
                         f"unknown role {role!r} (expected {', '.join(ROLES)})")
        thinking = _thinking(turn, role, where, name)
        content = _content(turn, where, name, allow_empty=bool(thinking))
        if role == "assistant":
            inline, content = _inline_thinking(content, where, f"{name}.content",
                                               has_thinking=thinking is not None)
            if inline is not None and thinking is not None and inline.strip() != thinking.strip():
                field = next(key for key in _THINKING_KEYS
                             if isinstance(turn.get(key), str) and turn[key].strip())
                raise _error(where, f"{name}.content",
                             "holds <think> reasoning that differs from the same message's "
                             f"'{field}'; keep one of the two")
            thinking = thinking if thinking is not None else inline
        messages.append(Message(role=role, content=content, thinking=thinking))
    return messages


_THINKING_KEYS = ("thinking", "reasoning_content")


def _thinking(turn: dict, role: str, where: str, name: str) -> str | None:
    """A turn's reasoning from ``thinking`` or ``reasoning_content``; null, empty and
    whitespace-only values mean none.

    Raises:
        DataError: A value that is not a string or null; both fields set to different texts; or
            reasoning on a system or user message (templates drop it or render it inconsistently).
    """
    values = {key: _text(turn, key, where, prefix=name, allow_empty=True)
              for key in _THINKING_KEYS if turn.get(key) is not None}
    values = {key: value for key, value in values.items() if value.strip()}
    if len(set(values.values())) > 1:
        raise _error(where, f"{name}.reasoning_content",
                     "differs from the same message's 'thinking'; keep one of the two fields")
    if values and role != "assistant":
        key = next(iter(values))
        raise _error(where, f"{name}.{key}",
                     f"reasoning on a {role} message; only assistant messages carry reasoning")
    return next(iter(values.values()), None)


def _inline_thinking(content: str, where: str, name: str,
                     has_thinking: bool = False) -> tuple[str | None, str]:
    """Reasoning written into an answer as ``<think>…</think>answer`` (DeepSeek-R1 and Qwen3
    outputs) taken out as the message's reasoning, as Qwen3's own template does; an empty think
    block means none. Other text is returned as it is.

    Args:
        content: The message's content.
        where: ``file:line`` for errors; ``name``: the field.
        has_thinking: The message carries reasoning in a field of its own, so an empty answer is
            allowed.

    Raises:
        DataError: Neither reasoning nor an answer is left.
    """
    text = content.lstrip()
    if not text.startswith("<think>") or "</think>" not in text:
        return None, content
    reasoning, _, answer = text[len("<think>"):].partition("</think>")
    reasoning, answer = reasoning.strip("\n"), answer.lstrip("\n")
    thinking = reasoning if reasoning.strip() else None
    if thinking is None and not answer.strip() and not has_thinking:
        raise _error(where, name, "holds only an empty <think></think> block, no answer")
    return thinking, answer


# OpenAI content parts are joined as vLLM's OpenAI server joins them (see the module docstring).
CONTENT_PART_SEPARATOR = "\n"


def _content(turn: dict, where: str, name: str, allow_empty: bool = False) -> str:
    """A message's ``content``: a string, or OpenAI content parts with their text joined.

    Args:
        turn: One message object.
        where: ``"path:N"`` for errors.
        name: The message's field name (``messages[1]``).
        allow_empty: An empty content is allowed (the message carries reasoning).

    Returns:
        The content text; for a list of parts, the ``text`` of each part joined with
        :data:`CONTENT_PART_SEPARATOR`.

    Raises:
        DataError: Content missing, of the wrong type or empty; a part that is not an object, not
            of type ``"text"`` (image, audio, file: this toolkit trains text models) or without a
            string ``text``; the message names the part (``messages[1].content[0]``).
    """
    parts = turn.get("content")
    if not isinstance(parts, list):
        return _text(turn, "content", where, prefix=name, allow_empty=allow_empty)
    texts = []
    for i, part in enumerate(parts):
        part_name = f"{name}.content[{i}]"
        if not isinstance(part, dict):
            raise _error(where, part_name,
                         f"expected a content part {{type, text}}, got {_kind(part)}")
        kind = part.get("type")
        if kind != "text":
            raise _error(where, part_name,
                         f"a {kind!r} content part; only text parts can be trained on here "
                         "(remove the part, or skip such records: ON_ERROR = \"skip\" in the "
                         "config, --set ON_ERROR=skip, or --on-error skip for split and stats)"
                         if isinstance(kind, str) else
                         f"a content part needs a string 'type', got {_kind(kind)}")
        texts.append(_text(part, "text", where, prefix=part_name, allow_empty=True))
    content = CONTENT_PART_SEPARATOR.join(texts)
    if not allow_empty and not content.strip():
        raise _error(where, f"{name}.content", "is empty" if parts else "empty list of parts")
    return content


def _text(record: dict, key: str, where: str, prefix: str = "", allow_empty: bool = False) -> str:
    """``record[key]`` as a string, else a DataError naming ``prefix.key``."""
    name = f"{prefix}.{key}" if prefix else key
    if key not in record:
        raise _error(where, name, "required field is missing")
    value = record[key]
    if not isinstance(value, str):
        raise _error(where, name, f"expected a string, got {_kind(value)}")
    if not allow_empty and not value.strip():
        raise _error(where, name, "is empty")
    return value


def _answer_text(record: dict, key: str, where: str) -> str:
    """A reference answer given as a string or a JSON number (AMC's ``27.0`` becomes ``"27"``)."""
    value = record[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else repr(value)
    return _text(record, key, where)


def _reference_or_extracted(record: dict, messages: list[Message], where: str) -> str | None:
    """The record's ``reference_answer`` if present, else one extracted from the last assistant."""
    if record.get("reference_answer") is not None:
        return _answer_text(record, "reference_answer", where)
    replies = [m for m in messages if m.role == "assistant"]
    return extract_final_answer(replies[-1].content) if replies else None


# -------------------------------------------------------------------------------- answer helpers

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _strip_calculator_annotations(text: str) -> str:
    """GSM8K's calculator annotations removed: ``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``."""
    return _CALCULATOR.sub("", text)


def _kind(value: Any) -> str:
    """The JSON type name of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _error(where: str, field: str | None, reason: str) -> DataError:
    """A DataError located at ``where`` (``"path:N"``), with ``path``/``line`` split out."""
    path, sep, line = where.rpartition(":")
    if sep and line.isdigit():
        return DataError(reason, path=path, line=int(line), field=field)
    return DataError(reason, path=where, field=field)
