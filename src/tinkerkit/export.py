"""Export LoRA adapters: a self-contained PEFT adapter, and a merged HF model, streamed.

The input is a tinkerkit checkpoint (layout in :mod:`tinkerkit.checkpoint`), a ``tinker://``
checkpoint, or any adapter directory in PEFT's or Tinker's layout (``adapter_config.json`` with
``r``, ``lora_alpha`` and ``base_model_name_or_path``, a hub id or a local path, plus
``adapter_model.safetensors``). Export validates it and writes what a user ships::

    <output_dir>/adapter/   adapter_config.json (base model as hub id), adapter_model.safetensors
                            (PEFT key layout, float32), tokenizer + chat template, README.md
    <output_dir>/adapter-vllm/  (MoE adapters only) the same adapter with one 2-D pair per expert
    <output_dir>/merged/    the base checkpoint's shards, same names and keys, with the LoRA
                            deltas merged (one dtype), its index json, config.json,
                            generation_config.json, tokenizer + chat template, README.md

Tinker's adapter names map to the model's (:func:`tinkerkit.engines.local.model.read_adapter`):
``model.unembed_tokens`` is ``lm_head`` (a tied model's input embedding is the weight it reads,
and the merge unties it); an expert's ``w1``/``w3``/``w2`` are its gate/up/down projections.
Tinker stores the experts of a layer as one 3-D pair per projection, ``lora_A [E or 1, r, in]``
and ``lora_B [E or 1, out, r]``, a leading 1 being a factor shared by all experts.

The merge streams (:func:`merge_adapter`): the base model's safetensors shards are read one at
a time, each tensor the adapter touches gets ``W + (alpha / r) * B @ A`` (LoRA, Hu et al. 2021,
arXiv 2106.09685, §4.1; :func:`~tinkerkit.engines.local.model.lora_delta`) in float32 arithmetic,
cast once to the output dtype and checked against a float64 reference (:func:`check_merged`),
and the shard is written and freed: peak memory is about one shard plus the adapter, whatever
the model's size. A delta lands in the checkpoint's own layout: per-expert keys
(``experts.{e}.gate_proj.weight``, Qwen3-MoE's checkpoints) or fused ones
(``experts.gate_up_proj [E, 2I, H]``, gate rows first, and ``experts.down_proj [E, H, I]``,
transformers 5's in-memory layout). When the model fits in memory, the merged model, read back
from disk, must also reproduce the logits of base + adapter (as the local engine applies it) on
a fixed chat within a tolerance derived from the dtype's rounding (:func:`logit_tolerance`).

A ``tinker://`` checkpoint is first downloaded through the Tinker SDK into a PEFT adapter
(:func:`tinkerkit.engines.tinker.download_adapter`: ``save_weights_external``, then the files of
``get_external_weights_urls``, names and archives checked by :mod:`tinkerkit.archive`), and then
exported and merged exactly as a local one.

Example::

    result = export_checkpoint("runs/gsm8k/checkpoints/step_000100", "exports/gsm8k", merge=True)
    print(result.adapter_dir, result.merged_dir, result.max_logit_diff, result.tolerance)
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil
import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora.layer import ParamWrapper
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from tinkerkit.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATE_FILE,
    is_tinker_path,
    read_checkpoint_meta,
)
from tinkerkit.engines.local.model import (
    DTYPE_ALIASES,
    EXPERTS,
    PEFT_PREFIX,
    TINKER_EXPERT_PROJECTIONS,
    Adapter,
    apply_adapter,
    base_model_of,
    load_model,
    lora_delta,
    read_adapter,
    torch_dtype,
)
from tinkerkit.engines.tinker import download_adapter
from tinkerkit.errors import CheckpointError, ConfigError, ExportError, ModelError
from tinkerkit.files import atomic_directory, atomic_write_json, atomic_write_text
from tinkerkit.models import hub_id_of, load_pretrained, load_tokenizer, resolve_model

EXPORT_DTYPES = tuple(DTYPE_ALIASES)
"""The merged model's dtype names (``EXPORT_DTYPE``, ``--dtype``): ``fp32``, ``bf16``, ``fp16``."""

# Headroom over u * (logit scale); logit_tolerance says how these were measured and chosen.
_ROUNDOFF_FACTOR = {"bf16": 8.0, "fp16": 8.0, "fp32": 2.0**10}

# The fixed conversation on which a merge is checked (rendered with the model's chat template).
_CHECK_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. "
                                "How many clips did she sell altogether?"},
    {"role": "assistant", "content": "In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72."},
]

SAFE_INDEX = "model.safetensors.index.json"
"""transformers' index of a sharded checkpoint (``weight_map``: tensor key -> shard file)."""
_SINGLE_FILE = "model.safetensors"
_BLOCK_ELEMENTS = 2**22
"""Elements of a merged tensor handled at once: the float32 and float64 temporaries of a block
(the merge and its check) stay near 0.2 GiB, whatever the tensor's size."""
_LOGIT_CHECK_MEMORY_FACTOR = 2.5
"""The logit check holds base + adapter in float32, then the merged model upcast to float32:
about 2.5 times the float32 model, which must fit in the available memory for it to run."""
_EXPERTS = re.compile(r"^(?P<experts>.+\.experts)\.(?P<w>w[123])$")
_GATE_UP = r"experts\.gate_up_proj"  # PEFT's rank/alpha pattern of the fused gate/up experts
VLLM_ADAPTER_DIR = "adapter-vllm"
"""The directory of the per-expert (2-D keys) copy of an MoE adapter, beside ``adapter/``."""


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote.

    Attributes:
        adapter_dir: The PEFT adapter directory.
        merged_dir: The merged HF model directory, or None when no merge was asked for.
        max_logit_diff: Largest |logit difference|, merged vs base + adapter (None: no merge, or
            the check was skipped).
        tolerance: The tolerance that difference was checked against (None: likewise).
        dtype: The merged model's dtype, ``"bf16"``/``"fp16"``/``"fp32"`` (None: no merge).
        logit_check_skipped: Why the logit check did not run (``--no-logit-check``, or a model
            too large for memory); None when it ran or there was no merge.
        merged_tensors: Base tensors the merge changed, each checked against the float64
            reference (:func:`check_merged`).
        vllm_adapter_dir: The per-expert copy of an MoE adapter (None for a dense adapter).
    """

    adapter_dir: Path
    merged_dir: Path | None = None
    max_logit_diff: float | None = None
    tolerance: float | None = None
    dtype: str | None = None
    logit_check_skipped: str | None = None
    merged_tensors: int = 0
    vllm_adapter_dir: Path | None = None


class MergeResult(NamedTuple):
    """What :func:`merge_adapter` wrote and measured.

    Attributes:
        merged_dir: The merged model directory.
        max_logit_diff: Largest |logit difference| against base + adapter, logit units (None:
            the check was skipped).
        tolerance: Its tolerance (:func:`logit_tolerance`; None: skipped).
        logit_check_skipped: Why the logit check was skipped, or None.
        merged_tensors: Base tensors the merge changed (each checked by :func:`check_merged`).
    """

    merged_dir: Path
    max_logit_diff: float | None
    tolerance: float | None
    logit_check_skipped: str | None
    merged_tensors: int


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, merge: bool = False,
                      dtype: str = "bf16", base_url: str | None = None,
                      base_model: str | None = None, logit_check: bool = True) -> ExportResult:
    """Export a checkpoint to ``output_dir/adapter`` and, with ``merge``, ``output_dir/merged``.

    Args:
        checkpoint: A tinkerkit checkpoint directory, an adapter directory in PEFT's or Tinker's
            layout, or a ``tinker://`` checkpoint (downloaded first into a temporary directory
            inside ``output_dir``, removed afterwards).
        output_dir: Parent directory of the exports (created if needed).
        merge: Also write a merged model (see :func:`merge_adapter`).
        dtype: The merged model's dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        base_url: The Tinker server of a ``tinker://`` checkpoint (None: ``$TINKER_BASE_URL``,
            else the hosted service).
        base_model: The base model (``--model``), for an adapter that records none, or another
            copy of the recorded one (see :func:`merge_adapter`).
        logit_check: Run the merged model's logit check when the model fits in memory
            (``--no-logit-check`` turns it off; every merged tensor is checked either way).

    Returns:
        The paths written and, with ``merge``, the merge check's numbers.

    Raises:
        ConfigError: ``dtype`` is not one of the above; no ``TINKER_API_KEY`` for a
            ``tinker://`` checkpoint.
        CheckpointError: The checkpoint is missing, incomplete or unreadable (a config without
            ``r`` or ``lora_alpha``); a download holds unsafe file names or archive members.
        EngineError: The Tinker server cannot be reached or refuses the download.
        ExportError: Non-finite weights, an adapter that does not fit its base model (a key that
            lands nowhere, a shape that does not fit), or a merge that fails its checks.
        ModelError: The base model or its tokenizer cannot be loaded.
    """
    _check_dtype(dtype)
    output_dir = Path(output_dir)
    if not is_tinker_path(str(checkpoint)):
        source = Path(checkpoint).resolve()
        if output_dir.resolve() == source or output_dir.resolve().is_relative_to(source):
            raise ExportError(f"--output {output_dir}: inside the checkpoint {checkpoint}; "
                              "export next to it, not into it")
        return _export(Path(checkpoint), output_dir, merge, dtype, base_model, logit_check)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=output_dir) as download:
        download_adapter(str(checkpoint), Path(download), base_url)
        return _export(Path(download), output_dir, merge, dtype, base_model, logit_check)


def _export(source: Path, output_dir: Path, merge: bool, dtype: str,
            base_model: str | None, logit_check: bool) -> ExportResult:
    adapter = _read_adapter(source)
    adapter_dir = export_adapter(source, output_dir / "adapter", base_model)
    vllm_dir = None
    if any(_EXPERTS.match(module) for module in _lora_pairs(adapter)):
        vllm_dir = export_vllm_adapter(source, output_dir / VLLM_ADAPTER_DIR, base_model)
    if not merge:
        return ExportResult(adapter_dir=adapter_dir, vllm_adapter_dir=vllm_dir)
    merged = merge_adapter(source, output_dir / "merged", dtype=dtype, base_model=base_model,
                           logit_check=logit_check)
    return ExportResult(adapter_dir, merged.merged_dir, merged.max_logit_diff, merged.tolerance,
                        dtype, merged.logit_check_skipped, merged.merged_tensors, vllm_dir)


# ------------------------------------------------------------------------------ adapter/


def export_adapter(checkpoint: str | Path, output_dir: str | Path,
                   base_model: str | None = None) -> Path:
    """Write a self-contained PEFT adapter directory from a checkpoint or adapter directory.

    The directory holds ``adapter_config.json`` (``base_model_name_or_path`` is the base model's hub
    id when tinkerkit knows one, :func:`tinkerkit.models.hub_id_of`), ``adapter_model.safetensors``
    (float32, PEFT key layout), the base model's tokenizer files with its chat template, and a
    README.md model card; no optimizer state. It loads with ``PeftModel.from_pretrained(base,
    output_dir)``. Written atomically: an existing ``output_dir`` is replaced only when the new one
    is complete.

    Dense LoRA tensors are written unchanged (Tinker's ``model.unembed_tokens`` as ``lm_head``).
    Expert pairs in Tinker's layout become PEFT's ``target_parameters`` LoRA on transformers 5's
    fused expert parameters (:func:`peft_expert_tensors`).

    Args:
        checkpoint: A tinkerkit checkpoint directory, or an adapter directory in PEFT's or
            Tinker's layout; its base model comes from ``tinkerkit_state.json``, else from
            ``adapter_config.json`` (a registry model's hub id maps to its name).
        output_dir: The adapter directory to write.
        base_model: Overrides the recorded base model (see :func:`merge_adapter`).

    Returns:
        ``output_dir`` as a Path.

    Raises:
        CheckpointError: The checkpoint is missing, incomplete, unreadable, not in PEFT's key
            layout, or its adapter config disagrees with ``tinkerkit_state.json`` (rank, alpha).
        ExportError: A weight is NaN or infinite (the message names the tensor); expert pairs
            that do not fit the base model's experts.
        ModelError: The base model's tokenizer (or, for experts, its config) cannot be loaded.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    adapter = _read_adapter(checkpoint)
    base_model = _base_model(checkpoint, base_model)
    tokenizer = load_tokenizer(base_model)
    pairs = _lora_pairs(adapter)
    if any(_EXPERTS.match(module) for module in pairs):
        config, tensors = peft_expert_tensors(adapter, base_model)
    else:
        config, tensors = adapter.config, adapter.tensors
    config.base_model_name_or_path = hub_id_of(base_model)
    config.inference_mode = True  # as PeftModel.save_pretrained records it
    with atomic_directory(output_dir) as staging:
        _save_tensors(tensors, staging / ADAPTER_WEIGHTS)
        atomic_write_json(staging / ADAPTER_CONFIG, _config_dict(config))
        tokenizer.save_pretrained(staging)
        atomic_write_text(staging / "README.md", _model_card(config))
    return output_dir


def peft_expert_tensors(adapter: Adapter, base_model: str) -> tuple[LoraConfig, dict]:
    """An adapter with Tinker-layout expert pairs as PEFT ``target_parameters`` LoRA.

    transformers 5 holds a layer's experts as two fused parameters, ``experts.gate_up_proj
    [E, 2I, H]`` (gate rows, then up rows) and ``experts.down_proj [E, H, I]``. PEFT 0.21 adapts
    such a 3-D parameter with one pair for all experts (``peft.tuners.lora.layer.ParamWrapper``):
    ``lora_A [E·R, in]`` whose rows ``e·R .. e·R+R-1`` are expert e's ``A_e [R, in]``, and
    ``lora_B [out, R·E]`` whose column ``k·E + e`` is column k of expert e's ``B_e [out, R]``
    (``get_delta_weight``: ``einsum("o r e, e r i -> e o i")`` for these ``[E, out, in]``
    parameters), scaled by ``lora_alpha / R``.

    Gate (w1) and up (w3) both adapt ``gate_up_proj``: with ``R = 2r``, ``A_e = [A1_e; A3_e]``
    and ``B_e = [[B1_e, 0], [0, B3_e]]`` give ``B_e A_e = [B1_e A1_e; B3_e A3_e]`` exactly;
    ``rank_pattern``/``alpha_pattern`` set ``2r``/``2·alpha`` on ``experts.gate_up_proj`` (PEFT
    matches them against the parameter's key), so its scale stays ``alpha / r``. Down (w2) keeps
    rank r. A shared factor (leading 1) is repeated for each expert. Dense pairs are kept as
    they are.

    Args:
        adapter: The adapter (:func:`~tinkerkit.engines.local.model.read_adapter`).
        base_model: Its base model (its config gives the module names; nothing is loaded).

    Returns:
        ``(LoraConfig, {PEFT key: float32 tensor})``.

    Raises:
        ExportError: Expert pairs whose shapes do not fit the model's experts, expert keys the
            model has no experts for, or an rsLoRA adapter.
        ModelError: The base model's config cannot be loaded.
    """
    rank, alpha = adapter.config.r, adapter.config.lora_alpha
    if adapter.config.use_rslora:  # PEFT refuses rank patterns with rsLoRA
        raise ExportError(f"{adapter.path / ADAPTER_CONFIG}: field 'use_rslora' is true; expert "
                          "LoRA with rsLoRA has no PEFT target_parameters form (PEFT refuses "
                          "rank patterns with rsLoRA)")
    pairs = _lora_pairs(adapter)
    experts = {m: p for m, p in pairs.items() if _EXPERTS.match(m)}
    config = LoraConfig(
        r=rank, lora_alpha=alpha,
        target_modules=sorted(set(adapter.config.target_modules or ()) - {EXPERTS}) or None,
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        rank_pattern={_GATE_UP: 2 * rank}, alpha_pattern={_GATE_UP: 2 * alpha})
    model_config = load_pretrained(AutoConfig.from_pretrained, base_model)
    with torch.device("meta"), warnings.catch_warnings():
        # PEFT matches the patterns against the parameter's key ("...experts.gate_up_proj") but
        # warns that they match no module name
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match.*")
        skeleton = get_peft_model(AutoModelForCausalLM.from_config(model_config), config)
    wanted = get_peft_model_state_dict(skeleton, save_embedding_layers=False)
    # "base_model.model.<layer>.mlp.experts.gate_up_proj" -> the saved name of its wrapper
    # (one parameter's wrapper nests in the other's: "...experts.base_layer")
    wrappers = {f"{name.replace('.base_layer', '')}.{m.parameter_name}": name
                for name, m in skeleton.named_modules() if isinstance(m, ParamWrapper)}
    tensors = {k: v for k, v in adapter.tensors.items()
               if not _EXPERTS.match(k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0])}
    layers = {_EXPERTS.match(m)["experts"] for m in experts}
    for prefix in sorted(layers):
        for parameter, names in (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))):
            module = wrappers.get(f"{PEFT_PREFIX}{prefix}.{parameter}")
            if module is None:
                raise ExportError(f"{adapter.path / ADAPTER_WEIGHTS}: '{PEFT_PREFIX}{prefix}."
                                  f"{names[0]}.lora_A.weight' lands nowhere: base model "
                                  f"'{base_model}' has no {parameter} parameter at {prefix}")
            key_a, key_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
            out = wanted[key_b].shape[0]
            halves = [slice(i * out // len(names), (i + 1) * out // len(names))
                      for i in range(len(names))]
            parts = [(f"{PEFT_PREFIX}{prefix}.{w}.lora_A.weight", experts.get(f"{prefix}.{w}"),
                      rows) for w, rows in zip(names, halves)]
            if all(pair is None for _, pair, _ in parts):
                tensors[key_a], tensors[key_b] = (torch.zeros(wanted[key_a].shape),
                                                  torch.zeros(wanted[key_b].shape))
                continue
            tensors[key_a], tensors[key_b] = _stack_peft_pair(
                parts, skeleton.get_submodule(module).num_experts, wanted[key_a].shape,
                wanted[key_b].shape, adapter.path / ADAPTER_WEIGHTS, base_model)
    missing = sorted(wanted.keys() - tensors.keys())
    if missing:
        raise ExportError(f"{adapter.path / ADAPTER_WEIGHTS}: no LoRA weights for the PEFT key "
                          f"'{missing[0]}' of base model '{base_model}'")
    return config, tensors


def _stack_peft_pair(parts: list[tuple[str, dict | None, slice]], experts: int, a_shape,
                     b_shape, file: Path, base: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(lora_A [E·R, in], lora_B [out, R·E])`` of a fused expert parameter of
    ``experts`` experts from Tinker pairs ``(adapter key, pair, rows)``, each adding to a slice
    of the ``out`` rows (pair None: a part the adapter leaves alone); their ranks fill ``R`` side
    by side, the rest stays zero (block-diagonal, exact)."""
    out, rank = b_shape[0], b_shape[1] // experts
    a = torch.zeros(experts, rank, a_shape[1])
    b = torch.zeros(out, rank, experts)
    col = 0
    for key, pair, rows in parts:
        if pair is None:
            continue
        lora_a, lora_b = pair["A"].float(), pair["B"].float()
        _check_experts(lora_a, lora_b, experts, file, key)
        r, part_rows = lora_a.shape[-2], len(range(out)[rows])
        if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[-1] != a_shape[1] or (
                lora_b.shape[1] != part_rows or lora_b.shape[-1] != r or col + r > rank):
            raise ExportError(f"{file}: '{key}' does not fit base model '{base}': lora_A "
                              f"{list(lora_a.shape)} and lora_B {list(lora_b.shape)} against "
                              f"its experts' [{experts}, {part_rows}, {a_shape[1]}]")
        a[:, col:col + r] = lora_a.expand(experts, -1, -1)
        b[rows, col:col + r] = lora_b.expand(experts, -1, -1).permute(1, 2, 0)
        col += r
    return a.reshape(experts * rank, -1), b.reshape(out, rank * experts)


def export_vllm_adapter(checkpoint: str | Path, output_dir: str | Path,
                        base_model: str | None = None) -> Path:
    """Write an MoE adapter with one 2-D pair per expert and projection, as vLLM loads it.

    Keys ``base_model.model.<layer>.mlp.experts.{e}.{gate_proj|up_proj|down_proj}.lora_A.weight``
    ``[r, in]`` and ``.lora_B.weight`` ``[out, r]`` (a shared factor repeated for each expert),
    the layout vLLM's fused-MoE LoRA reads and the one Qwen3-MoE checkpoints name their experts
    in; dense pairs unchanged. ``target_modules`` lists the dense names and the three projections.

    Raises:
        As :func:`export_adapter`.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    adapter = _read_adapter(checkpoint)
    base_model = _base_model(checkpoint, base_model)
    tensors = {}
    for module, pair in _lora_pairs(adapter).items():
        match = _EXPERTS.match(module)
        if match is None:
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = pair["A"]
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = pair["B"]
            continue
        projection = TINKER_EXPERT_PROJECTIONS[match["w"]]
        experts = max(pair["A"].shape[0], pair["B"].shape[0])
        for e in range(experts):
            stem = f"{PEFT_PREFIX}{match['experts']}.{e}.{projection}"
            tensors[f"{stem}.lora_A.weight"] = _expert(pair["A"], e).clone()
            tensors[f"{stem}.lora_B.weight"] = _expert(pair["B"], e).clone()
    config = LoraConfig(r=adapter.config.r, lora_alpha=adapter.config.lora_alpha,
                        use_rslora=adapter.config.use_rslora,
                        target_modules=sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0]
                                              .rsplit(".", 1)[-1] for k in tensors}),
                        base_model_name_or_path=hub_id_of(base_model), inference_mode=True)
    with atomic_directory(output_dir) as staging:
        _save_tensors(tensors, staging / ADAPTER_WEIGHTS)
        atomic_write_json(staging / ADAPTER_CONFIG, _config_dict(config))
        load_tokenizer(base_model).save_pretrained(staging)
    return output_dir


def _expert(factor: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s 2-D factor of a Tinker 3-D factor (a leading 1 is shared by all)."""
    return factor[0 if factor.shape[0] == 1 else e]


# ------------------------------------------------------------------------------- merged/


def merge_adapter(checkpoint_or_adapter: str | Path, output_dir: str | Path, dtype: str = "bf16",
                  base_model: str | None = None, logit_check: bool = True) -> MergeResult:
    """Merge a LoRA adapter into its base model's checkpoint, shard by shard, and check it.

    Streaming: each safetensors shard of the base model is read (``safe_open``), every tensor
    the adapter touches is merged in float32 and cast once to ``dtype`` (the others are cast),
    each merged tensor is checked against its float64 reference (:func:`check_merged`), and the
    shard is written under its own name and freed; then the index json, ``config.json`` (dtype;
    ``tie_word_embeddings: false`` when the adapter changes a tied output head),
    ``generation_config.json``, the tokenizer with its chat template and a README.md. Peak
    memory is about one shard plus the adapter. The directory is written atomically.

    Then, unless ``logit_check`` is False or the model is too large for the available memory
    (about 2.5 times its float32 size), the saved model is loaded back in ``dtype``, upcast to
    float32, and its logits compared with those of base + adapter in float32 as the local engine
    applies it (:func:`~tinkerkit.engines.local.model.apply_adapter`) on a fixed short chat.

    Tied input/output embeddings (e.g. SmolLM2) stay tied unless the adapter changes the output
    head (``lm_head``, Tinker's ``unembed_tokens``); then ``lm_head.weight`` is written, the
    embedding plus the delta, beside the unchanged input embedding.

    Args:
        checkpoint_or_adapter: A tinkerkit checkpoint or an adapter directory (PEFT's or
            Tinker's layout).
        output_dir: The merged model directory to write.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        base_model: Overrides the base model (registry name, local directory or hub id in the
            local Hugging Face cache). By default a checkpoint's ``base_model`` from
            ``tinkerkit_state.json``; for an adapter directory its ``base_model_name_or_path``,
            mapped back to the registry name when it is the hub id of a registry model.
        logit_check: Run the end-to-end logit check when the model fits in memory.

    Returns:
        A :class:`MergeResult`.

    Raises:
        ConfigError: ``dtype`` is not one of the above.
        CheckpointError: The checkpoint or adapter is missing, incomplete or unreadable.
        ExportError: Non-finite adapter or merged weights (the tensor is named), an adapter that
            does not fit the base model (the adapter file and key are named), a merged tensor
            off its reference, or a logit difference above the tolerance. Nothing is left at
            ``output_dir`` in that case (an earlier export there is kept).
        ModelError: The base model or its tokenizer cannot be loaded, or it has no safetensors
            weights on disk.

    Example::

        result = merge_adapter("exports/gsm8k/adapter", "exports/gsm8k/merged-fp16",
                               dtype="fp16", base_model="smollm2-135m-instruct")
    """
    _check_dtype(dtype)
    source, output_dir = Path(checkpoint_or_adapter), Path(output_dir)
    adapter = _read_adapter(source)
    base_name = _base_model(source, base_model)
    base_dir = base_checkpoint_dir(base_name)
    tokenizer = load_tokenizer(base_name)
    with atomic_directory(output_dir) as staging:
        merged, untied, fp32_bytes = stream_merge(adapter, base_dir, staging, dtype)
        _save_configs(base_dir, staging, dtype, untied)
        tokenizer.save_pretrained(staging)
        skipped = _logit_check_skipped(logit_check, fp32_bytes)
        diff = tolerance = None
        if skipped is None:
            diff, tolerance = _logit_check(adapter, base_name, staging, dtype, tokenizer)
            if not diff <= tolerance:  # also catches NaN
                raise ExportError(f"merge of {source} into {base_name} failed its check: max "
                                  f"|logit difference| {diff:.3g} > tolerance {tolerance:.3g} "
                                  f"({dtype}); nothing was written to {output_dir}")
        atomic_write_text(staging / "README.md", _merged_card(
            hub_id_of(base_name), adapter, dtype, merged, diff, tolerance, skipped))
    return MergeResult(output_dir, diff, tolerance, skipped, merged)


def base_checkpoint_dir(base_model: str) -> Path:
    """The local directory of a base model's checkpoint (registry name, directory, or a hub id
    in the local Hugging Face cache; nothing is downloaded here).

    Raises:
        ModelError: The name does not resolve, or a hub id is not in the local cache.
    """
    resolved = resolve_model(base_model)
    if isinstance(resolved, Path):
        return resolved
    try:
        return Path(snapshot_download(resolved, local_files_only=True))
    except Exception as e:  # huggingface_hub raises several types for "not cached"
        raise ModelError(f"model '{base_model}' is not in the local Hugging Face cache; download "
                         "it first (huggingface-cli download) or give a local directory") from e


@dataclass
class _Piece:
    """One LoRA pair's share of a base tensor.

    ``lora_A``/``lora_B`` are 2-D for a 2-D base tensor (an expert's own pair already picked out),
    3-D (Tinker's ``[E or 1, ...]``) for a fused ``[E, out, in]`` one; ``rows`` is the slice of
    the base tensor's ``out`` axis it adds to (the gate or up half of ``gate_up_proj``).
    """

    adapter_key: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    rows: slice = field(default_factory=lambda: slice(None))


@dataclass
class _Target:
    """A base tensor the adapter changes: written as ``key``, read from ``source`` (another key
    only for a tied output head, which reads the input embedding)."""

    key: str
    source: str
    pieces: list[_Piece] = field(default_factory=list)


def stream_merge(adapter: Adapter, base_dir: Path, output_dir: Path,
                 dtype: str) -> tuple[int, bool, int]:
    """Merge ``adapter`` into the safetensors shards of ``base_dir``, written into
    ``output_dir`` (a staging directory) one shard at a time; weights only.

    Args:
        adapter: The adapter (:func:`~tinkerkit.engines.local.model.read_adapter`).
        base_dir: A Hugging Face model directory with ``model.safetensors`` or shards and
            ``model.safetensors.index.json``.
        output_dir: Where the shards (and the index) go, under the base's file names.
        dtype: The output dtype name.

    Returns:
        ``(merged_tensors, untied, float32_bytes)``: how many base tensors changed, whether a
        tied output head got its own ``lm_head.weight``, and the model's size in float32 bytes.

    Raises:
        ExportError: A key lands nowhere, a shape does not fit, a merged tensor is off its
            reference or not finite.
        ModelError: No safetensors weights in ``base_dir``, or a damaged shard.
    """
    out_dtype = torch_dtype(dtype)
    shards, index = _shards(base_dir)
    shapes = _shapes(base_dir, shards)
    targets, copies = _plan(adapter, shapes, base_dir)
    by_source: dict[str, list[_Target]] = {}
    for target in targets.values():
        by_source.setdefault(target.source, []).append(target)
    weight_map, total = {}, 0
    for shard in shards:
        written = {}
        with _open(base_dir / shard) as f:
            for key in f.keys():
                if key in copies:
                    _check_copy(adapter, copies[key], key, f.get_tensor(key))
                if all(t.key != key for t in by_source.get(key, ())):
                    written[key] = _cast(f.get_tensor(key), out_dtype, key)
                for target in by_source.get(key, ()):  # read block by block from the file
                    written[target.key] = merge_tensor(f.get_slice(key), shapes[key],
                                                       target.pieces, out_dtype, target.key)
        save_file(written, output_dir / shard, metadata={"format": "pt"})
        for key, tensor in written.items():
            weight_map[key] = shard
            total += tensor.numel() * tensor.element_size()
        del written
    if index is not None:
        atomic_write_json(output_dir / SAFE_INDEX, {
            "metadata": {**index.get("metadata", {}), "total_size": total},
            "weight_map": dict(sorted(weight_map.items()))})
    untied = any(t.key != t.source for t in targets.values())
    fp32_bytes = 4 * sum(torch.Size(s).numel() for s in shapes.values())
    return len(targets), untied, fp32_bytes


def merge_tensor(weight, shape: list[int], pieces: list[_Piece], dtype: torch.dtype,
                 key: str) -> torch.Tensor:
    """``weight + Σ scaling · B·A`` over the pieces, in float32, cast once to ``dtype``, checked.

    Works through blocks of the leading axis (rows of a 2-D weight, experts of a 3-D one), read
    one at a time, so that neither the whole base tensor nor large float32/float64 temporaries
    are held. Each block is checked by :func:`check_merged` against ``weight + Σ scaling · B·A``
    computed in float64.

    Args:
        weight: The base tensor, ``[out, in]`` or ``[E, out, in]``, any float dtype: a tensor,
            or a safetensors slice (``safe_open(...).get_slice(key)``) read block by block.
        shape: Its shape.
        pieces: Its LoRA pairs (:class:`_Piece`).
        dtype: The output dtype.
        key: Its name, for messages.

    Returns:
        The merged tensor, ``weight``'s shape, ``dtype``.

    Raises:
        ExportError: A merged value off its reference, or not finite.
    """
    merged = torch.empty(shape, dtype=dtype)
    step = max(1, _BLOCK_ELEMENTS // max(1, torch.Size(shape[1:]).numel()))
    for start in range(0, shape[0], step):
        block = slice(start, start + step)
        base = weight[block]
        w = base.to(torch.float32, copy=True)  # never an alias of the base tensor
        reference = base.double()
        magnitude = w.abs()
        rank = 0
        for piece in pieces:
            a, b = _block_factors(piece, block, len(shape))
            w[..., piece.rows, :] += lora_delta(a, b, piece.scaling)
            reference[..., piece.rows, :] += piece.scaling * torch.matmul(b.double(), a.double())
            magnitude[..., piece.rows, :] += abs(piece.scaling) * torch.matmul(b.abs().float(),
                                                                               a.abs().float())
            rank = max(rank, a.shape[-2])
        merged[block] = w.to(dtype)
        check_merged(merged[block], reference, magnitude, rank, key)
    return merged


def _block_factors(piece: _Piece, block: slice, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of a block of the leading axis: rows of B for a 2-D weight, experts (or the
    shared factor) for a 3-D one."""
    if dim == 2:
        return piece.lora_A, piece.lora_B[block]
    pick = lambda factor: factor if factor.shape[0] == 1 else factor[block]  # noqa: E731
    return pick(piece.lora_A), pick(piece.lora_B)


def check_merged(merged: torch.Tensor, reference: torch.Tensor, magnitude: torch.Tensor,
                 rank: int, key: str) -> None:
    """Check merged weights against ``W + scaling · B·A`` computed in float64.

    The rule, elementwise: ``|merged - reference| <= u_out·|reference| + 2(r + 2)·u32·m +
    tiny``, where ``u_out`` is the output dtype's unit roundoff (2^-8 bf16, 2^-11 fp16, 2^-24
    fp32: the one final cast), ``u32 = 2^-24`` for the float32 arithmetic (a rank-r dot product,
    the scaling and the addition: at most ``(r + 2)·u32`` relative to ``m = |W| + |scaling|·|B|·|A|``,
    the standard bound, Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1, doubled
    for headroom) and ``tiny`` the output dtype's smallest normal times ``u_out`` (the rounding
    of subnormal results). Any wrong element, or a non-finite one (an overflow in fp16), fails.

    Args:
        merged: The merged weights in the output dtype.
        reference: float64 reference, same shape.
        magnitude: ``|W| + |scaling|·|B|·|A|``, float32, same shape.
        rank: The largest LoRA rank among the pairs.
        key: The tensor's name, for the message.

    Raises:
        ExportError: An element off the bound or not finite; the message names the tensor, the
            largest error and its bound.
    """
    unit = torch.finfo(merged.dtype).eps / 2
    bound = (unit * reference.abs() + 2 * (rank + 2) * 2.0**-24 * magnitude.double()
             + torch.finfo(merged.dtype).smallest_normal * unit)
    error = (merged.double() - reference).abs()
    bad = ~(error <= bound)  # NaN compares False
    if bad.any():
        worst = int(bad.flatten().nonzero()[0])
        raise ExportError(f"merged tensor '{key}' is off W + (alpha / r)·B·A: |error| "
                          f"{error.flatten()[worst].item():.3g} > bound "
                          f"{bound.flatten()[worst].item():.3g} at element {worst} "
                          f"({int(bad.sum())} elements; non-finite or overflowed in "
                          f"{str(merged.dtype).removeprefix('torch.')}?); refusing to export it")


def _cast(tensor: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    cast = tensor.to(dtype)
    if not torch.isfinite(cast).all():
        bad = (~torch.isfinite(cast)).sum().item()
        raise ExportError(f"base tensor '{key}' has {bad} non-finite (NaN/inf) values in "
                          f"{str(dtype).removeprefix('torch.')}; refusing to export it")
    return cast


def _shards(base_dir: Path) -> tuple[list[str], dict | None]:
    """The safetensors files of a checkpoint, in order, and its index (None: one file)."""
    index_file = base_dir / SAFE_INDEX
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index_file} is unreadable: {e}") from e
        return shards, index
    if (base_dir / _SINGLE_FILE).is_file():
        return [_SINGLE_FILE], None
    raise ModelError(f"base model {base_dir} has no safetensors weights ({_SINGLE_FILE} or "
                     f"{SAFE_INDEX}); the streaming merge reads safetensors only")


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"base model shard {path} is unreadable: "
                         f"{str(e).splitlines()[0]}") from e


def _shapes(base_dir: Path, shards: list[str]) -> dict[str, list[int]]:
    """Every tensor's shape, from the shard headers (no tensor is read)."""
    shapes = {}
    for shard in shards:
        with _open(base_dir / shard) as f:
            shapes.update({key: f.get_slice(key).get_shape() for key in f.keys()})
    return shapes


def _lora_pairs(adapter: Adapter) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"A": lora_A, "B": lora_B}}`` of an adapter (paths without PEFT's prefix).

    Raises:
        ExportError: A LoRA key that is neither ``lora_A.weight`` nor ``lora_B.weight``, or a
            pair with one half missing.
    """
    file = adapter.path / ADAPTER_WEIGHTS
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        if ".lora_" not in key:
            continue
        module, _, part = key[len(PEFT_PREFIX):].rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ExportError(f"{file}: key '{key}' is not a LoRA weight (lora_A.weight or "
                              "lora_B.weight)")
        pairs.setdefault(module, {})[part[0]] = tensor
    for module, pair in pairs.items():
        if len(pair) != 2:
            half = "lora_B" if "A" in pair else "lora_A"
            raise ExportError(f"{file}: '{PEFT_PREFIX}{module}.{half}.weight' is missing")
    return pairs


def _scaling(config: LoraConfig, module: str) -> float:
    """PEFT's scale of a module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), after the
    config's rank and alpha patterns."""
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module),
                                     config.lora_alpha)
    return alpha / (rank ** 0.5 if config.use_rslora else rank)


def _plan(adapter: Adapter, shapes: dict[str, list[int]],
          base_dir: Path) -> tuple[dict[str, _Target], dict[str, str]]:
    """Where each LoRA pair lands in the checkpoint: ``{written key: target}``, and the base
    copies an adapter may carry (``{checkpoint key: adapter key}``, checked equal).

    Raises:
        ExportError: A key that lands nowhere or a shape that does not fit (file and key named);
            DoRA or LoRA biases (not a ``B·A`` delta).
    """
    file = adapter.path / ADAPTER_WEIGHTS
    if adapter.config.use_dora or getattr(adapter.config, "lora_bias", False):
        raise ExportError(f"{adapter.path / ADAPTER_CONFIG}: DoRA and LoRA biases cannot be "
                          "merged as W + (alpha / r)·B·A; export the adapter without --merge")
    head = "lm_head.weight" if "lm_head.weight" in shapes else next(
        (k for k in shapes if k.endswith("embed_tokens.weight")), "lm_head.weight")
    targets: dict[str, _Target] = {}
    for module, pair in sorted(_lora_pairs(adapter).items()):
        scaling = _scaling(adapter.config, module)
        match = _EXPERTS.match(module)
        if match:
            _plan_experts(match, pair, scaling, shapes, targets, file, base_dir)
            continue
        key = f"{module}.weight"
        source = head if module == "lm_head" else key
        adapter_key = f"{PEFT_PREFIX}{module}.lora_A.weight"
        if source not in shapes:
            raise ExportError(f"{file}: '{adapter_key}' lands nowhere: base model {base_dir} has "
                              f"no tensor '{key}'")
        _fit(pair["A"], pair["B"], shapes[source], file, adapter_key, 2, base_dir)
        targets.setdefault(key, _Target(key, source)).pieces.append(
            _Piece(adapter_key, pair["A"], pair["B"], scaling))
    copies = {}
    for key in adapter.tensors:
        if ".lora_" not in key:  # a base weight PEFT saved beside the LoRA ones
            module = key[len(PEFT_PREFIX):].replace(".base_layer.", ".")
            base_key = head if module == "lm_head.weight" else module
            if base_key not in shapes:
                raise ExportError(f"{file}: '{key}' lands nowhere: base model {base_dir} has no "
                                  f"tensor '{module}'")
            copies[base_key] = key
    return targets, copies


def _plan_experts(match: re.Match, pair: dict, scaling: float, shapes: dict, targets: dict,
                  file: Path, base_dir: Path) -> None:
    """Plan one Tinker expert pair: per-expert 2-D keys when the checkpoint has them, else the
    fused ``gate_up_proj`` (w1 the first half of its rows, w3 the second) or ``down_proj``."""
    prefix, w = match["experts"], match["w"]
    projection = TINKER_EXPERT_PROJECTIONS[w]
    adapter_key = f"{PEFT_PREFIX}{prefix}.{w}.lora_A.weight"
    a, b = pair["A"], pair["B"]
    if a.dim() != 3 or b.dim() != 3:
        raise ExportError(f"{file}: '{adapter_key}' has shape {list(a.shape)} with lora_B "
                          f"{list(b.shape)}; an expert pair is 3-D, [E or 1, r, in] and "
                          "[E or 1, out, r]")
    per_expert = []
    while f"{prefix}.{len(per_expert)}.{projection}.weight" in shapes:
        per_expert.append(f"{prefix}.{len(per_expert)}.{projection}.weight")
    if per_expert:
        n = len(per_expert)
        _check_experts(a, b, n, file, adapter_key)
        for e, key in enumerate(per_expert):
            _fit(_expert(a, e), _expert(b, e), shapes[key], file, adapter_key, 2, base_dir)
            targets.setdefault(key, _Target(key, key)).pieces.append(
                _Piece(adapter_key, _expert(a, e), _expert(b, e), scaling))
        return
    fused = f"{prefix}.{'down_proj' if w == 'w2' else 'gate_up_proj'}"
    key = next((k for k in (fused, f"{fused}.weight") if k in shapes), None)
    if key is None:
        raise ExportError(f"{file}: '{adapter_key}' lands nowhere: base model {base_dir} has "
                          f"neither '{prefix}.0.{projection}.weight' nor '{fused}'")
    shape = list(shapes[key])
    rows = slice(None)
    if w != "w2":
        half = shape[1] // 2
        rows = slice(0, half) if w == "w1" else slice(half, 2 * half)
        shape = [shape[0], half, shape[2]]
    _check_experts(a, b, shape[0], file, adapter_key)
    _fit(a, b, shape, file, adapter_key, 3, base_dir)
    targets.setdefault(key, _Target(key, key)).pieces.append(
        _Piece(adapter_key, a, b, scaling, rows))


def _check_experts(a: torch.Tensor, b: torch.Tensor, experts: int, file: Path,
                   adapter_key: str) -> None:
    if a.shape[0] not in (1, experts) or b.shape[0] not in (1, experts):
        raise ExportError(f"{file}: '{adapter_key}' is for {max(a.shape[0], b.shape[0])} "
                          f"experts; the base model has {experts}")


def _fit(a: torch.Tensor, b: torch.Tensor, shape, file: Path, adapter_key: str, dim: int,
         base: str) -> None:
    """Refuse a pair whose delta ``[out, in]`` is not the base tensor's (last two axes)."""
    if a.dim() != dim or b.dim() != dim or a.shape[-2] != b.shape[-1] or (
            [b.shape[-2], a.shape[-1]] != list(shape)[-2:]):
        raise ExportError(f"{file}: '{adapter_key}' does not fit base model {base}: lora_A "
                          f"{list(a.shape)} and lora_B {list(b.shape)} against the base "
                          f"tensor's {list(shape)}")


def _check_copy(adapter: Adapter, adapter_key: str, key: str, tensor: torch.Tensor) -> None:
    if not torch.equal(adapter.tensors[adapter_key].to(tensor.dtype), tensor):
        raise ExportError(f"{adapter.path / ADAPTER_WEIGHTS}: '{adapter_key}' changes the base "
                          f"weight '{key}'; only LoRA weights (lora_A, lora_B) can be merged")


def _save_configs(base_dir: Path, staging: Path, dtype: str, untied: bool) -> None:
    """config.json (the output dtype; untied embeddings when the head got its own weight) and
    generation_config.json (the base's, or one derived from the config)."""
    config = AutoConfig.from_pretrained(base_dir)
    config.dtype = torch_dtype(dtype)
    if untied:
        config.tie_word_embeddings = False
        config.get_text_config().tie_word_embeddings = False
    config.save_pretrained(staging)
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", staging / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(staging)


def _logit_check_skipped(logit_check: bool, fp32_bytes: int) -> str | None:
    """Why the end-to-end logit check does not run, or None when it does."""
    if not logit_check:
        return "turned off (--no-logit-check)"
    available = psutil.virtual_memory().available
    if _LOGIT_CHECK_MEMORY_FACTOR * fp32_bytes > available:
        return (f"the model needs about {_LOGIT_CHECK_MEMORY_FACTOR * fp32_bytes / 2**30:.1f} "
                f"GiB for it, {available / 2**30:.1f} GiB are available")
    return None


def _logit_check(adapter: Adapter, base_name: str, merged_dir: Path, dtype: str,
                 tokenizer) -> tuple[float, float]:
    """``(max |logit difference|, tolerance)`` of the merged model against base + adapter."""
    input_ids = check_input_ids(tokenizer)
    model = _apply_adapter(load_model(base_name, "float32"), adapter, base_name)
    routing: dict[str, tuple] = {}
    with torch.no_grad(), moe_routing(model, routing, replay=False):
        reference = model(input_ids).logits.float()
    del model  # free the float32 copy before loading the saved one
    diff = _reloaded_logit_diff(merged_dir, dtype, input_ids, reference, routing)
    return diff, logit_tolerance(dtype, reference)


@contextlib.contextmanager
def moe_routing(model: torch.nn.Module, routing: dict[str, tuple],
                replay: bool) -> Iterator[None]:
    """Record (``replay`` False) or impose (True) the routing of a model's mixture-of-experts
    layers: the output of each ``gate`` module beside an ``experts`` one (transformers'
    routers return ``(router_logits, top-k weights, top-k expert indices)``).

    A merged MoE in bf16 may route a token whose two best experts score almost the same to
    another expert than the float32 model does, which moves its logits by far more than the
    rounding of the weights: a property of the dtype, not of the merge. Replaying the reference
    routing, the logit check measures the merged weights alone.
    """
    handles = []
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf != "gate" or not hasattr(model.get_submodule(parent), "experts"):
            continue
        key = name.removeprefix(PEFT_PREFIX)
        if replay:
            hook = lambda m, args, out, key=key: routing.get(key, out)  # noqa: E731
        else:
            hook = lambda m, args, out, key=key: routing.__setitem__(key, out)  # noqa: E731
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _merged_card(base: str, adapter: Adapter, dtype: str, merged: int, diff: float | None,
                 tolerance: float | None, skipped: str | None) -> str:
    check = (f"max \\|logit difference\\| {diff:.3g} against base + adapter (tolerance "
             f"{tolerance:.3g})" if skipped is None else f"skipped: {skipped}")
    return f"""---
base_model: {base}
tags: [lora, merged, tinkerkit]
---

# {base} with a LoRA adapter merged

Merged by tinkerkit: W' = W + (alpha / r)·B·A in float32, cast once to {dtype}.

| | |
|---|---|
| base model | `{base}` |
| rank (r) | {adapter.config.r} |
| alpha | {adapter.config.lora_alpha} |
| dtype | {dtype} |
| merged tensors | {merged}, each checked against its float64 reference |
| logit check | {check} |
"""


def logit_tolerance(dtype: str, reference_logits: torch.Tensor) -> float:
    """The largest acceptable |logit difference| between a merged model and base + adapter.

    ``tolerance = factor * u * max(1, max|reference_logits|)``, with ``u`` the unit roundoff of
    the dtype (bf16 2^-8 ≈ 0.39%, fp16 2^-11 ≈ 0.049%, fp32 2^-24 ≈ 6e-8): rounding every weight
    to the dtype perturbs it by at most a relative ``u``, so the logits move by about ``u`` times
    their scale, grown by accumulation across layers. ``factor`` is the headroom over that first
    estimate. Measured on SmolLM2-135M (30 layers, logits up to 40 on the check chat) with a
    random rank-8 adapter on all linear layers, the difference was 1.9 ``u`` times the scale in
    bf16 (0.30), 2.3 in fp16 (0.045) and 42 in fp32 (1.0e-4: merged and unmerged sum in different
    orders). The factors, 8 for bf16/fp16 and 2^10 for fp32, leave 3.5x to 24x headroom: on
    logits of 40 the tolerance is 1.25 in bf16 (3% of the scale), 0.16 in fp16 and 2.4e-3 in fp32
    (the "about 1e-3" usual for float32 merges). A broken merge (a delta applied twice, to the
    wrong layer, or lost in a tie) moves the logits by the adapter's whole effect, usually far
    more.

    Args:
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        reference_logits: Logits of base + adapter, any shape, float32.

    Returns:
        The tolerance in logit units.
    """
    # Unit roundoff u = 2^-p (p significand bits, the implicit one included) is half of
    # torch.finfo's eps (2^(1-p)): bf16 2^-8, fp16 2^-11, fp32 2^-24 (IEEE 754-2008).
    unit_roundoff = torch.finfo(torch_dtype(dtype)).eps / 2
    scale = max(1.0, reference_logits.abs().max().item())
    return _ROUNDOFF_FACTOR[dtype] * unit_roundoff * scale


def _check_dtype(dtype: str) -> None:
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported; use one of "
                          f"{', '.join(EXPORT_DTYPES)}")


def _read_adapter(path: Path) -> Adapter:
    """The validated adapter of a checkpoint or adapter directory; a non-finite tensor is an
    :class:`ExportError` here (nothing non-finite is exported)."""
    try:
        adapter = read_adapter(path)
    except CheckpointError as e:
        if "non-finite" in str(e):
            raise ExportError(f"{e}; refusing to export it") from e
        raise
    if (path / STATE_FILE).is_file():
        _check_meta_agrees(path, read_checkpoint_meta(path), adapter.config)
    return adapter


def _check_meta_agrees(path: Path, meta: dict, config) -> None:
    for name, value in (("rank", config.r), ("alpha", config.lora_alpha)):
        if name in meta and meta[name] != value:
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} field '{name}' is "
                                  f"{meta[name]} but {ADAPTER_CONFIG} says {value}")


def _base_model(path: Path, given: str | None) -> str:
    """The base model to export onto: ``given`` (another copy of the recorded model, say a local
    directory for a hub id; the merge checks that every tensor fits), else the one recorded
    beside the adapter."""
    if given is not None:
        return given
    recorded = base_model_of(path)
    if recorded is None:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path; name the "
                              "base model (tinkerkit export --model NAME, or base_model=)")
    return recorded


def _config_dict(config) -> dict:
    """The config as JSON, sets as sorted lists (deterministic, unlike PEFT's set order)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in sorted(config.to_dict().items())}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # Inside a staged directory (tinkerkit.files.atomic_directory), so the write is atomic.
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _model_card(config) -> str:
    targets = config.target_modules
    targets = ", ".join(sorted(targets)) if isinstance(targets, set) else str(targets)
    if config.target_parameters:  # MoE experts, PEFT's target_parameters (peft_expert_tensors)
        targets += f"; experts: {', '.join(sorted(config.target_parameters))}"
    base = config.base_model_name_or_path
    return f"""---
base_model: {base}
library_name: peft
tags: [lora, tinkerkit]
---

# LoRA adapter for {base}

Trained with tinkerkit.

| | |
|---|---|
| base model | `{base}` |
| rank (r) | {config.r} |
| alpha | {config.lora_alpha} (scale alpha / r = {config.lora_alpha / config.r:g}) |
| target modules | {targets} |

The tokenizer and chat template of the base model are included.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```
"""


def check_input_ids(tokenizer) -> torch.Tensor:
    """Token ids of the fixed conversation on which exports are checked, shape (1, T), int64:
    rendered with the tokenizer's chat template (plain ``role: content`` lines without one)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(_CHECK_CHAT, tokenize=False)
    else:  # a base model without a template: the same words as plain text
        text = "\n".join(f"{m['role']}: {m['content']}" for m in _CHECK_CHAT)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _apply_adapter(model, adapter: Adapter, base_name: str):
    """Base model + adapter (:func:`~tinkerkit.engines.local.model.apply_adapter`, strict)."""
    try:
        return apply_adapter(model, adapter, share_base=False)
    except CheckpointError as e:  # missing, unexpected or misshapen keys: another base or rank
        raise ExportError(f"adapter {adapter.path} does not fit base model '{base_name}': "
                          f"{e}") from e


def _reloaded_logit_diff(model_dir: Path, dtype: str, input_ids: torch.Tensor,
                         reference: torch.Tensor, routing: dict[str, tuple]) -> float:
    """Max |logit difference| of the saved model (dtype weights, float32 compute) vs reference,
    routed as the reference was (:func:`moe_routing`)."""
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype),
                                                       output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ExportError(f"the saved merged model does not load back: missing "
                          f"{sorted(info['missing_keys'])[:3]}, unexpected "
                          f"{sorted(info['unexpected_keys'])[:3]}")
    with torch.no_grad(), moe_routing(model, routing, replay=True):
        logits = model.float().eval()(input_ids).logits
    return (logits - reference).abs().max().item()
