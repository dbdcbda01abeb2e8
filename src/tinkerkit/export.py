"""Export trained LoRA checkpoints: a self-contained PEFT adapter, and a merged HF model.

A checkpoint (layout in :mod:`tinkerkit.checkpoint`) is already a PEFT adapter directory; export
validates it and writes what a user ships::

    <output_dir>/adapter/   adapter_config.json (base model as hub id), adapter_model.safetensors
                            (PEFT key layout, float32), tokenizer + chat template, README.md
    <output_dir>/merged/    model.safetensors, config.json, generation_config.json,
                            tokenizer + chat template  (base weights + LoRA deltas, one dtype)

Merging follows LoRA (Hu et al. 2021, arXiv 2106.09685, §4.1): ``W' = W + (alpha / r) * B @ A``,
done by :func:`tinkerkit.engines.local.model.merge_lora` (PEFT's ``merge_and_unload``) in float32
and cast once to the requested dtype. Every merge is checked: the merged model, read back from disk, must reproduce the logits of base + adapter on a
fixed chat within a tolerance derived from the dtype's rounding (see :func:`logit_tolerance`).

A ``tinker://`` checkpoint is first downloaded through the Tinker SDK into a PEFT adapter
(:func:`tinkerkit.engines.tinker.download_adapter`: ``save_weights_external``, then the files of
``get_external_weights_urls``, names and archives checked by :mod:`tinkerkit.archive`), and then
exported and merged exactly as a local one.

Example::

    result = export_checkpoint("runs/gsm8k/checkpoints/step_000100", "exports/gsm8k", merge=True)
    print(result.adapter_dir, result.merged_dir, result.max_logit_diff, result.tolerance)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tinkerkit.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATE_FILE,
    is_tinker_path,
    read_checkpoint_meta,
)
from tinkerkit.engines.local.model import (
    DTYPE_ALIASES,
    Adapter,
    apply_adapter,
    base_model_of,
    load_model,
    merge_lora,
    read_adapter,
    torch_dtype,
)
from tinkerkit.engines.tinker import download_adapter
from tinkerkit.errors import CheckpointError, ConfigError, ExportError
from tinkerkit.files import atomic_directory, atomic_write_json, atomic_write_text
from tinkerkit.models import hub_id_of, load_tokenizer

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


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote.

    Attributes:
        adapter_dir: The PEFT adapter directory.
        merged_dir: The merged HF model directory, or None when no merge was asked for.
        max_logit_diff: Largest |logit difference|, merged vs base + adapter (None: no merge).
        tolerance: The tolerance that difference was checked against (None: no merge).
        dtype: The merged model's dtype, ``"bf16"``/``"fp16"``/``"fp32"`` (None: no merge).
    """

    adapter_dir: Path
    merged_dir: Path | None = None
    max_logit_diff: float | None = None
    tolerance: float | None = None
    dtype: str | None = None


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, merge: bool = False,
                      dtype: str = "bf16", base_url: str | None = None,
                      base_model: str | None = None) -> ExportResult:
    """Export a checkpoint to ``output_dir/adapter`` and, with ``merge``, ``output_dir/merged``.

    Args:
        checkpoint: A tinkerkit checkpoint directory, or a ``tinker://`` checkpoint (downloaded
            first into a temporary directory inside ``output_dir``, removed afterwards).
        output_dir: Parent directory of the exports (created if needed).
        merge: Also write a merged model (see :func:`merge_adapter`).
        dtype: The merged model's dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        base_url: The Tinker server of a ``tinker://`` checkpoint (None: ``$TINKER_BASE_URL``,
            else the hosted service).
        base_model: The base model (``--model``), for an adapter that records none, or another
            copy of the recorded one (see :func:`merge_adapter`).

    Returns:
        The paths written and, with ``merge``, the merge check's numbers.

    Raises:
        ConfigError: ``dtype`` is not one of the above; no ``TINKER_API_KEY`` for a
            ``tinker://`` checkpoint.
        CheckpointError: The checkpoint is missing, incomplete or unreadable; a download holds
            unsafe file names or archive members.
        EngineError: The Tinker server cannot be reached or refuses the download.
        ExportError: Non-finite weights, an adapter that does not fit its base model, or a merged
            model that fails the logit check.
        ModelError: The base model or its tokenizer cannot be loaded.
    """
    _check_dtype(dtype)
    output_dir = Path(output_dir)
    if not is_tinker_path(str(checkpoint)):
        source = Path(checkpoint).resolve()
        if output_dir.resolve() == source or output_dir.resolve().is_relative_to(source):
            raise ExportError(f"--output {output_dir}: inside the checkpoint {checkpoint}; "
                              "export next to it, not into it")
        return _export(Path(checkpoint), output_dir, merge, dtype, base_model)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=output_dir) as download:
        download_adapter(str(checkpoint), Path(download), base_url)
        return _export(Path(download), output_dir, merge, dtype, base_model)


def _export(source: Path, output_dir: Path, merge: bool, dtype: str,
            base_model: str | None) -> ExportResult:
    adapter_dir = export_adapter(source, output_dir / "adapter", base_model)
    if not merge:
        return ExportResult(adapter_dir=adapter_dir)
    merged_dir, diff, tolerance = merge_adapter(source, output_dir / "merged", dtype=dtype,
                                                base_model=base_model)
    return ExportResult(adapter_dir, merged_dir, diff, tolerance, dtype)


def export_adapter(checkpoint: str | Path, output_dir: str | Path,
                   base_model: str | None = None) -> Path:
    """Write a self-contained PEFT adapter directory from a checkpoint.

    The directory holds ``adapter_config.json`` (``base_model_name_or_path`` is the base model's hub
    id when tinkerkit knows one, :func:`tinkerkit.models.hub_id_of`), ``adapter_model.safetensors``
    (the checkpoint's float32 LoRA tensors, PEFT key layout, keys unchanged), the base model's
    tokenizer files with its chat template, and a README.md model card; no optimizer state. It loads
    with ``PeftModel.from_pretrained(base, output_dir)``. Written atomically: an existing
    ``output_dir`` is replaced only when the new one is complete.

    Args:
        checkpoint: A tinkerkit checkpoint directory, or a PEFT LoRA adapter directory (one
            downloaded from a Tinker server); its base model comes from ``tinkerkit_state.json``,
            else from ``adapter_config.json`` (a registry model's hub id maps to its name).
        output_dir: The adapter directory to write.
        base_model: Overrides the recorded base model (see :func:`merge_adapter`).

    Returns:
        ``output_dir`` as a Path.

    Raises:
        CheckpointError: The checkpoint is missing, incomplete, unreadable, not in PEFT's key
            layout, or its adapter config disagrees with ``tinkerkit_state.json`` (rank, alpha).
        ExportError: A weight is NaN or infinite (the message names the tensor).
        ModelError: The base model's tokenizer cannot be loaded.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    adapter = _read_adapter(checkpoint)
    config = adapter.config
    base_model = _base_model(checkpoint, base_model)
    tokenizer = load_tokenizer(base_model)
    config.base_model_name_or_path = hub_id_of(base_model)
    config.inference_mode = True  # as PeftModel.save_pretrained records it
    with atomic_directory(output_dir) as staging:
        _save_tensors(adapter.tensors, staging / ADAPTER_WEIGHTS)
        atomic_write_json(staging / ADAPTER_CONFIG, _config_dict(config))
        tokenizer.save_pretrained(staging)
        atomic_write_text(staging / "README.md", _model_card(config))
    return output_dir


def merge_adapter(checkpoint_or_adapter: str | Path, output_dir: str | Path, dtype: str = "bf16",
                  base_model: str | None = None) -> tuple[Path, float, float]:
    """Merge a LoRA adapter into its base model and save a checked HF model directory.

    The base model is loaded in float32, the adapter applied with PEFT and merged
    (:func:`~tinkerkit.engines.local.model.merge_lora`) in float32, and the result cast once to ``dtype`` and
    saved (safetensors, config, generation config, tokenizer with chat template) atomically. The
    saved model is then loaded back in ``dtype``, upcast to float32, and its logits compared with
    those of the unmerged float32 base + adapter on a fixed short chat; the check thus measures the
    error the saved weights carry, independent of the hardware's low-precision arithmetic.

    Tied input/output embeddings (e.g. SmolLM2) stay tied unless the adapter changes one of them;
    then they are untied before merging, so that the delta reaches only the adapted layer, and the
    saved config says ``tie_word_embeddings: false``.

    Args:
        checkpoint_or_adapter: A tinkerkit checkpoint or an adapter written by
            :func:`export_adapter` (or any PEFT LoRA directory).
        output_dir: The merged model directory to write.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        base_model: Overrides the base model (registry name, local directory or hub id). By
            default a checkpoint's ``base_model`` from ``tinkerkit_state.json`` (resolves offline);
            for an adapter directory its ``base_model_name_or_path``, mapped back to the registry
            name when it is the hub id of a registry model.

    Returns:
        ``(output_dir, max_abs_logit_diff, tolerance)``, the last two in logit units.

    Raises:
        ConfigError: ``dtype`` is not one of the above.
        CheckpointError: The checkpoint or adapter is missing, incomplete or unreadable.
        ExportError: Non-finite adapter or merged weights (the tensor is named), an adapter that
            does not fit the base model, or a logit difference above the tolerance. Nothing is
            left at ``output_dir`` in that case (an earlier export there is kept).
        ModelError: The base model or its tokenizer cannot be loaded.

    Example::

        path, diff, tolerance = merge_adapter("exports/gsm8k/adapter", "exports/gsm8k/merged-fp16",
                                              dtype="fp16", base_model="smollm2-135m-instruct")
    """
    _check_dtype(dtype)
    source, output_dir = Path(checkpoint_or_adapter), Path(output_dir)
    adapter = _read_adapter(source)
    base_name = _base_model(source, base_model)
    model = load_model(base_name, "float32")
    tokenizer = load_tokenizer(base_name)
    input_ids = check_input_ids(tokenizer)
    peft_model = _apply_adapter(model, adapter, base_name)
    with torch.no_grad():
        reference = peft_model(input_ids).logits.float()
    merged = _merge(peft_model, source).to(torch_dtype(dtype))
    _require_finite(merged.state_dict(), f"merged model of {source} in {dtype}")
    tolerance = logit_tolerance(dtype, reference)
    with atomic_directory(output_dir) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model, peft_model, merged  # free the float32 copy before loading the saved one
        diff = _reloaded_logit_diff(staging, dtype, input_ids, reference)
        if not diff <= tolerance:  # also catches NaN
            raise ExportError(f"merge of {source} into {base_name} failed its check: max |logit "
                              f"difference| {diff:.3g} > tolerance {tolerance:.3g} ({dtype}); "
                              f"nothing was written to {output_dir}")
    return output_dir, diff, tolerance


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


def _require_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise ExportError(f"{where}: tensor '{key}' has {bad} non-finite (NaN/inf) values; "
                              f"refusing to export it")


def _check_meta_agrees(path: Path, meta: dict, config) -> None:
    for field, value in (("rank", config.r), ("alpha", config.lora_alpha)):
        if field in meta and meta[field] != value:
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} field '{field}' is "
                                  f"{meta[field]} but {ADAPTER_CONFIG} says {value}")


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


def _merge(peft_model, source: Path):
    try:
        return merge_lora(peft_model, source)
    except CheckpointError as e:  # PEFT's safe_merge: NaNs in the merged weights
        raise ExportError(str(e)) from e


def _reloaded_logit_diff(model_dir: Path, dtype: str, input_ids: torch.Tensor,
                         reference: torch.Tensor) -> float:
    """Max |logit difference| of the saved model (dtype weights, float32 compute) vs reference."""
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype),
                                                       output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ExportError(f"the saved merged model does not load back: missing "
                          f"{sorted(info['missing_keys'])[:3]}, unexpected "
                          f"{sorted(info['unexpected_keys'])[:3]}")
    with torch.no_grad():
        logits = model.float().eval()(input_ids).logits
    return (logits - reference).abs().max().item()
