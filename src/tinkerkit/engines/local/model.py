"""The local engine's models: names, loading, LoRA wrapping and adapters, in one place.

Everything the training client, the sampling client, ``tinkerkit serve`` and export need to know
about a model on PyTorch lives here:

* names: dtype names (:data:`DTYPES`, :func:`torch_dtype`), devices (:func:`resolve_device`), LoRA
  target presets (:data:`TARGET_PRESETS`, :func:`resolve_target_modules`, :func:`preset_switches`);
* loading a base model by name (:func:`load_model`) and wrapping it with LoRA (:func:`wrap_lora`);
* adapters: reading one (:func:`read_adapter`), applying it (:func:`apply_adapter`, strict: every
  tensor must land, every LoRA weight be set), loading weights into a wrapped model
  (:func:`load_adapter_weights`) and merging it (:func:`merge_lora`, PEFT's ``safe_merge``);
* base-model checks of a checkpoint (:func:`base_model_of`, :func:`check_base_model`).

LoRA follows Hu et al. 2021 (arXiv 2106.09685, §4.1): ``W' = W + (alpha / r) * B @ A``; adapter
files keep PEFT's key layout (``base_model.model.<module>.lora_A.weight``).
"""

from __future__ import annotations

import copy
import json
import threading
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tinkerkit.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATE_FILE,
    read_checkpoint_meta,
    read_lora_config,
    read_safetensors,
)
from tinkerkit.engines.local.kernels.expert_lora import (
    EXPERT_PROJECTIONS,
    ExpertLora,
    experts_layout_problem,
)
from tinkerkit.errors import CheckpointError, ConfigError, EngineError, ModelError
from tinkerkit.models import (
    REGISTRY,
    load_pretrained,
    registry_name_of,
    resolve_model,
)

# ----------------------------------------------------------------------------------- names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a base model loads in, by their torch names."""
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Short names (``EXPORT_DTYPE``, ``--dtype`` of export) for the same dtypes."""

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
EXPERTS = "experts"
"""The target name of a mixture-of-experts layer's experts (transformers' module name): LoRA on
their gate, up and down projections in Tinker's layout
(:mod:`tinkerkit.engines.local.kernels.expert_lora`). The router is never adapted."""
TARGET_PRESETS = {"attention": ATTENTION_MODULES, "mlp": MLP_MODULES + (EXPERTS,),
                  "all-linear": ATTENTION_MODULES + MLP_MODULES + (EXPERTS,)}
"""LoRA target presets (``LORA_TARGETS``): the layers each one adapts, by module name. The MLP
covers the experts of mixture-of-experts layers, as on Tinker (``train_mlp``)."""
ADAPTER_NAME = "default"
"""PEFT's adapter name for the one adapter a model carries."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name: ``float32``, ``bfloat16``, ``float16`` or their short
    names ``fp32``, ``bf16``, ``fp16``.

    Raises:
        ConfigError: Any other name.
    """
    dtype = DTYPES.get(DTYPE_ALIASES.get(name, name))
    if dtype is None:
        raise ConfigError(f"dtype '{name}' is not supported; use one of "
                          f"{', '.join([*DTYPES, *DTYPE_ALIASES])}")
    return dtype


def resolve_device(device: str) -> torch.device:
    """The torch device of a ``DEVICE`` setting: ``auto`` (CUDA when available, else the CPU),
    ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: Another name, or a CUDA device this torch build or machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"DEVICE={device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"DEVICE={device!r}: this torch build has no usable CUDA device "
                          "(install a CUDA build of torch, or use DEVICE=cpu)")
    resolved = torch.device(device)
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"DEVICE={device!r}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    return resolved


def parse_targets(targets: str) -> str | list[str]:
    """A ``LORA_TARGETS`` value as :func:`resolve_target_modules` takes it: a preset name as is,
    a comma-separated list as its module names."""
    if "," not in targets:
        return targets
    return [name.strip() for name in targets.split(",") if name.strip()]


def preset_switches(preset: str) -> tuple[bool, bool] | None:
    """Tinker's ``(train_attn, train_mlp)`` switches of a target preset, or None for a value
    that is not a preset (a list of module names, which Tinker does not take)."""
    return {"attention": (True, False), "mlp": (False, True),
            "all-linear": (True, True)}.get(preset)


def preset_of_switches(train_attn: bool, train_mlp: bool) -> str | None:
    """The target preset of Tinker's ``train_attn``/``train_mlp`` switches (None: neither)."""
    for preset in TARGET_PRESETS:
        if preset_switches(preset) == (train_attn, train_mlp):
            return preset
    return None


def expert_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The experts modules of a model's mixture-of-experts layers, by module name: the modules
    that own a 3-D parameter (transformers 5 fuses each layer's experts into ``[E, ., .]``
    parameters), whether or not :class:`ExpertLora` can adapt them."""
    return {name: module for name, module in model.named_modules()
            if any(p.dim() == 3 for p in module.parameters(recurse=False))}


def _target_kinds(preset: str) -> dict[str, tuple[str, ...]]:
    """The kinds of layer a preset asks for, with their module names."""
    train_attn, train_mlp = preset_switches(preset)
    kinds = {"attention": ATTENTION_MODULES, "MLP": MLP_MODULES + (EXPERTS,)}
    return {kind: names for kind, names, asked in zip(kinds, kinds.values(),
                                                       (train_attn, train_mlp)) if asked}


def resolve_target_modules(model: torch.nn.Module, target_modules: str | list[str],
                           train_unembed: bool) -> list[str]:
    """Module names to adapt with LoRA, refusing an adapter that would be silently partial.

    Args:
        model: The transformers causal LM.
        target_modules: A preset of :data:`TARGET_PRESETS` or explicit module names: linear
            layers, or :data:`EXPERTS` for the experts of mixture-of-experts layers.
        train_unembed: Also adapt the output projection (``lm_head``).

    Returns:
        Sorted module names (last name component), as PEFT's ``target_modules`` takes them.

    Raises:
        ConfigError: A kind of layer the preset asks for (attention, MLP or experts,
            unembedding) that no target matches in this model, or experts that the local engine
            cannot adapt (the message names the kind and the model's layers); an unknown preset;
            a name that matches no layer.
    """
    head = causal_lm(model).get_output_embeddings()
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not head}
    experts = expert_modules(model)
    problems = {f"{type(m).__name__} ({problem})" for m in experts.values()
                if (problem := experts_layout_problem(m)) is not None}
    available = linear | ({EXPERTS} if experts and not problems else set())
    layers = ", ".join(sorted(linear) + ([f"{EXPERTS} ({len(experts)})"] if experts else []))
    if isinstance(target_modules, str):
        if target_modules not in TARGET_PRESETS:
            raise ConfigError(f"LoRA targets '{target_modules}' is not one of "
                              f"{', '.join(TARGET_PRESETS)} (or a list of module names)")
        for kind, kind_names in _target_kinds(target_modules).items():
            if kind == "MLP" and problems:
                raise ConfigError(f"LoRA targets '{target_modules}' ask for the MLP layers, but "
                                  f"the local engine cannot adapt this model's experts: "
                                  f"{'; '.join(sorted(problems))}")
            if not available & set(kind_names):
                raise ConfigError(f"LoRA targets '{target_modules}' ask for {kind} layers, but "
                                  f"no {kind} layer of this model matches "
                                  f"({', '.join(kind_names)}); its layers: {layers}")
        names = sorted(available & set(TARGET_PRESETS[target_modules]))
    else:
        unknown = sorted(set(target_modules) - available)
        if unknown or not target_modules:
            raise ConfigError(f"LoRA targets {unknown or target_modules} match no layer LoRA can "
                              f"adapt in this model; its layers: {layers}"
                              + (f"; not adaptable: {'; '.join(sorted(problems))}"
                                 if problems else ""))
        names = sorted(set(target_modules))
    if train_unembed and not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"train_unembed asks for the unembedding, but this model's output "
                          f"projection is {type(head).__name__}, not a linear layer")
    return names + (["lm_head"] if train_unembed else [])


# --------------------------------------------------------------------------------- models


def load_model(name: str, dtype: str = "float32") -> torch.nn.Module:
    """Load a causal LM of a model argument, on the CPU, in evaluation mode.

    Args:
        name: A model directory, registry name or hub id (:func:`tinkerkit.models.resolve_model`).
        dtype: A dtype name (:func:`torch_dtype`).

    Raises:
        ConfigError: An unknown dtype name.
        ModelError: The model cannot be resolved or loaded, or the name is a tokenizer only.
    """
    entry = REGISTRY.get(name)
    if entry is not None and entry.tokenizer_only:
        models = ", ".join(sorted(n for n, e in REGISTRY.items() if not e.tokenizer_only))
        raise ModelError(f"'{name}' is a tokenizer only (for token counts); give a model "
                         f"directory, a hub id or one of: {models}")
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, name, dtype=torch_dtype(dtype))
    model.eval()
    return model


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``*ForCausalLM`` inside a ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_plain_lm_head(model: torch.nn.Module) -> None:
    """Refuse models whose logits are not ``lm_head(last_hidden_state)``.

    The chunked log-probabilities of :mod:`tinkerkit.engines.local.kernels.logprobs` call the
    decoder and the output projection directly, which would silently drop a logit soft-cap
    (Gemma 2) or a logit scale (Cohere).

    Raises:
        EngineError: The config has ``final_logit_softcapping`` or ``logit_scale``.
    """
    config = causal_lm(model).config
    for field in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, field, None) not in (None, 1.0):
            raise EngineError(f"model type '{config.model_type}' sets {field}; the local engine "
                              "supports models whose logits are lm_head(hidden states) only")


GLOBAL_RNG_LOCK = threading.Lock()
"""Held while torch's process-wide CPU RNG is seeded, swapped or drawn from (the LoRA init, a
client's dropout RNG), so that clients in other threads neither see nor disturb it."""


def wrap_lora(model: torch.nn.Module, config: LoraConfig, seed: int) -> PeftModel:
    """``peft.get_peft_model(model, config)`` with the LoRA init drawn from ``seed``.

    Call it on a CPU model: the init is then the same whatever device the model moves to. The
    global RNG is left as it was, and no other thread draws from it meanwhile (two models built
    at once in a server drew each other's numbers). PEFT's warning about LoRA on a tied
    ``lm_head`` is silenced (``train_unembed`` adapts the output projection alone; see
    :func:`merge_lora` for how a merge keeps the input embedding as it was). A target
    :data:`EXPERTS` puts :class:`ExpertLora` on the model's experts modules (its ``lora_A`` draws
    follow the linear layers' in module order, from the same seed).
    """
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        torch.manual_seed(seed)
        if EXPERTS in (config.target_modules or ()):
            config._register_custom_module(
                {type(m): partial(ExpertLora, delta=lora_delta)
                 for m in expert_modules(model).values()})  # PEFT's own hook
        return get_peft_model(model, config)


def share_base_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode whose frozen base weights are shared, not copied.

    Only the trainable (LoRA) parameters and the buffers are duplicated, so a sampling snapshot
    of a training model costs the adapter's memory, not the base model's. Base weights are never
    written by training, so sharing them between threads is safe.
    """
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    snapshot = copy.deepcopy(model, memo)
    for param in snapshot.parameters():
        param.requires_grad_(False)
        param.grad = None
    return snapshot.eval()


# -------------------------------------------------------------------------------- adapters


@dataclass
class Adapter:
    """A LoRA adapter read from disk.

    Attributes:
        path: Its directory (a tinkerkit checkpoint or a PEFT adapter directory).
        config: PEFT's ``LoraConfig`` from ``adapter_config.json``.
        tensors: ``{PEFT key: float tensor}`` from ``adapter_model.safetensors``, all finite.
    """

    path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]


PEFT_PREFIX = "base_model.model."
"""The prefix of every key of a PEFT (and Tinker) adapter file."""
TINKER_UNEMBED = "model.unembed_tokens"
"""Tinker's name of the output projection in adapter keys; the model's is ``lm_head`` (the input
embedding's weight when the embeddings are tied, see :func:`merge_lora`)."""
TINKER_EXPERT_PROJECTIONS = dict(zip(EXPERT_PROJECTIONS, ("gate_proj", "up_proj", "down_proj")))
"""Tinker's names of an expert's projections (``...mlp.experts.w1.lora_A.weight``, a 3-D pair
for all experts) and the model's: w1 the gate, w3 the up and w2 the down projection."""


def read_adapter(path: str | Path) -> Adapter:
    """Read and validate a LoRA adapter: a tinkerkit checkpoint, any PEFT LoRA directory, or an
    adapter downloaded from Tinker.

    Tinker's name of the output projection is mapped to the model's (``model.unembed_tokens``
    to ``lm_head``); its expert keys (``...mlp.experts.w1|w2|w3.lora_A|lora_B.weight``) are kept.

    Raises:
        CheckpointError: A checkpoint is incomplete, the weights file is missing or unreadable,
            ``adapter_config.json`` lacks ``r`` or ``lora_alpha``, a key is not in PEFT's layout
            (``base_model.model.``), there are no tensors, or a tensor holds a NaN or infinite
            value (the message names the tensor).
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        read_checkpoint_meta(path)  # checks the checkpoint is complete
    config = read_lora_config(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: {ADAPTER_WEIGHTS} is missing (not an adapter or checkpoint?)")
    tensors = read_safetensors(path / ADAPTER_WEIGHTS, require_finite=False)
    foreign = [k for k in tensors if not k.startswith(PEFT_PREFIX)]
    if foreign or not tensors:
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: not in PEFT's key layout "
                              f"(first foreign key: {foreign[0] if foreign else 'no tensors'})")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: tensor '{key}' has {bad} "
                                  "non-finite (NaN/inf) values")
    unembed = PEFT_PREFIX + TINKER_UNEMBED + "."
    tensors = {PEFT_PREFIX + "lm_head." + k[len(unembed):] if k.startswith(unembed) else k: v
               for k, v in tensors.items()}
    if isinstance(config.target_modules, set) and TINKER_UNEMBED in config.target_modules:
        config.target_modules = config.target_modules - {TINKER_UNEMBED} | {"lm_head"}
    elif not isinstance(config.target_modules, set):
        # "all-linear" or none (Tinker's adapters): exactly the modules the keys adapt, by path,
        # so that an adapter of some layers only applies strictly (experts: all of them)
        config.target_modules = {EXPERTS if _is_expert_key(key) else
                                 key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0]
                                 for key in tensors if ".lora_" in key} or None
    return Adapter(path, config, tensors)


def _is_expert_key(key: str) -> bool:
    """Whether an adapter key is one of Tinker's 3-D expert pairs (``...mlp.experts.w1...``)."""
    module = key.rsplit(".lora_", 1)[0]
    return module.rsplit(".", 1)[-1] in EXPERT_PROJECTIONS and f".{EXPERTS}." in key


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of a ``PeftModel``, keyed as in PEFT's saved state dict.

    PEFT saves ``...q_proj.lora_A.weight`` for the parameter ``...q_proj.lora_A.default.weight``
    (``get_peft_model_state_dict`` drops the adapter name); the keys here are the saved ones.
    """
    marker = f".{ADAPTER_NAME}."
    return {name.replace(marker, "."): param for name, param in model.named_parameters()
            if ".lora_" in name}


def assign_tensors(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                   file: Path, suffix: str = "") -> None:
    """Copy ``tensors[key + suffix]`` into ``params[key]`` for every key, strictly.

    Raises:
        CheckpointError: A key is missing or unexpected, or a shape differs.
    """
    expected = {key + suffix for key in params}
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {file.parent}: {file.name} does not match this model "
                              f"({len(missing)} missing keys, e.g. {missing[:1]}; "
                              f"{len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    with torch.no_grad():
        for key, param in params.items():
            tensor = tensors[key + suffix]
            if tensor.shape != param.shape:
                raise CheckpointError(f"checkpoint {file.parent}: {file.name}: '{key + suffix}' "
                                      f"has shape {list(tensor.shape)}, the model "
                                      f"{list(param.shape)} (another rank?)")
            param.copy_(tensor)


def load_adapter_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load the adapter at ``path`` into a ``PeftModel`` of the same shape (strictly, see
    :func:`assign_tensors`).

    Raises:
        CheckpointError: Missing, corrupted or non-finite weights, missing or unexpected keys,
            other shapes.
    """
    adapter = read_adapter(path)
    assign_tensors(adapter_parameters(model), adapter.tensors, adapter.path / ADAPTER_WEIGHTS)


def apply_adapter(model: torch.nn.Module, adapter: Adapter | str | Path, *,
                  share_base: bool = True) -> PeftModel:
    """``model`` with a LoRA adapter applied (not merged), in eval mode.

    The one way an adapter goes onto a model, for training clients, samplers and export: every
    adapter tensor must land and every LoRA weight be set (:func:`assign_tensors`).

    Args:
        model: A plain causal LM, or a ``PeftModel`` of the adapter's rank and targets (its
            LoRA weights are replaced on a copy).
        adapter: An :class:`Adapter` or the directory to read one from.
        share_base: Apply to a copy that shares ``model``'s weights (``model`` is not changed);
            False wraps ``model`` itself (a model loaded for this adapter alone).

    Raises:
        CheckpointError: The adapter is unreadable (:func:`read_adapter`) or does not fit the
            model (another base model, rank or target set).
    """
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    if isinstance(model, PeftModel):
        wrapped = share_base_copy(model) if share_base else model
    else:
        config = copy.deepcopy(adapter.config)
        config.inference_mode = True
        config.base_model_name_or_path = None  # the base is the one given (no rename warning)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        base = copy.deepcopy(model, {id(p): p for p, _ in flags}) if share_base else model
        wrapped = wrap_lora(base, config, seed=0).to(next(model.parameters()).device)
        if share_base:  # PEFT froze the shared weights; the caller's model keeps its flags
            for param, flag in flags:
                param.requires_grad_(flag)
    lora = {k: v for k, v in adapter.tensors.items() if ".lora_" in k}
    _check_base_copies(wrapped, {k: v for k, v in adapter.tensors.items() if k not in lora},
                       adapter.path)
    assign_tensors(adapter_parameters(wrapped), lora, adapter.path / ADAPTER_WEIGHTS)
    return wrapped.eval()


def _check_base_copies(model: PeftModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Accept the base weights PEFT saves beside LoRA weights (a tied ``lm_head``'s
    ``base_layer.weight``) when they equal the model's; anything else would change the base
    model, which an adapter applied here never does.

    Raises:
        CheckpointError: A key names no parameter of the model, or other values.
    """
    params = {name.replace(f".{ADAPTER_NAME}.", "."): p
              for name, p in model.named_parameters(remove_duplicate=False)}
    for key, tensor in tensors.items():
        param = params.get(key)
        if param is None or param.shape != tensor.shape:
            raise CheckpointError(f"checkpoint {path}: {ADAPTER_WEIGHTS} does not match this "
                                  f"model (unexpected key '{key}')")
        if not torch.equal(param.detach().cpu().to(tensor.dtype), tensor):
            raise CheckpointError(f"checkpoint {path}: {ADAPTER_WEIGHTS}: '{key}' changes a base "
                                  "weight; only LoRA weights (lora_A, lora_B) can be applied")


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight change of a LoRA pair, ``scaling · B·A``, in float32.

    The one formula for merges (export's streaming merge, expert merges); ``scaling`` is
    ``alpha / r`` (LoRA, Hu et al. 2021, eq. 4; PEFT's ``scaling``).

    Args:
        lora_A: ``[r, in]``, or for experts in Tinker's layout ``[E or 1, r, in]``.
        lora_B: ``[out, r]``, or ``[E or 1, out, r]``. A leading dimension of 1 is a factor
            shared by all experts (Tinker's "shared outer" scheme) and is broadcast.
        scaling: ``alpha / r``.

    Returns:
        ``[out, in]``, or ``[E, out, in]`` for experts; float32 whatever the inputs' dtype.

    Raises:
        ValueError: The shapes do not chain (``A``'s rank against ``B``'s, or two expert counts
            that differ and are not 1).
    """
    a, b = lora_A.float(), lora_B.float()
    if a.dim() != b.dim() or a.dim() not in (2, 3) or a.shape[-2] != b.shape[-1] or (
            a.dim() == 3 and 1 not in (a.shape[0], b.shape[0]) and a.shape[0] != b.shape[0]):
        raise ValueError(f"LoRA shapes do not chain: lora_A {list(a.shape)}, "
                         f"lora_B {list(b.shape)}")
    return scaling * torch.matmul(b, a)


def merge_lora(model: PeftModel, source: str | Path) -> torch.nn.Module:
    """Fold a ``PeftModel``'s LoRA weights into its base weights and return the base model.

    PEFT's ``merge_and_unload(safe_merge=True)`` computes ``W + (alpha / r) B A`` in the weights'
    dtype and refuses a result that is not finite. Tied input/output embeddings (SmolLM2) stay
    tied unless the adapter changes one of them; then the adapted one gets its own copy first,
    so that the delta reaches only that layer, and the config says ``tie_word_embeddings:
    false``.

    Args:
        model: The model from :func:`apply_adapter` (with ``share_base=False``: the base
            weights are changed in place).
        source: The adapter's directory, for messages.

    Raises:
        CheckpointError: The merged weights hold a NaN or infinite value.
    """
    _untie_adapted_embeddings(causal_lm(model))
    try:
        return model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # PEFT's safe_merge: NaNs in the merged weights
        raise CheckpointError(f"merging {source}: {e}") from e


def _untie_adapted_embeddings(lm: torch.nn.Module) -> None:
    inputs, outputs = lm.get_input_embeddings(), lm.get_output_embeddings()
    if outputs is None or outputs.weight is not inputs.weight:
        return
    adapted = [m for m in (inputs, outputs) if hasattr(m, "base_layer")]  # PEFT's LoRA layers
    for layer in adapted:
        layer.base_layer.weight = torch.nn.Parameter(layer.base_layer.weight.detach().clone(),
                                                     requires_grad=False)
    if adapted:
        lm.config.tie_word_embeddings = False


# --------------------------------------------------------------------- base-model checks


def base_model_of(path: str | Path) -> str | None:
    """The base model an adapter was trained on, as recorded beside it, or None.

    A tinkerkit checkpoint's ``tinkerkit_state.json`` ``base_model``; else a PEFT adapter's
    ``base_model_name_or_path`` (the registry name when it is a registry model's hub id).

    Raises:
        CheckpointError: An incomplete checkpoint, or an unreadable adapter config.
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return read_checkpoint_meta(path)["base_model"]
    if not (path / ADAPTER_CONFIG).is_file():
        return None
    try:
        recorded = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG} is unreadable: {e}") from e
    name = recorded.get("base_model_name_or_path") if isinstance(recorded, dict) else None
    if not isinstance(name, str) or not name:
        return None
    return registry_name_of(name) or name


def _model_key(name: str | None) -> str | None:
    """Compare base models by their resolved directory (or hub id), not their spelling."""
    if name is None:
        return None
    try:
        resolved = resolve_model(name)
    except ModelError:  # an unresolvable name compares as written
        return name
    return str(resolved.resolve()) if isinstance(resolved, Path) else resolved


def same_base_model(a: str | None, b: str | None) -> bool:
    """Whether two model arguments name the same model (same directory or hub id)."""
    return _model_key(a) == _model_key(b)


def check_base_model(path: str | Path, base_model: str) -> None:
    """Refuse a tinkerkit checkpoint trained on another base model than ``base_model``.

    Only a checkpoint's own record (``tinkerkit_state.json``) is checked: a PEFT adapter's
    ``base_model_name_or_path`` names where it came from, which may be another copy of the same
    weights.

    Raises:
        CheckpointError: The checkpoint's ``base_model`` resolves to another model.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return
    recorded = read_checkpoint_meta(path).get("base_model")
    if not same_base_model(recorded, base_model):
        raise CheckpointError(f"checkpoint {path}: trained on base model "
                              f"'{recorded}', not on '{base_model}'")
