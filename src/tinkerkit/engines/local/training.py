"""The local engine: Tinker's training client surface, in process, on PyTorch + PEFT.

:class:`LocalTrainingClient` offers the calls of ``tinker.TrainingClient`` that the training loop
uses (``forward_backward``, ``forward``, ``optim_step``, ``save_state``, ``load_state``,
``load_state_with_optimizer``, ``save_weights_for_sampler``, sampling clients) with Tinker's
semantics, and returns the SDK's own ``tinker.types`` objects. Every call returns a
``concurrent.futures.Future`` at once; one worker thread per client runs the calls in submission
order, so a caller can submit the next batch before it awaits the previous one.

Semantics (those of Tinker):

* ``cross_entropy``: ``loss = sum_t weights[t] * -log p(target_tokens[t] | tokens[:t+1])`` over
  all tokens of all datums, not normalized (the loop normalizes through the weights); the RL
  losses ``importance_sampling``, ``ppo``, ``cispo`` and ``dro`` as Tinker documents them
  (:mod:`tinkerkit.engines.local.losses`). Per-datum ``logprobs`` (float32, shape ``[T]``) come
  back aligned with ``target_tokens``.
* Gradients accumulate over ``forward_backward`` calls until ``optim_step``, which clips the
  global gradient norm (when ``grad_clip_norm > 0``), applies ``torch.optim.AdamW`` (decoupled
  weight decay, as Tinker's docs state) and zeroes the gradients.

Memory (long sequences; measured by ``benchmarks/long_context.py``, figures in
``docs/QUICK_START_LONG_TEXT.md``):

* Datums are packed end to end, without padding, into micro-batches of at most
  ``microbatch_tokens`` tokens, or, for models that cannot pack (sliding-window attention, logit
  soft-capping, attention outside transformers' SDPA path), cut into right-padded micro-batches
  (:mod:`tinkerkit.engines.local.batching`). A packed datum keeps its own positions and attends
  only within itself (:mod:`tinkerkit.engines.local.kernels.packing`: PyTorch's
  ``scaled_dot_product_attention`` once per datum with ``is_causal=True`` and no mask, whose
  flash/memory-efficient kernels never build the ``[T, T]`` score matrix).
* Loss: the decoder's last hidden states are projected to the vocabulary chunk by chunk
  (:mod:`tinkerkit.engines.local.kernels.logprobs`), so neither the forward nor the backward
  pass holds more than one ``[positions, vocab]`` block. Only positions the loss depends on
  (non-zero weight or advantage) are projected under autograd; the others (prompts; padding
  aside) get their log-probabilities without it.
* Activation checkpointing (``activation_checkpointing``): each decoder layer keeps only its input
  and recomputes the rest in the backward pass; ``"auto"`` turns it on for micro-batches of at
  least :data:`ACTIVATION_CHECKPOINTING_MIN_TOKENS` tokens.
* Mixed precision (``mixed_precision``): ``"bf16"`` runs the forward and backward passes under
  ``torch.autocast(dtype=torch.bfloat16)``; LoRA weights, gradients, the loss and the optimizer
  stay float32. The frozen base products run in bf16 (each weight cast once), the LoRA update is
  added in float32, norms, attention and the log-softmax compute in float32
  (:mod:`~tinkerkit.engines.local.kernels`).
* CPU threads (``cpu_threads``): every core on an idle machine, the cores left while other
  programs keep some busy (:class:`~tinkerkit.engines.local.threads.CpuShare`, measured during
  each call).
* LoRA layers are PEFT's with a fused forward and backward pass
  (:class:`~tinkerkit.engines.local.kernels.lora_linear.FusedLoraLinear`); RMSNorm layers and
  rotary embeddings compute their gradients in fewer passes
  (:mod:`tinkerkit.engines.local.kernels.fused_layers`).
  AdamW runs PyTorch's fused kernel on the CPU and CUDA.

Determinism: ``seed`` fixes the LoRA initialization (drawn on the CPU, so it does not depend on
the device); LoRA dropout draws from the client's own RNG state, which ``save_state`` stores and
``load_state_with_optimizer`` restores, so that a resumed run is bitwise identical on the CPU
at a fixed thread count (``cpu_threads`` a number, or threads set by the user: sums in matrix
products and reductions depend on the count, which ``"auto"`` changes with the machine's load).
The client turns on ``torch.use_deterministic_algorithms(True, warn_only=True)``.

Checkpoints follow :mod:`tinkerkit.checkpoint`. ``save_state(name)`` writes
``<checkpoint_root>/<name>``; ``save_weights_for_sampler(name)`` writes
``<checkpoint_root>/sampler_weights/<name>`` (Tinker keeps the two kinds apart as well, so a
state and a sampler checkpoint of the same name never overwrite each other). In
``tinkerkit_state.json``, ``rng_state`` is ``{"cpu": <base64 of torch.get_rng_state() bytes>,
"cuda": <base64 of torch.cuda.get_rng_state() bytes, or null>}`` and ``target_modules`` lists the
resolved module names (``lm_head`` excluded; see ``train_unembed``).
"""

from __future__ import annotations

import base64
import copy
import math
import os
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from tinker import types

from tinkerkit.checkpoint import (
    ADAPTER_WEIGHTS,
    OPTIMIZER_STATE,
    read_checkpoint_meta,
    read_safetensors,
    write_checkpoint_meta,
)
from tinkerkit.engines.local.batching import (
    Example,
    MicroBatch,
    plan_packs,
    plan_padded,
    to_example,
)
from tinkerkit.engines.local.kernels.fused_layers import fuse_layers
from tinkerkit.engines.local.kernels.logprobs import token_logprobs
from tinkerkit.engines.local.kernels.lora_linear import FusedLoraLinear
from tinkerkit.engines.local.kernels.packing import enable_packing
from tinkerkit.engines.local.losses import LossFunction, resolve_loss
from tinkerkit.engines.local.model import (
    ADAPTER_NAME,
    GLOBAL_RNG_LOCK,
    adapter_parameters,
    apply_adapter,
    assign_tensors,
    causal_lm,
    check_base_model,
    check_plain_lm_head,
    load_adapter_weights,
    load_model,
    resolve_device,
    resolve_target_modules,
    same_base_model,
    share_base_copy,
    torch_dtype,
    wrap_lora,
)
from tinkerkit.engines.local.sampling import LocalSamplingClient
from tinkerkit.engines.local.threads import CpuShare
from tinkerkit.errors import (
    CheckpointError,
    EngineError,
    NonFiniteGradientError,
    non_finite_gradient_message,
)
from tinkerkit.files import atomic_directory
from tinkerkit.models import hub_id_of, load_tokenizer

ACTIVATION_CHECKPOINTING_MIN_TOKENS = 2048
"""``activation_checkpointing="auto"`` turns checkpointing on for micro-batches of at least this
many (padded) tokens. Measured with ``benchmarks/long_context.py``: see
``docs/QUICK_START_LONG_TEXT.md``."""
MIXED_PRECISION = ("auto", "bf16", "no")


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn transformers' per-layer activation checkpointing on or off (non-reentrant).

    With it on, each decoder layer keeps only its input in the forward pass and is recomputed in
    the backward pass (``torch.utils.checkpoint``, ``use_reentrant=False``, which restores the RNG
    state, so dropout masks are the same). Inputs need not require gradients for non-reentrant
    checkpointing, so transformers' input-gradient hook is removed again.
    """
    lm = causal_lm(model)
    if lm.is_activation_checkpointing == enabled:
        return
    if enabled:
        lm.activation_checkpointing_enable({"use_reentrant": False})
    else:
        lm.activation_checkpointing_disable()
    lm.disable_input_require_grads()


def resolve_mixed_precision(mixed_precision: str, device: torch.device) -> bool:
    """Whether to run under bf16 autocast.

    Args:
        mixed_precision: ``"auto"`` (bf16 on a CUDA device that supports it, else none),
            ``"bf16"`` or ``"no"``.
        device: The engine's device.

    Raises:
        EngineError: Another value, or ``"bf16"`` on a CUDA device without bf16 support.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise EngineError(f"mixed_precision '{mixed_precision}' is not one of "
                          f"{', '.join(MIXED_PRECISION)}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mixed_precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise EngineError(f"mixed_precision 'bf16': {torch.cuda.get_device_name(device)} does not "
                          "support bfloat16; use 'no'")
    return mixed_precision == "bf16" or (mixed_precision == "auto" and cuda_bf16)




SPARE_SNAPSHOT_TREES = 2
"""Module trees of dropped snapshot samplers a training client keeps for reuse."""


def _offer_tree(spares: list[torch.nn.Module], tree: torch.nn.Module) -> None:
    """Keep the module tree of a snapshot sampler that was garbage-collected for the next
    snapshot (``list.append``/``pop`` are atomic, so no lock is needed)."""
    if len(spares) < SPARE_SNAPSHOT_TREES:
        spares.append(tree)


def _encode_rng(state: torch.Tensor | None) -> str | None:
    return None if state is None else base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str | None) -> torch.Tensor | None:
    if text is None:
        return None
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()




def _check_adam(params: types.AdamParams) -> None:
    checks = {"learning_rate": params.learning_rate >= 0, "beta1": 0 <= params.beta1 < 1,
              "beta2": 0 <= params.beta2 < 1, "eps": params.eps > 0,
              "weight_decay": params.weight_decay >= 0,
              "grad_clip_norm": params.grad_clip_norm >= 0}
    for field, ok in checks.items():
        value = getattr(params, field)
        if not ok or not math.isfinite(value):
            raise EngineError(f"AdamParams.{field}={value} is out of range")


# ----------------------------------------------------------------------------------- client


class LocalTrainingClient:
    """A LoRA training client on PyTorch + PEFT with the ``tinker.TrainingClient`` surface.

    Args:
        base_model: A local HF model directory, a registry name (``smollm2-135m-instruct``) or a
            hub id (see :func:`tinkerkit.models.resolve_model`); recorded in checkpoints as
            given.
        rank: LoRA rank ``r``.
        alpha: LoRA ``lora_alpha``; the update is scaled by ``alpha / rank``. ``None`` means
            ``alpha = rank`` (scale 1, so the learning rate does not depend on the rank's
            scaling; the seed's scripts used alpha=32 with rank 32, the same scale).
        dropout: LoRA dropout probability (Tinker uses none).
        target_modules: ``"all-linear"``, ``"attention"``, ``"mlp"`` or module names; the
            MLP presets cover the experts of mixture-of-experts layers (LoRA in Tinker's
            layout, :mod:`~tinkerkit.engines.local.kernels.expert_lora`).
        train_unembed: Also put LoRA on ``lm_head``. With tied embeddings (SmolLM2), the adapter
            changes the output projection only; the input embedding stays the frozen base
            matrix, and merging such an adapter requires untying the two.
        seed: Seeds the LoRA initialization and the dropout RNG.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:0"``, ...
        dtype: Base-model dtype (``float32``, ``bfloat16``, ``float16``); LoRA weights, the
            loss and the optimizer state stay float32.
        checkpoint_root: Directory under which ``save_state`` names live.
        microbatch_tokens: Most tokens per forward pass (padded tokens for a model that cannot
            pack; a longer datum runs alone).
        activation_checkpointing: ``True``, ``False`` or ``"auto"`` (on for micro-batches of at
            least :data:`ACTIVATION_CHECKPOINTING_MIN_TOKENS` tokens); see
            :func:`set_activation_checkpointing`. Results are the same either way.
        mixed_precision: ``"auto"``, ``"bf16"`` or ``"no"``; see
            :func:`resolve_mixed_precision`.
        cpu_threads: On the CPU, ``"auto"`` (all cores on an idle machine, fewer while other
            programs keep cores busy, unless the user chose threads; see
            :mod:`~tinkerkit.engines.local.threads`) or a fixed number of threads.
        adapter_base_model: The ``base_model_name_or_path`` that saved adapters record for
            ``PeftModel.from_pretrained`` (the name a ``tinkerkit serve`` client used); None:
            the hub id of ``base_model`` where tinkerkit knows one, else ``base_model``.

    Raises:
        EngineError: A bad argument (device, dtype, rank) or an unsupported model.
        ConfigError: LoRA targets that match no layer, or a kind of layer they ask for
            (attention, MLP or experts, unembedding) that this model does not have or the local
            engine cannot adapt (:func:`~tinkerkit.engines.local.model.resolve_target_modules`).
        ModelError: The base model cannot be loaded.
    """

    def __init__(self, base_model: str, rank: int = 32, *, alpha: float | None = None,
                 dropout: float = 0.0, target_modules: str | list[str] = "all-linear",
                 train_unembed: bool = False, seed: int = 0, device: str = "auto",
                 dtype: str = "float32", checkpoint_root: str | Path = "checkpoints",
                 microbatch_tokens: int = 8192, activation_checkpointing: bool | str = "auto",
                 mixed_precision: str = "auto", adapter_base_model: str | None = None,
                 cpu_threads: int | str = "auto") -> None:
        if rank < 1 or microbatch_tokens < 1 or not 0 <= dropout < 1:
            raise EngineError(f"invalid LoRA settings: rank={rank}, dropout={dropout}, "
                              f"microbatch_tokens={microbatch_tokens}")
        if activation_checkpointing not in (True, False, "auto"):
            raise EngineError(f"activation_checkpointing={activation_checkpointing!r}: use "
                              "True, False or 'auto'")
        self.activation_checkpointing = activation_checkpointing
        self.base_model, self.rank = base_model, rank
        self.adapter_base_model = adapter_base_model or hub_id_of(base_model)
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout, self.train_unembed, self.seed = dropout, train_unembed, seed
        self.device, self.dtype = resolve_device(device), dtype
        torch_dtype(dtype)  # refuses an unknown name before the model loads
        self.autocast = resolve_mixed_precision(mixed_precision, self.device)
        self._cpu_share = CpuShare(self.device, cpu_threads)
        self.cpu_threads = cpu_threads  # its samplers use the same setting
        self.checkpoint_root, self.microbatch_tokens = Path(checkpoint_root), microbatch_tokens
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN to expose reads of memory never
        # written; the engine reads none, and the fill cost 22% of a bf16 step on the CPU (the
        # first touch of each fresh page; docs/PERFORMANCE.md).
        torch.utils.deterministic.fill_uninitialized_memory = False

        base = load_model(base_model, dtype)
        check_plain_lm_head(base)
        names = resolve_target_modules(base, target_modules, train_unembed)
        self.target_modules = [n for n in names if n != "lm_head"]
        config = LoraConfig(r=rank, lora_alpha=self.alpha, lora_dropout=dropout,
                            target_modules=names, bias="none", task_type="CAUSAL_LM")
        config._register_custom_module({torch.nn.Linear: FusedLoraLinear})  # PEFT's own hook
        self.model = wrap_lora(base, config, seed).to(self.device)
        self.packing = enable_packing(causal_lm(self.model))
        self._train_mode: bool | None = None  # what self.model.train() was last called with
        self._params = adapter_parameters(self.model)
        self._optimizer = self._new_optimizer()
        self._step = 0
        self._rng = self._seeded_rng(seed)
        self._tokenizer = None
        self._spare_trees: list[torch.nn.Module] = []  # of dropped snapshot samplers
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinkerkit-train")
        # The layer checks run model code: in the thread that trains, so that no other thread
        # starts its own OpenMP/MKL thread pool (measured: 10-20% slower training after checks
        # in the caller's thread).
        self._submit(fuse_layers, self.model).result()

    # -- plumbing

    def _submit(self, fn: Callable, *args: Any) -> Future:
        return self._worker.submit(fn, *args)

    def _new_optimizer(self) -> torch.optim.AdamW:
        # The fused kernel (one pass per tensor) on CPU and CUDA: 5.5 vs 24-28 ms per step for
        # SmolLM2's 420 LoRA matrices on 2 CPU cores (docs/PERFORMANCE.md).
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.AdamW(list(self._params.values()), foreach=False, fused=fused)

    def _seeded_rng(self, seed: int) -> dict[str, torch.Tensor | None]:
        with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed)
            return self._capture_rng()

    def _rng_devices(self) -> list[int]:
        if self.device.type != "cuda":
            return []
        return [self.device.index if self.device.index is not None else torch.cuda.current_device()]

    def _capture_rng(self) -> dict[str, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def close(self, cancel: bool = False) -> None:
        """Stop the worker thread, after the queued calls or, with ``cancel``, after the running
        one only (the queued ones' futures are cancelled).

        Args:
            cancel: Cancel the calls not started yet (``tinkerkit serve`` releasing a session).
        """
        self._worker.shutdown(wait=True, cancel_futures=cancel)

    # -- information

    def get_tokenizer(self):
        """The base model's tokenizer (loaded once, with its chat template)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_model)
        return self._tokenizer

    def get_info(self) -> types.GetInfoResponse:
        """Base model and LoRA rank, as ``tinker.types.GetInfoResponse``."""
        arch = (causal_lm(self.model).config.architectures or [None])[0]
        return types.GetInfoResponse(
            model_data=types.ModelData(arch=arch, model_name=self.base_model,
                                       tokenizer_id=self.base_model),
            model_id=f"local:{self.base_model}", is_lora=True, lora_rank=self.rank,
            model_name=self.base_model)

    # -- training

    def _examples(self, data: list[types.Datum], loss: LossFunction) -> list[Example]:
        if not data:
            raise EngineError("data is empty: pass at least one Datum")
        vocab = causal_lm(self.model).get_output_embeddings().out_features
        return [to_example(i, datum, vocab, loss) for i, datum in enumerate(data)]

    def forward_backward(self, data: list[types.Datum], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None) -> Future:
        """Forward and backward pass; gradients add up until :meth:`optim_step`.

        Args:
            data: Datums with ``model_input`` (T tokens) and ``loss_fn_inputs``: ``target_tokens``
                (int64 ``[T]``) and the loss's float ``[T]`` inputs: ``weights`` for
                ``cross_entropy`` (all ones when absent, may be negative), ``logprobs`` (the
                sampler's) and ``advantages`` for ``importance_sampling``, ``ppo``, ``cispo``
                and ``dro``.
            loss_fn: A key of :data:`~tinkerkit.engines.local.losses.LOSSES`; formulas and
                sources in :mod:`tinkerkit.engines.local.losses`.
            loss_fn_config: ``clip_low_threshold``/``clip_high_threshold`` (``ppo``,
                ``cispo``), ``beta`` (``dro``); absent keys take Tinker's defaults.

        Returns:
            Future of ``ForwardBackwardOutput``: ``loss_fn_outputs[i]["logprobs"]`` (float32
            ``[T]``, the learner's log-probabilities of ``target_tokens``) and
            ``metrics["loss:sum"]``, the loss summed over all tokens of all datums.

        Raises:
            EngineError: Unknown loss or config key, a bad config value, or a malformed datum
                (named by index and field). Raised at once, not through the future.
        """
        loss, config = resolve_loss(loss_fn, loss_fn_config)
        return self._submit(self._run, self._examples(data, loss), loss, config, True)

    def forward(self, data: list[types.Datum], loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None) -> Future:
        """Like :meth:`forward_backward` but without gradients (and without dropout)."""
        loss, config = resolve_loss(loss_fn, loss_fn_config)
        return self._submit(self._run, self._examples(data, loss), loss, config, False)

    def _run(self, examples: list[Example], loss: LossFunction, config: dict[str, float],
             backward: bool) -> types.ForwardBackwardOutput:
        # Dropout draws from torch's process-wide RNG, which this client swaps in and out around
        # each call; the lock keeps clients in other threads (a server's sessions, an abandoned
        # client still draining its queue) from interleaving with that swap.
        with GLOBAL_RNG_LOCK:
            return self._run_locked(examples, loss, config, backward)

    def _run_locked(self, examples: list[Example], loss_fn: LossFunction,
                    config: dict[str, float], backward: bool) -> types.ForwardBackwardOutput:
        if self._train_mode != backward:  # train() walks every module: not on every call
            self.model.train(backward)
            self._train_mode = backward
        logprobs: list[torch.Tensor | None] = [None] * len(examples)
        loss_sum = 0.0
        with torch.random.fork_rng(devices=self._rng_devices()), torch.set_grad_enabled(backward):
            self._restore_rng(self._rng)
            for batch in self._micro_batches(examples):
                tokens, targets, valid = (t.to(self.device) for t in (batch.tokens, batch.targets,
                                                                      batch.valid))
                inputs = {name: t.to(self.device) for name, t in batch.inputs.items()}
                positions = batch.position_ids
                positions = None if positions is None else positions.to(self.device)
                if backward:
                    set_activation_checkpointing(self.model, self._checkpointing(tokens.numel()))
                # The forward and the backward pass are measured apart, so that a busy machine
                # seen during the forward pass already sets the backward pass's threads.
                with self._cpu_share.measure(), torch.autocast(
                        self.device.type, torch.bfloat16, enabled=self.autocast):
                    batch_logprobs = token_logprobs(self.model, tokens, targets,
                                                    grad_mask=loss_fn.needs_grad(inputs, config),
                                                    valid_mask=valid, position_ids=positions,
                                                    segments=batch.segments)
                loss = loss_fn.summed(batch_logprobs, inputs, config)
                if backward and loss.requires_grad:  # a micro-batch without weights has no graph
                    with self._cpu_share.measure():
                        loss.backward()
                loss_sum += loss.item()
                for example, row, start in batch.places:
                    end = start + len(example.tokens)
                    logprobs[example.index] = batch_logprobs[row, start:end].detach()
            self._rng = self._capture_rng()
        outputs = [{"logprobs": types.TensorData.from_torch(lp.float().cpu())} for lp in logprobs]
        return types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord",
                                           loss_fn_outputs=outputs, metrics={"loss:sum": loss_sum})

    def _micro_batches(self, examples: list[Example]) -> list[MicroBatch]:
        if self.packing:
            return [MicroBatch.packed(b) for b in plan_packs(examples, self.microbatch_tokens)]
        return [MicroBatch.padded(b) for b in plan_padded(examples, self.microbatch_tokens)]

    def _checkpointing(self, tokens: int) -> bool:
        if self.activation_checkpointing == "auto":
            return tokens >= ACTIVATION_CHECKPOINTING_MIN_TOKENS
        return bool(self.activation_checkpointing)

    def _restore_rng(self, rng: dict[str, torch.Tensor | None]) -> None:
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def optim_step(self, optim_params: types.AdamParams | None = None, *,
                   adam_params: types.AdamParams | None = None) -> Future:
        """One AdamW step on the accumulated gradients, then zero them.

        Order: global L2 gradient norm -> clip to ``grad_clip_norm`` when it is > 0
        (``torch.nn.utils.clip_grad_norm_``) -> ``torch.optim.AdamW`` with ``learning_rate``,
        ``(beta1, beta2)``, ``eps`` and decoupled ``weight_decay`` (``p -= lr * wd * p``). A
        parameter without a gradient (no ``forward_backward`` since the last step) takes a zero
        gradient, so every parameter's step count equals the client's.

        Args:
            optim_params: ``tinker.types.AdamParams`` (positional, as in the SDK).
            adam_params: The SDK's keyword alias of ``optim_params``.

        Returns:
            Future of ``OptimStepResponse`` with metrics ``grad_norm`` (before clipping),
            ``learning_rate`` and ``step`` (steps taken so far).

        Raises:
            EngineError: No or non-Adam parameters, values out of range (at once).
            NonFiniteGradientError: A NaN or infinite gradient norm (through the future; the
                step is skipped, gradients zeroed).
        """
        params = optim_params if adam_params is None else adam_params
        if optim_params is not None and adam_params is not None:
            raise EngineError("pass AdamParams either positionally or as adam_params, not both")
        if not isinstance(params, types.AdamParams):
            raise EngineError("optim_step needs tinker.types.AdamParams, "
                              f"got {type(params).__name__}")
        _check_adam(params)
        return self._submit(self._optim_step, params)

    def _optim_step(self, params: types.AdamParams) -> types.OptimStepResponse:
        tensors = list(self._params.values())
        for tensor in tensors:
            if tensor.grad is None:
                tensor.grad = torch.zeros_like(tensor)
        max_norm = params.grad_clip_norm if params.grad_clip_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm, foreach=False).item()
        if not math.isfinite(norm):
            self._optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradientError(non_finite_gradient_message(norm, self._step + 1))
        for group in self._optimizer.param_groups:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2),
                         eps=params.eps, weight_decay=params.weight_decay)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._step += 1
        return types.OptimStepResponse(metrics={"grad_norm": norm, "step": float(self._step),
                                                "learning_rate": params.learning_rate})

    # -- checkpoints

    def _target(self, name: str, *parts: str) -> Path:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise EngineError(f"checkpoint name '{name}' must be a plain directory name")
        return (self.checkpoint_root.joinpath(*parts) / name).resolve()

    def save_state(self, name: str) -> Future:
        """Save LoRA weights, AdamW moments, step and RNG to ``<checkpoint_root>/<name>``.

        Returns:
            Future of ``SaveWeightsResponse``; ``.path`` is the absolute directory.

        Raises:
            EngineError: ``name`` is not a plain directory name (at once).
        """
        target = self._target(name)
        return self._submit(self._save, target, "state")

    def save_weights_for_sampler(self, name: str) -> Future:
        """Save LoRA weights (no optimizer) to ``<checkpoint_root>/sampler_weights/<name>``.

        Returns:
            Future of ``SaveWeightsForSamplerResponse``; ``.path`` is the absolute directory.
        """
        target = self._target(name, "sampler_weights")
        return self._submit(self._save, target, "sampler")

    def save_checkpoint(self, directory: str | Path, kind: str) -> Future:
        """Save to an explicit directory, in order with the other calls.

        :meth:`save_state` and :meth:`save_weights_for_sampler` name checkpoints under
        ``checkpoint_root``; a caller with its own layout (``tinkerkit serve``) passes the
        directory itself.

        Args:
            directory: The checkpoint directory (replaced atomically if it exists).
            kind: ``"state"`` (weights, AdamW moments, step, RNG) or ``"sampler"`` (weights).

        Returns:
            Future of ``SaveWeightsResponse`` (state) or ``SaveWeightsForSamplerResponse``
            (sampler); ``.path`` is the absolute directory.

        Raises:
            EngineError: ``kind`` is neither (at once).
        """
        if kind not in ("state", "sampler"):
            raise EngineError(f"checkpoint kind '{kind}' is not 'state' or 'sampler'")
        return self._submit(self._save, Path(directory).resolve(), kind)

    def _save(self, target: Path, kind: str):
        config = copy.deepcopy(self.model.peft_config[ADAPTER_NAME])
        config.base_model_name_or_path = self.adapter_base_model
        config.inference_mode = True
        weights = {k: p.detach().float().cpu().contiguous() for k, p in self._params.items()}
        with atomic_directory(target) as staging:
            config.save_pretrained(str(staging))
            save_file(weights, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            if kind == "state":
                save_file(self._moments(), staging / OPTIMIZER_STATE)
            write_checkpoint_meta(
                staging, kind, self.base_model, rank=self.rank, alpha=self.alpha,
                dropout=self.dropout, target_modules=self.target_modules,
                train_unembed=self.train_unembed, optimizer_step=self._step,
                rng_state={k: _encode_rng(v) for k, v in self._rng.items()})
        if kind == "state":
            return types.SaveWeightsResponse(path=str(target))
        return types.SaveWeightsForSamplerResponse(path=str(target))

    def _moments(self) -> dict[str, torch.Tensor]:
        moments = {}
        for key, param in self._params.items():
            state = self._optimizer.state.get(param, {})
            for name in ("exp_avg", "exp_avg_sq"):
                value = state.get(name, torch.zeros_like(param))
                moments[f"{key}.{name}"] = value.detach().float().cpu().contiguous()
        return moments

    def load_state(self, path: str) -> Future:
        """Load LoRA weights from a checkpoint; the optimizer restarts (no moments, step 0).

        Returns:
            Future of ``LoadWeightsResponse``.

        Raises:
            CheckpointError: Through the future: missing directory or file, corrupted
                safetensors, another base model, rank, alpha or target modules.
        """
        return self._submit(self._load, Path(path), False)

    def load_state_with_optimizer(self, path: str) -> Future:
        """Load LoRA weights, AdamW moments, the step count and the dropout RNG state.

        Resuming this way continues bitwise identically on the CPU.

        Raises:
            CheckpointError: As :meth:`load_state`, or ``optimizer.safetensors`` is missing
                or does not match.
        """
        return self._submit(self._load, Path(path), True)

    def _check_compatible(self, meta: dict, path: Path) -> None:
        check_base_model(path, self.base_model)
        ours = {"rank": self.rank, "alpha": self.alpha, "target_modules": self.target_modules,
                "train_unembed": self.train_unembed}
        for field, value in ours.items():
            if meta.get(field) != value:
                raise CheckpointError(f"checkpoint {path}: {field}={meta.get(field)!r}, this "
                                      f"client has {value!r}")

    def _load(self, path: Path, with_optimizer: bool) -> types.LoadWeightsResponse:
        meta = read_checkpoint_meta(path)
        self._check_compatible(meta, path)
        moments = None
        if with_optimizer:
            if meta.get("kind") != "state":
                raise CheckpointError(f"checkpoint {path}: a '{meta.get('kind')}' checkpoint "
                                      "holds no optimizer state; use load_state")
            moments = read_safetensors(path / OPTIMIZER_STATE)
        load_adapter_weights(self.model, path)
        self._optimizer = self._new_optimizer()
        self._step = 0
        if moments is not None:
            self._restore_optimizer(moments, int(meta["optimizer_step"]), path)
            self._rng = {k: _decode_rng(meta["rng_state"].get(k)) for k in ("cpu", "cuda")}
        return types.LoadWeightsResponse(path=str(path))

    def _restore_optimizer(self, moments: dict[str, torch.Tensor], step: int, path: Path) -> None:
        file = path / OPTIMIZER_STATE
        suffixes = (".exp_avg", ".exp_avg_sq")
        stray = [key for key in moments if not key.endswith(suffixes)]
        if stray:
            raise CheckpointError(f"checkpoint {path}: {file.name}: unexpected key '{stray[0]}'")
        states = [{"step": torch.tensor(float(step))} for _ in self._params]
        for suffix in suffixes:
            buffers = {key: torch.zeros_like(param) for key, param in self._params.items()}
            assign_tensors(buffers, {k: v for k, v in moments.items() if k.endswith(suffix)},
                           file, suffix)
            for state, buffer in zip(states, buffers.values()):
                state[suffix[1:]] = buffer
        # Through load_state_dict: it puts ``step`` where this optimizer's kernel reads it (on
        # the parameter's device for the fused kernel, which refuses a CPU step next to CUDA
        # parameters; on the CPU for the per-tensor loop). The state is keyed by position in the
        # single param group, which holds ``self._params`` in order.
        groups = self._optimizer.state_dict()["param_groups"]
        self._optimizer.load_state_dict({"state": dict(enumerate(states)),
                                         "param_groups": groups})
        self._step = step

    # -- sampling

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> LocalSamplingClient:
        """A sampling client on a snapshot of the current weights (after the queued calls).

        The snapshot shares the frozen base weights with this client and copies the LoRA
        weights, so training on does not change what it samples. With ``name``, the weights are
        also saved as :meth:`save_weights_for_sampler` does.
        """
        if name is not None:
            self.save_weights_for_sampler(name)
        return self.sampling_snapshot().result()

    def sampling_snapshot(self) -> Future:
        """Future of a sampling client on the weights as they are after the calls queued so far.

        Does not wait: later calls (the next ``forward_backward``) may be queued at once and do
        not change what the snapshot samples. The snapshot shares the frozen base weights.
        """
        return self._submit(self._snapshot)

    def _snapshot(self) -> LocalSamplingClient:
        # A new module tree costs a deep copy of ~5,000 modules (0.4-0.7 s for SmolLM2-135M
        # on 2 CPU cores, benchmarks/sampler_snapshot.py); the tree of a sampler nobody holds
        # any more is reused instead, its LoRA weights overwritten (a copy of tensors only).
        tree = self._spare_trees.pop() if self._spare_trees else None
        if tree is None:
            tree = share_base_copy(self.model)
        else:
            with torch.no_grad():
                for key, param in adapter_parameters(tree).items():
                    param.copy_(self._params[key])
        client = self._sampling_client(tree)
        weakref.finalize(client, _offer_tree, self._spare_trees, tree)
        return client

    def create_sampling_client(self, model_path: str) -> LocalSamplingClient:
        """A sampling client on the LoRA weights saved at ``model_path``.

        A checkpoint of this client's shape reuses its loaded base weights; another rank or
        target set loads the base model anew.

        Raises:
            CheckpointError: Missing or corrupted checkpoint, or another base model.
        """
        path = Path(model_path)
        meta = read_checkpoint_meta(path)
        try:
            self._check_compatible(meta, path)
        except CheckpointError:
            if not same_base_model(meta.get("base_model"), self.base_model):
                raise
            return LocalSamplingClient(self.base_model, str(path), tokenizer=self.get_tokenizer(),
                                       device=str(self.device), dtype=self.dtype,
                                       cpu_threads=self.cpu_threads)
        snapshot = self._submit(apply_adapter, self.model, path).result()
        return self._sampling_client(snapshot)

    def _sampling_client(self, model: torch.nn.Module) -> LocalSamplingClient:
        return LocalSamplingClient(self.base_model, model=model, tokenizer=self.get_tokenizer(),
                                   device=str(self.device), dtype=self.dtype,
                                   cpu_threads=self.cpu_threads)


def create_training_client_from_state(path: str | Path, *, with_optimizer: bool,
                                      **overrides: Any) -> LocalTrainingClient:
    """A training client built from a checkpoint's ``tinkerkit_state.json`` and loaded from it.

    Args:
        path: A ``save_state`` (or, without optimizer, ``save_weights_for_sampler``) directory.
        with_optimizer: Also restore AdamW moments, step and RNG (exact resume).
        **overrides: Other :class:`LocalTrainingClient` arguments (``device``,
            ``checkpoint_root``, ``microbatch_tokens``, ...). ``base_model``, ``rank``,
            ``alpha``, ``dropout``, ``target_modules`` and ``train_unembed`` come from the
            checkpoint unless overridden.

    Raises:
        CheckpointError: The checkpoint is missing, incomplete, corrupted or incompatible.
    """
    meta = read_checkpoint_meta(path)
    kwargs = {field: meta[field] for field in ("rank", "alpha", "dropout", "target_modules",
                                                "train_unembed") if field in meta}
    kwargs.update(overrides)
    client = LocalTrainingClient(kwargs.pop("base_model", meta["base_model"]), **kwargs)
    load = client.load_state_with_optimizer if with_optimizer else client.load_state
    load(str(path)).result()
    return client
