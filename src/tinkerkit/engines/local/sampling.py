"""Sampling on the local engine: the ``tinker.SamplingClient`` surface, batched, with a KV cache.

``sample`` and ``compute_logprobs`` queue their request and return a ``Future`` at once. One
worker thread drains every pending request and runs all their sequences as one batched
generation (up to ``max_batch_size`` sequences at a time): prompts left-padded, with an
attention mask and position ids, prefilled once, then decoded one token per step through the
model's KV cache (transformers ``DynamicCache``). A finished sequence leaves the batch (its rows
are dropped from the cache), so it costs no more compute.

``SamplingParams`` as in Tinker:

* ``max_tokens``: ``None`` means :data:`DEFAULT_MAX_TOKENS` (256). A prompt must leave at least
  one of the model's positions (``max_position_embeddings``, :func:`tinkerkit.models.positions_in`)
  free to sample into, or the request is refused (``EngineError``: past its positions a model
  computes garbage). A sample that would run past the last position ends there, with
  ``stop_reason`` ``"length"`` as at ``max_tokens``, rather than the request being refused: one
  ``max_tokens`` then serves prompts of every length (an evaluation's longest prompts are cut,
  and counted as cut, not failed), and the sample says that it was cut.
* ``temperature``: 0 is greedy (argmax); otherwise logits / temperature, then ``top_k``
  (``-1``: off), then ``top_p`` (smallest set of tokens whose probability reaches
  ``top_p``), then a draw.
* ``stop``: ``None`` stops at the end tokens (the tokenizer's and generation config's EOS, plus
  ``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``, ... where the vocabulary has them). Token ids
  or strings given here *replace* those defaults; ``[]`` disables stopping (generation runs to
  ``max_tokens``). A stop token is kept as the last token of the sequence. A stop string ends the
  sequence at the token whose decoding completes it; that token is kept (so the text may run a
  few characters past the stop string, within that last token).
* ``seed``: each sequence draws from its own ``torch.Generator`` seeded from ``(seed, sample
  index)``, so a seeded request samples the same tokens whatever it is batched with (up to
  floating-point differences between batch shapes; see below). ``None`` draws a fresh seed.

Each ``SampledSequence`` carries the generated ``tokens`` and their ``logprobs`` under the
unmodified model distribution (``log_softmax`` of the raw logits, before temperature, top-k and
top-p), as Tinker reports them, and ``stop_reason`` ``"stop"`` or ``"length"``.

Batched and one-at-a-time generation run the same float32 arithmetic on different batch shapes,
so logits can differ in the last bits; greedy tokens agree unless two candidates tie within that
noise.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from tinkerkit.engines.local.kernels.logprobs import last_hidden_states, logit_chunk_positions
from tinkerkit.engines.local.model import (
    apply_adapter,
    causal_lm,
    check_base_model,
    check_plain_lm_head,
    load_model,
    merge_lora,
    resolve_device,
)
from tinkerkit.engines.local.threads import CpuShare
from tinkerkit.errors import CheckpointError, EngineError
from tinkerkit.models import load_tokenizer, positions_in
from tinkerkit.render import end_of_turn_ids
from tinkerkit.sampling_rules import sampling_problems

DEFAULT_MAX_TOKENS = 256

TokenCallback = Callable[[int, int, float], "bool | None"]
"""``on_token(sample_index, token_id, logprob)`` of :meth:`LocalSamplingClient.sample`: called in
the sampler's worker thread as each token is chosen; returning False ends that sample."""


@dataclass
class _Request:
    """One queued call: a ``sample`` (``rows`` non-empty) or a ``compute_logprobs``."""

    future: Future
    prompt: list[int]
    params: types.SamplingParams | None = None
    max_tokens: int = 0
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    rows: list[_Row] = field(default_factory=list)
    on_token: TokenCallback | None = None


@dataclass
class _Row:
    """One sequence being generated."""

    request: _Request
    generator: torch.Generator
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None

    def push(self, token: int, logprob: float, tokenizer) -> None:
        """Append a token and decide whether the sequence is finished."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        request = self.request
        if token in request.stop_ids or self._ends_with_stop_string(tokenizer):
            self.stop_reason = "stop"
        elif len(self.tokens) >= request.max_tokens:
            self.stop_reason = "length"
        if request.on_token is not None and not self._tell(token, logprob):
            self.stop_reason = self.stop_reason or "stop"

    def _tell(self, token: int, logprob: float) -> bool:
        """Hand the token to the request's callback; False when the caller wants no more
        (it returned False or raised: a broken callback ends its own row, not the batch)."""
        try:
            return self.request.on_token(self.index, token, logprob) is not False
        except Exception:
            return False

    def _ends_with_stop_string(self, tokenizer) -> bool:
        strings = self.request.stop_strings
        if not strings:
            return False
        # A token decodes to at least one character (or a byte of one), so the last
        # len(longest)+4 tokens hold any stop string just completed.
        window = max(len(s) for s in strings) + 4
        text = tokenizer.decode(self.tokens[-window:])
        return any(s in text for s in strings)


class _PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in a buffer allocated once for the whole generation.

    ``DynamicLayer`` grows by ``torch.cat`` at every step, copying the whole cache each time
    (``O(steps^2)`` bytes; 72% of a batch-64 decoding step on smollm2-135m, measured). Here keys
    and values (``[batch, kv_heads, capacity, head_dim]``) are written in place and attention
    reads a view of the filled part. ``capacity`` = prompt width + most new tokens, known before
    the prefill.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        shape = (*key_states.shape[:2], self.capacity)
        self._keys = key_states.new_empty(*shape, key_states.shape[-1])
        self._values = value_states.new_empty(*shape, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise EngineError(f"KV cache overflow: {end} positions > capacity {self.capacity}")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]


def _kv_cache(config, capacity: int) -> Cache:
    """A preallocated KV cache for a model whose layers all use full attention, else Dynamic."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        return DynamicCache(config=config)
    return Cache(layers=[_PreallocatedLayer(capacity) for _ in range(config.num_hidden_layers)])


def _row_seed(seed: int, index: int) -> int:
    """A 64-bit seed for sample ``index`` of a request seeded with ``seed`` (NumPy SeedSequence)."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)
    return int(state[0])


def _choose(logits: torch.Tensor, params: types.SamplingParams,
            generator: torch.Generator) -> torch.Tensor:
    """Pick the next token from one row of raw logits ``[vocab]`` (float32)."""
    if params.temperature == 0:
        return logits.argmax()
    scaled = logits / params.temperature
    if params.top_k < scaled.numel() and params.top_k != -1:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1:
        values, order = scaled.sort(descending=True)
        probs = values.softmax(-1)
        outside = probs.cumsum(-1) - probs >= params.top_p  # mass before it already reaches p
        scaled = scaled.clone()
        scaled[order[outside]] = float("-inf")
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)[0]


def _check_params(params: types.SamplingParams, num_samples: int) -> None:
    problems = sampling_problems(params.temperature, params.top_p, params.top_k,
                                 params.max_tokens)
    if problems:
        raise EngineError("SamplingParams: " + "; ".join(problems))
    if num_samples < 1:
        raise EngineError(f"num_samples={num_samples} must be at least 1")


class LocalSamplingClient:
    """A sampling client on a local model, with the ``tinker.SamplingClient`` surface.

    Args:
        base_model: The base model argument (directory, registry name or hub id).
        adapter_path: A LoRA checkpoint (or any PEFT adapter directory) to apply, or None.
        model: An already-loaded model to use instead of loading ``base_model``: a ``PeftModel``
            or a plain causal LM. Used as is without ``adapter_path``; with it, the adapter goes
            onto a copy that shares the given model's weights (the given model is not changed;
            a ``PeftModel`` must then have the checkpoint's rank and targets). Without a given
            model, the adapter is merged into the freshly loaded weights
            (:func:`~tinkerkit.engines.local.model.merge_lora`: ``W + (alpha / r) B A``, in the
            model's dtype, non-finite results refused, a tied lm_head untied first), which
            decodes faster than a separate LoRA path; logprobs then differ from the unmerged
            computation only by floating-point rounding.
        tokenizer: The tokenizer, or None to load ``base_model``'s.
        device: Where a loaded model goes (``"auto"``: CUDA when available); a given model
            stays where it is.
        dtype: dtype of a loaded base model.
        max_batch_size: Most sequences generated together.
        cpu_threads: On the CPU, ``"auto"`` or a fixed number of threads
            (:class:`~tinkerkit.engines.local.threads.CpuShare`).

    Raises:
        ModelError: The base model or tokenizer cannot be loaded.
        CheckpointError: The adapter is missing, corrupted or does not fit the model, or is a
            tinkerkit checkpoint of another base model.
    """

    def __init__(self, base_model: str, adapter_path: str | None = None, *,
                 model: torch.nn.Module | None = None, tokenizer=None, device: str = "auto",
                 dtype: str = "float32", max_batch_size: int = 32,
                 cpu_threads: int | str = "auto") -> None:
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size={max_batch_size} must be at least 1")
        self.base_model, self.max_batch_size = base_model, max_batch_size
        if adapter_path is not None:
            check_base_model(adapter_path, base_model)
        try:
            if model is None:
                model = load_model(base_model, dtype).to(resolve_device(device))
                if adapter_path is not None:  # the model is ours: fold the adapter in
                    model = merge_lora(apply_adapter(model, adapter_path, share_base=False),
                                       adapter_path)
            elif adapter_path is not None:
                model = apply_adapter(model, adapter_path)
        except CheckpointError as e:  # say which base model the adapter did not fit
            raise CheckpointError(f"{e} (base model '{base_model}')") from e
        check_plain_lm_head(model)
        self._model = model.eval()
        self.device = next(model.parameters()).device
        self._tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base_model)
        self._vocab = causal_lm(model).get_output_embeddings().out_features
        self._positions = positions_in(causal_lm(model).config.to_dict())
        self._default_stop = self._end_token_ids()
        self._pending: list[_Request] = []
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinkerkit-sample")
        self._cancelled = threading.Event()  # close(cancel=True): generation stops at a step
        self._cpu_share = CpuShare(self.device, cpu_threads)

    def get_tokenizer(self):
        """The model's tokenizer."""
        return self._tokenizer

    @property
    def default_stop_ids(self) -> frozenset[int]:
        """The token ids that end a sequence when ``SamplingParams.stop`` is None."""
        return self._default_stop

    def get_base_model(self) -> str:
        """The base model argument this client was created with."""
        return self.base_model

    def result(self, timeout: float | None = None) -> LocalSamplingClient:
        """This client: lets SDK-style ``create_sampling_client(...).result()`` code run as is."""
        return self

    def close(self, cancel: bool = False) -> None:
        """Stop the worker thread, after the queued requests or, with ``cancel``, at once.

        Args:
            cancel: Cancel the queued requests and stop the one being generated at its next
                decode step (its future fails with :class:`EngineError`), so closing takes one
                step, not the rest of a long generation (``tinkerkit serve`` releasing a session,
                or shutting down).
        """
        if cancel:
            self._cancelled.set()
            with self._lock:
                pending, self._pending = self._pending, []
            for request in pending:
                request.future.cancel()
        self._worker.shutdown(wait=True, cancel_futures=cancel)

    def _end_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        lm = causal_lm(self._model)
        generation = getattr(lm, "generation_config", None)
        for source in (self._tokenizer.eos_token_id, lm.config.eos_token_id,
                       getattr(generation, "eos_token_id", None)):
            ids.update(source if isinstance(source, list) else [] if source is None else [source])
        ids.update(end_of_turn_ids(self._tokenizer))
        return frozenset(i for i in ids if 0 <= i < self._vocab)

    # -- requests

    def _prompt_ids(self, prompt: types.ModelInput, to_sample: bool) -> list[int]:
        try:
            tokens = prompt.to_ints()
        except ValueError as e:
            raise EngineError(f"prompt holds non-token chunks: {e}") from e
        if not tokens:
            raise EngineError("prompt is empty")
        most = None if self._positions is None else self._positions - to_sample
        if most is not None and len(tokens) > most:
            raise EngineError(f"prompt of {len(tokens)} tokens is too long: the model has "
                              f"{self._positions} positions (max_position_embeddings), so it "
                              f"takes at most {most} to {'sample from' if to_sample else 'score'}")
        bad = [t for t in tokens if not 0 <= t < self._vocab]
        if bad:
            raise EngineError(f"prompt holds token id {bad[0]} outside [0, {self._vocab})")
        return tokens

    def _stops(self, stop) -> tuple[frozenset[int], tuple[str, ...]]:
        if stop is None:
            return self._default_stop, ()
        if isinstance(stop, str):
            stop = [stop]
        strings = tuple(s for s in stop if isinstance(s, str))
        ids = frozenset(int(s) for s in stop if not isinstance(s, str))
        if any(not s for s in strings) or any(not 0 <= i < self._vocab for i in ids):
            raise EngineError(f"SamplingParams.stop={stop!r} holds an empty string or a token id "
                              f"outside [0, {self._vocab})")
        return ids, strings

    def sample(self, prompt: types.ModelInput, num_samples: int,
               sampling_params: types.SamplingParams, include_prompt_logprobs: bool = False,
               topk_prompt_logprobs: int = 0, on_token: TokenCallback | None = None) -> Future:
        """Generate ``num_samples`` continuations of ``prompt``.

        Args:
            prompt: The prompt tokens.
            num_samples: Independent sequences to draw.
            sampling_params: See the module docstring.
            include_prompt_logprobs: Also return ``prompt_logprobs`` (first entry None).
            topk_prompt_logprobs: Also return the top-k ``(token, logprob)`` per prompt position.
            on_token: Streaming (:data:`TokenCallback`): ``on_token(i, token, logprob)`` as
                sample ``i`` chooses each token (logprob as in the response), in the worker
                thread, so it must be quick (put the token on a queue). Returning False (or
                raising) ends sample ``i`` there with ``stop_reason`` ``"stop"``: a reader who
                stopped listening (Ctrl-C in ``tinkerkit chat``, a closed HTTP stream) frees
                its row of the batch.

        Returns:
            Future of ``tinker.types.SampleResponse``.

        Raises:
            EngineError: An empty prompt, a prompt that leaves none of the model's positions to
                sample into, token ids outside the vocabulary or parameters out of range (at
                once). ``max_tokens`` past the last position is cut to it (module docstring).
        """
        _check_params(sampling_params, num_samples)
        if topk_prompt_logprobs < 0:
            raise EngineError(f"topk_prompt_logprobs={topk_prompt_logprobs} must be >= 0")
        stop_ids, stop_strings = self._stops(sampling_params.stop)
        seed = secrets.randbits(64) if sampling_params.seed is None else sampling_params.seed
        tokens = self._prompt_ids(prompt, to_sample=True)
        max_tokens = sampling_params.max_tokens or DEFAULT_MAX_TOKENS
        if self._positions is not None:
            max_tokens = min(max_tokens, self._positions - len(tokens))
        request = _Request(Future(), tokens, sampling_params, max_tokens, stop_ids,
                           stop_strings, include_prompt_logprobs, topk_prompt_logprobs,
                           on_token=on_token)
        for index in range(num_samples):
            generator = torch.Generator(device=self.device).manual_seed(_row_seed(seed, index))
            request.rows.append(_Row(request, generator, index))
        return self._enqueue(request)

    def compute_logprobs(self, prompt: types.ModelInput) -> Future:
        """Log-probability of each prompt token given the tokens before it.

        Returns:
            Future of a list with one entry per prompt token: None for the first (it has no
            context), then floats.

        Raises:
            EngineError: An empty prompt, one longer than the model's positions, or token ids
                outside the vocabulary (at once).
        """
        return self._enqueue(_Request(Future(), self._prompt_ids(prompt, to_sample=False)))

    def _enqueue(self, request: _Request) -> Future:
        if self._cancelled.is_set():
            raise EngineError("the sampling client is closed")
        with self._lock:
            self._pending.append(request)
        self._worker.submit(self._drain)
        return request.future

    # -- the worker

    def _drain(self) -> None:
        with self._lock:
            requests, self._pending = self._pending, []
        requests = [r for r in requests if r.future.set_running_or_notify_cancel()]
        rows = sorted((row for request in requests for row in request.rows),
                      key=lambda row: len(row.request.prompt))  # similar lengths, less padding
        try:
            for start in range(0, len(rows), self.max_batch_size):
                self._generate(rows[start:start + self.max_batch_size])
        except Exception as e:  # the whole batch failed: every caller hears of it
            for request in requests:
                request.future.set_exception(e)
            return
        for request in requests:
            try:
                request.future.set_result(self._respond(request))
            except Exception as e:
                request.future.set_exception(e)

    def _respond(self, request: _Request):
        if request.params is None:
            logprobs, _ = self._prompt_scores(request.prompt, 0)
            return [None] + logprobs[1:].tolist()
        sequences = [types.SampledSequence(
            stop_reason=row.stop_reason, sequence_id=uuid.uuid4().hex,
            tokens_np=np.array(row.tokens, dtype=np.int32),
            logprobs_np=np.array(row.logprobs, dtype=np.float32)) for row in request.rows]
        if not (request.include_prompt_logprobs or request.topk_prompt_logprobs):
            return types.SampleResponse(sequences=sequences)
        logprobs, topk = self._prompt_scores(request.prompt, request.topk_prompt_logprobs)
        return types.SampleResponse(
            sequences=sequences,
            prompt_logprobs_np=logprobs if request.include_prompt_logprobs else None,
            topk_prompt_logprobs_np=topk)

    @torch.no_grad()
    def _prompt_scores(self, tokens: list[int], k: int) -> tuple[np.ndarray, TopkLogprobs | None]:
        """float32 ``[T]`` prompt log-probabilities (NaN first) and the top-k per position."""
        ids = torch.tensor(tokens, device=self.device)
        hidden = last_hidden_states(self._model, ids[None])[0]
        head = causal_lm(self._model).get_output_embeddings()
        logprobs = np.full(len(tokens), np.nan, dtype=np.float32)
        top_ids = np.zeros((len(tokens), k), dtype=np.int32)
        top_logprobs = np.full((len(tokens), k), MASK_LOGPROB, dtype=np.float32)
        chunk_positions = logit_chunk_positions(head.out_features)
        for start in range(0, len(tokens) - 1, chunk_positions):
            end = min(start + chunk_positions, len(tokens) - 1)  # positions start..end-1 predict +1
            chunk = head(hidden[start:end]).float().log_softmax(-1)
            picked = chunk.gather(-1, ids[start + 1:end + 1, None]).squeeze(-1)
            logprobs[start + 1:end + 1] = picked.cpu().numpy()
            if k:
                values, indices = chunk.topk(min(k, chunk.shape[-1]))
                top_ids[start + 1:end + 1, :values.shape[-1]] = indices.cpu().numpy()
                top_logprobs[start + 1:end + 1, :values.shape[-1]] = values.cpu().numpy()
        return logprobs, (TopkLogprobs(top_ids, top_logprobs) if k else None)

    @torch.no_grad()
    def _generate(self, rows: list[_Row]) -> None:
        """Generate every row to its end: one prefill, then one cached step per token."""
        width = max(len(row.request.prompt) for row in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, row in enumerate(rows):  # left padding: every prompt ends at the last column
            ids[i, width - len(row.request.prompt):] = torch.tensor(row.request.prompt)
            mask[i, width - len(row.request.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        capacity = width + max(row.request.max_tokens for row in rows)
        cache = _kv_cache(causal_lm(self._model).config, capacity)
        with self._cpu_share.measure():
            out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              cache=cache, use_cache=True, logits_to_keep=1)
        next_position, active = positions[:, -1:] + 1, list(rows)
        logits = out.logits[:, -1].float()
        while True:
            if self._cancelled.is_set():  # checked once per decode step: close(cancel=True)
                raise EngineError("sampling cancelled: the sampling client was closed")
            if all(row.request.params.temperature == 0 for row in active):
                chosen = logits.argmax(-1)  # greedy: one call for the batch
            else:
                chosen = torch.stack([_choose(logits[j], row.request.params, row.generator)
                                      for j, row in enumerate(active)])
            chosen_logprobs = logits.log_softmax(-1).gather(-1, chosen[:, None]).squeeze(-1)
            for row, token, logprob in zip(active, chosen.tolist(), chosen_logprobs.tolist()):
                row.push(token, logprob, self._tokenizer)
            keep = [j for j, row in enumerate(active) if row.stop_reason is None]
            if not keep:
                return
            if len(keep) < len(active):  # finished rows leave the batch and the cache
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_position, chosen = mask[index], next_position[index], chosen[index]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            with self._cpu_share.measure():  # the thread count follows the machine's load
                out = self._model(input_ids=chosen[:, None], attention_mask=mask,
                                  position_ids=next_position, cache=cache, use_cache=True)
            logits, next_position = out.logits[:, -1].float(), next_position + 1
