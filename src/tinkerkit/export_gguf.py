"""GGUF export: a merged Hugging Face model directory as one GGUF file for llama.cpp.

:func:`write_gguf` reads a merged model directory (safetensors, one file or shards, config and
tokenizer, as :func:`tinkerkit.export.merge_adapter` writes it) tensor by tensor and streams it into
one GGUF file through the ``gguf`` library's ``GGUFWriter``; :func:`export_gguf` adds the check:
the file read back by an independent reader, transformers' GGUF loader, must reproduce the merged
model's logits on the fixed check chat of :mod:`tinkerkit.export` within the format's tolerance,
and tokenize that chat to the same ids.

What goes into the file follows llama.cpp's ``convert_hf_to_gguf.py`` and gguf-py's constants
(names and keys of GGUF v3, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

* architectures ``llama`` (Llama, e.g. SmolLM2), ``qwen3`` and ``qwen3moe``; the hyperparameters
  ``{arch}.context_length``, ``embedding_length``, ``block_count``, ``feed_forward_length``,
  ``attention.head_count``/``head_count_kv``, ``attention.key_length``/``value_length`` (the head
  dimension), ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``; for Llama also
  ``vocab_size`` and ``rope.dimension_count``; for Qwen3-MoE ``expert_count``,
  ``expert_used_count`` and ``expert_feed_forward_length``.
* tensor names from gguf-py's ``TensorNameMap`` (``token_embd``, ``blk.N.attn_q``, ...,
  ``output``); a tied output embedding is left out (llama.cpp then reads ``token_embd``). Llama's
  query and key rows are permuted from the Hugging Face rotary layout (the two halves of each
  head) to llama.cpp's interleaved pairs (the converter's ``LlamaModel.permute``); Qwen3 uses the
  NeoX rotary layout, unpermuted. Qwen3-MoE's per-expert ``experts.E.{gate,up,down}_proj`` are
  stacked into ``ffn_{gate,up,down}_exps`` of shape ``[experts, rows, columns]``.
* tensor types as the converter chooses them: 1-D tensors (norms) and the MoE router stay float32;
  the other matrices are float16 (``f16``) or Q8_0 (``q8_0``: blocks of 32 weights as int8 with one
  float16 scale each, ``gguf.quants.quantize``; a matrix whose rows are not a multiple of 32 falls
  back to float16).
* the tokenizer as ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE): tokens, token types
  (normal, control for special added tokens, user-defined for other added tokens, unused for the
  padding rows of the embedding), merges, bos/eos/unk/pad ids, whether a BOS is added, the
  pre-tokenizer by the name llama.cpp knows it (``tokenizer.ggml.pre``, :func:`pre_tokenizer_name`),
  and ``tokenizer.chat_template``.

Example::

    result = export_gguf("exports/gsm8k/merged", "exports/gsm8k/model-q8_0.gguf", "q8_0")
    print(result.path, result.max_logit_diff, result.tolerance)
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from tinkerkit.errors import ConfigError, ExportError
from tinkerkit.export import check_input_ids, moe_routing
from tinkerkit.files import atomic_file, read_json
from tinkerkit.models import load_tokenizer

GGUF_TYPES = ("f16", "q8_0")
"""The GGUF weight types ``tinkerkit export --gguf`` writes."""

_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_MATRIX_TYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}

# config.json model_type -> llama.cpp architecture.
_ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
}

# (headroom factor, relative step of the format); gguf_tolerance says how they were measured.
_TOLERANCE = {"f16": (16.0, 2.0**-11), "q8_0": (32.0, 2.0**-8)}

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)"
                     r"\.weight")


@dataclass
class GGUFResult:
    """What :func:`export_gguf` wrote and measured.

    Attributes:
        path: The GGUF file.
        gguf_type: ``"f16"`` or ``"q8_0"``.
        max_logit_diff: Largest |logit difference| between the GGUF file (read by transformers'
            GGUF loader, float32) and the merged model (float32 compute), on the check chat.
        tolerance: The tolerance that difference was checked against (:func:`gguf_tolerance`).
    """

    path: Path
    gguf_type: str
    max_logit_diff: float
    tolerance: float


def export_gguf(model_dir: str | Path, output_path: str | Path,
                gguf_type: str = "f16") -> GGUFResult:
    """Write a merged model directory as one GGUF file and check it by reading it back.

    The file (:func:`write_gguf`) is staged beside ``output_path`` and renamed into place only
    after the check passes: transformers' GGUF loader (``from_pretrained(..., gguf_file=)``,
    independent of the writer) must load it with a tokenizer that gives the check chat the same
    token ids as the merged model's own tokenizer, and a model whose logits differ from the merged
    model's (its saved weights, float32 compute) by at most :func:`gguf_tolerance`.

    Args:
        model_dir: A merged HF model directory (:func:`tinkerkit.export.merge_adapter`), or any
            Llama / Qwen3 / Qwen3-MoE model directory with a byte-level BPE tokenizer.
        output_path: The ``.gguf`` file to write.
        gguf_type: ``"f16"`` or ``"q8_0"``.

    Returns:
        The path and the check's numbers.

    Raises:
        ConfigError: ``gguf_type`` is not one of :data:`GGUF_TYPES`.
        ExportError: An architecture, rotary scaling or tokenizer that GGUF export does not cover;
            a tensor it cannot place; a file that fails the check (nothing is left at
            ``output_path`` then; an earlier file there is kept).
        ModelError: The model directory or its tokenizer cannot be loaded.
    """
    model_dir, output_path = Path(model_dir), Path(output_path)
    _check_type(gguf_type)
    _architecture(model_dir, _read_config(model_dir))  # refused before anything loads
    input_ids = check_input_ids(load_tokenizer(str(model_dir)))
    with atomic_file(output_path) as staged:
        write_gguf(model_dir, staged, gguf_type)
        routing: dict[str, tuple] = {}  # a Qwen3-MoE's expert choices, replayed in the check
        reference = _model_logits(model_dir, None, input_ids, routing, replay=False)
        with tempfile.TemporaryDirectory(prefix=".gguf-check-", dir=output_path.parent) as alone:
            # The file alone in a directory: transformers would otherwise also read the tokenizer
            # and config files beside it, which then take precedence over the file's metadata.
            readable = Path(alone) / "model.gguf"
            readable.symlink_to(staged.resolve())
            gguf_ids = check_input_ids(load_tokenizer_gguf(readable))
            if not torch.equal(gguf_ids, input_ids):
                first = _first_difference(gguf_ids[0].tolist(), input_ids[0].tolist())
                raise ExportError(f"GGUF export of {model_dir}: the tokenizer read back from the "
                                  f"file tokenizes the check chat differently (first at token "
                                  f"{first}); nothing was written to {output_path}")
            logits = _model_logits(readable.parent, readable.name, input_ids, routing,
                                   replay=True)
        diff = (logits - reference).abs().max().item()
        tolerance = gguf_tolerance(gguf_type, reference)
        if not diff <= tolerance:  # also catches NaN
            raise ExportError(f"GGUF export of {model_dir} ({gguf_type}) failed its check: max "
                              f"|logit difference| {diff:.3g} > tolerance {tolerance:.3g}; "
                              f"nothing was written to {output_path}")
    return GGUFResult(output_path, gguf_type, diff, tolerance)


def gguf_tolerance(gguf_type: str, reference_logits: torch.Tensor) -> float:
    """The largest acceptable |logit difference| between a GGUF file and its merged model.

    ``tolerance = factor * u * max(1, max|reference_logits|)`` as in
    :func:`tinkerkit.export.logit_tolerance`, with ``u`` the format's relative step: float16's unit
    roundoff 2^-11 for ``f16``; for ``q8_0`` 2^-8, as Q8_0 rounds each weight to a step of
    ``amax / 127`` of its block of 32 (an error of at most ``amax / 254``, about 2^-8 of the
    block's largest weight). Measured (docs/MODEL_EXPORT_EVALUATION.md): on the tiny random test
    models (initializer range 0.2, whose logits amplify weight errors more than trained models do)
    the difference was up to 5.8 ``u`` times the scale for f16 and 17.6 for q8_0; the factors 16
    and 32 leave 2.8x and 1.8x headroom there. A broken export (a wrong permutation, a missing
    norm, a misplaced expert) moves the logits by their whole scale.

    Args:
        gguf_type: ``"f16"`` or ``"q8_0"``.
        reference_logits: The merged model's logits, any shape, float32.

    Returns:
        The tolerance in logit units.
    """
    _check_type(gguf_type)
    factor, unit = _TOLERANCE[gguf_type]
    return factor * unit * max(1.0, reference_logits.abs().max().item())


def load_tokenizer_gguf(path: str | Path):
    """The tokenizer transformers rebuilds from a GGUF file's metadata (its GGUF loader).

    Read the file alone in its directory: tokenizer files beside it would take precedence over
    its metadata."""
    path = Path(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def write_gguf(model_dir: str | Path, output_path: str | Path, gguf_type: str = "f16") -> Path:
    """Write a Hugging Face model directory as one GGUF file (no check; see :func:`export_gguf`).

    Tensors are read one at a time from the directory's safetensors (the experts of one layer at a
    time for Qwen3-MoE) and streamed to ``output_path``, so memory holds one tensor besides the
    tokenizer. The file is written in place: callers stage it (:func:`export_gguf` does).

    Args:
        model_dir: An HF model directory: ``config.json``, ``model.safetensors`` or
            ``model.safetensors.index.json`` with its shards, tokenizer files.
        output_path: The file to write.
        gguf_type: ``"f16"`` or ``"q8_0"``.

    Returns:
        ``output_path`` as a Path.

    Raises:
        ConfigError: ``gguf_type`` is not one of :data:`GGUF_TYPES`.
        ExportError: An unsupported architecture, rotary scaling, MoE layout or tokenizer; a
            tensor with no GGUF name; missing or extra expert tensors.
        ModelError: The tokenizer cannot be loaded.
    """
    _check_type(gguf_type)
    model_dir, output_path = Path(model_dir), Path(output_path)
    config = _read_config(model_dir)
    arch = _architecture(model_dir, config)
    tokenizer = load_tokenizer(str(model_dir))
    plan = _tensor_plan(model_dir, config, arch, gguf_type)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_hyperparameters(writer, model_dir, config, arch, gguf_type)
        _add_tokenizer(writer, model_dir, tokenizer, config)
        for tensor in plan:
            dtype, shape = _stored_dtype_and_shape(tensor)
            writer.add_tensor_info(tensor.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize,
                                   raw_dtype=tensor.qtype)
        writer.write_header_to_file(path=output_path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in plan:
            writer.write_tensor_data(_encode(model_dir, tensor))
    finally:
        writer.close()
    return output_path


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE tokenizer's pre-tokenizer.

    llama.cpp splits text before BPE by a regex it chooses from this name (``llama-vocab.cpp``);
    transformers' GGUF loader keeps the same table (``GGUF_PRE_TOKENIZER_SPLITS``), which is
    read here: a ``Split(regex)`` followed by ``ByteLevel`` takes the first name with that regex
    (Qwen2's gives ``qwen2``). A bare ``ByteLevel`` with GPT-2's regex is ``smollm`` (GPT-2's
    regex with each digit apart, SmolLM's) when no merge holds an ASCII digit, so that both split
    alike, and ``gpt-2`` otherwise; ``Digits(individual)`` + ``ByteLevel`` is ``smollm``.

    Raises:
        ExportError: Another pre-tokenizer (the message shows it).
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        merges = backend.get("model", {}).get("merges", [])
        # ASCII digits: in the byte-level alphabet they stand for themselves (str.isdigit would
        # also take the byte symbols ², ³ and ¹)
        digit_merges = any(any(ch in "0123456789" for ch in "".join(_merge_pair(m)))
                           for m in merges)
        return "gpt-2" if digit_merges else "smollm"
    raise ExportError(f"tokenizer pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name "
                      "that tinkerkit knows; GGUF export supports Qwen2/Qwen3-style, Llama-3-style "
                      "and GPT-2/SmolLM-style byte-level BPE tokenizers")


# -- tensors ------------------------------------------------------------------------------------

@dataclass
class _PlannedTensor:
    """One GGUF tensor: its name, NumPy-order shape, stored type and a loader of its values."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]


def _tensor_plan(model_dir: Path, config: dict, arch, gguf_type: str) -> list[_PlannedTensor]:
    """The tensors of the GGUF file, in order, with their types and loaders (nothing read yet)."""
    sources = _TensorSources(model_dir)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    experts: dict[tuple[int, str], dict[int, str]] = {}
    plan = []
    for key in sources:
        if match := _EXPERT.fullmatch(key):
            layer, expert, which = match.groups()
            experts.setdefault((int(layer), which), {})[int(expert)] = key
            continue
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reads a tied output from token_embd
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{model_dir}: tensor '{key}' has no GGUF name for architecture "
                              f"{gguf.MODEL_ARCH_NAMES[arch]}; GGUF export does not cover it")
        shape = sources.shape(key)
        plan.append(_PlannedTensor(name, shape, _qtype(name, shape, gguf_type),
                                   _loader(sources, [key], _row_permutation(key, config, arch))))
    for (layer, which), by_index in sorted(experts.items()):
        count = _expert_count(config)
        if sorted(by_index) != list(range(count or 0)):
            raise ExportError(f"{model_dir}: layer {layer} {which} has experts {sorted(by_index)}; "
                              f"config.json says {count} experts")
        stacked = f"model.layers.{layer}.mlp.experts.{which}"
        name = names.get_name(stacked, try_suffixes=(".weight",)) or ""
        keys = [by_index[e] for e in range(count)]
        shape = (count, *sources.shape(keys[0]))
        plan.append(_PlannedTensor(f"{name}.weight", shape, _qtype(name, shape, gguf_type),
                                   _loader(sources, keys, None)))
    return plan


def _qtype(name: str, shape: tuple[int, ...], gguf_type: str) -> gguf.GGMLQuantizationType:
    """float32 for 1-D tensors and the MoE router (as llama.cpp's converter keeps them), else the
    requested type; Q8_0 falls back to float16 for rows that are not a multiple of its block."""
    if len(shape) == 1 or ".ffn_gate_inp." in name:
        return gguf.GGMLQuantizationType.F32
    qtype = _MATRIX_TYPES[gguf_type]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _stored_dtype_and_shape(tensor: _PlannedTensor) -> tuple[np.dtype, tuple[int, ...]]:
    """What ``GGUFWriter.add_tensor_info`` takes: float arrays as they are, quantized ones as
    their bytes (uint8, the last dimension in bytes)."""
    if tensor.qtype == gguf.GGMLQuantizationType.F32:
        return np.dtype(np.float32), tensor.shape
    if tensor.qtype == gguf.GGMLQuantizationType.F16:
        return np.dtype(np.float16), tensor.shape
    return np.dtype(np.uint8), gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype)


def _encode(model_dir: Path, tensor: _PlannedTensor) -> np.ndarray:
    """The tensor's values in its stored type (``gguf.quants.quantize``); non-finite refused."""
    values = tensor.load()
    if not np.isfinite(values).all():
        raise ExportError(f"{model_dir}: tensor {tensor.name} holds "
                          f"{int((~np.isfinite(values)).sum())} NaN or infinite values; refusing "
                          "to write it to GGUF")
    return gguf.quants.quantize(values, tensor.qtype)


def _row_permutation(key: str, config: dict, arch) -> int | None:
    """For Llama's query and key projections, the head count to permute rows by, else None."""
    if arch != gguf.MODEL_ARCH.LLAMA:
        return None
    heads = config["num_attention_heads"]
    if key.endswith("self_attn.q_proj.weight"):
        return heads
    if key.endswith("self_attn.k_proj.weight"):
        return config.get("num_key_value_heads") or heads
    return None


def _llama_rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a Llama query/key projection from HF's rotary layout to llama.cpp's.

    HF's rotary embedding rotates the first half of each head's dimensions against the second
    half; llama.cpp (GPT-J style for the ``llama`` architecture) rotates adjacent pairs. Within
    each head the row order ``[0, 1, ..., d/2-1, d/2, ..., d-1]`` becomes ``[0, d/2, 1, d/2+1,
    ...]`` (llama.cpp ``convert_hf_to_gguf.py``, ``LlamaModel.permute``).

    Args:
        weight: ``[heads * head_dim, in_features]``, float32.
        heads: Heads of this projection (key/value heads for the key projection).
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


class _TensorSources:
    """The tensors of a model directory's safetensors (one file or an index of shards), by key."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index)["weight_map"]
            self.files = {key: model_dir / name for key, name in weight_map.items()}
        elif (model_dir / "model.safetensors").is_file():
            with safe_open(model_dir / "model.safetensors", framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), model_dir / "model.safetensors")
        else:
            raise ExportError(f"{model_dir}: no model.safetensors or "
                              "model.safetensors.index.json; not a merged model directory")

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self.files[key], framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def load(self, key: str) -> np.ndarray:
        """The tensor as float32 NumPy (bfloat16 has no NumPy type; float32 holds it exactly)."""
        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key).to(torch.float32).numpy()


def _loader(sources: _TensorSources, keys: list[str], permute_heads: int | None):
    def load() -> np.ndarray:
        if len(keys) > 1:  # experts, stacked [experts, rows, columns]
            return np.stack([sources.load(key) for key in keys])
        values = sources.load(keys[0])
        return values if permute_heads is None else _llama_rope_permute(values, permute_heads)
    return load


# -- metadata -----------------------------------------------------------------------------------

def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: no config.json; not a merged model directory")
    return read_json(path)


def _architecture(model_dir: Path, config: dict):
    model_type = config.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ExportError(f"{model_dir / 'config.json'}: model_type '{model_type}' is not "
                          f"supported by GGUF export; supported: {', '.join(_ARCHITECTURES)}")
    if model_type == "qwen3_moe":
        layers = config["num_hidden_layers"]
        dense = config.get("mlp_only_layers") or []
        step = config.get("decoder_sparse_step", 1)
        if dense or step != 1 or not config.get("norm_topk_prob", False):
            # llama.cpp's qwen3moe graph has experts in every layer and renormalizes the
            # top-k routing weights (norm_topk_prob) without a key that says otherwise.
            raise ExportError(f"{model_dir / 'config.json'}: a Qwen3-MoE with dense layers "
                              f"(mlp_only_layers {dense}, decoder_sparse_step {step}) or "
                              f"norm_topk_prob false has no llama.cpp equivalent ({layers} layers)")
    return _ARCHITECTURES[model_type]


def _expert_count(config: dict) -> int | None:
    """Experts per MoE layer (transformers 5 saves ``num_local_experts``, earlier ``num_experts``)."""
    return config.get("num_local_experts") or config.get("num_experts")


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_theta(model_dir: Path, config: dict) -> float:
    """The rotary base; only unscaled rotary embeddings are written (no key for the others)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"{model_dir / 'config.json'}: rotary scaling '{rope_type}' is not "
                          "written by GGUF export; only unscaled RoPE is supported")
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ExportError(f"{model_dir / 'config.json'}: no rope_theta")
    return float(theta)


def _add_hyperparameters(writer: gguf.GGUFWriter, model_dir: Path, config: dict, arch,
                         gguf_type: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(config.get("_name_or_path") or model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_rope_freq_base(_rope_theta(model_dir, config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(_head_dim(config))
    if arch == gguf.MODEL_ARCH.QWEN3MOE:
        writer.add_expert_count(_expert_count(config))
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_file_type(_FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, tokenizer, config: dict) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if (backend.get("model") or {}).get("type") != "BPE":
        raise ExportError(f"{model_dir}: the tokenizer is not byte-level BPE; GGUF export "
                          "writes tokenizer.ggml.model 'gpt2' only")
    tokens, types = _vocabulary(model_dir, tokenizer, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(_merge_pair(m)) for m in backend["model"]["merges"]])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.get(
        "bos_token_id")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.get(
        "eos_token_id")
    for add, token_id in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if isinstance(token_id, int):
            add(token_id)
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    writer.add_add_bos_token(adds_bos)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _vocabulary(model_dir: Path, tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp token types, padded to the embedding's rows."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"{model_dir}: the tokenizer has id {max(by_id)} but the embedding only "
                          f"{vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merge_pair(merge) -> tuple[str, str]:
    """A tokenizer.json merge (``"a b"`` or ``["a", "b"]``) as a pair."""
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)


# -- check --------------------------------------------------------------------------------------

# GGUF keys that transformers' GGUF config mapping (5.24) leaves out for these architectures,
# taking a default instead (Qwen3's head_dim 128, Qwen3-MoE's expert width 768): read from the
# file here, so that models of other widths load as the file describes them.
_KEYS_TRANSFORMERS_SKIPS = {
    "qwen3": {"attention.key_length": "head_dim"},
    "qwen3moe": {"attention.key_length": "head_dim",
                 "expert_feed_forward_length": "moe_intermediate_size"},
}


def gguf_config(path: str | Path):
    """The transformers config of a GGUF file: transformers' own GGUF mapping, plus the keys it
    skips for Qwen3 and Qwen3-MoE (:data:`_KEYS_TRANSFORMERS_SKIPS`), read from the file."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    for key, attribute in _KEYS_TRANSFORMERS_SKIPS.get(arch, {}).items():
        field = reader.fields.get(f"{arch}.{key}")
        if field is not None:
            setattr(config, attribute, int(field.contents()))
    return config


def _model_logits(directory: Path, gguf_file: str | None, input_ids: torch.Tensor,
                  routing: dict[str, tuple], replay: bool) -> torch.Tensor:
    """Logits of a model directory, or of a GGUF file in it, in float32: shape (1, T, vocab).

    A mixture-of-experts model records its routing into ``routing`` (``replay`` False) or is
    routed as recorded (True; :func:`tinkerkit.export.moe_routing`): Q8_0's rounding can move a
    token whose two best experts score almost alike to another expert, which changes its logits
    by far more than the rounding of the weights. Replaying the merged model's choices, the check
    measures the file's weights alone.
    """
    kwargs = {}
    if gguf_file:
        kwargs = {"gguf_file": gguf_file, "config": gguf_config(directory / gguf_file)}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    with torch.no_grad(), moe_routing(model, routing, replay):
        return model.eval()(input_ids).logits.float()


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _check_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf '{gguf_type}' is not supported; use one of "
                          f"{', '.join(GGUF_TYPES)}")

