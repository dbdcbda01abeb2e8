"""Reinforcement learning with verifiable rewards: ``tinkerkit rl``.

One optimizer step, read top to bottom in :func:`rl`:

1. The step's prompts: ``RL_PROMPTS_PER_STEP`` of the training prompts, chosen as
   :func:`~tinkerkit.train.schedule.batch_indices` chooses a supervised batch.
2. Sample a group of ``RL_GROUP_SIZE`` answers per prompt from the current weights
   (``save_weights_and_get_sampling_client``), each with the sampler's log-probability of every
   token.
3. Grade each answer with the evaluation grader (:meth:`tinkerkit.grader.Grader.grade`, exactly
   as ``tinkerkit eval`` grades): reward 1 for a final answer equivalent to the reference (a
   ``GRADER`` file's ``score`` when it defines one), plus ``RL_FORMAT_REWARD`` when a final answer
   can be extracted at all.
4. Advantage = reward - the mean reward of its group (:func:`group_advantages`; the group
   baseline of GRPO, Shao et al. 2024, arXiv 2402.03300, section 4.1.2, without the division by
   the standard deviation). A group whose rewards are all equal has every advantage 0: it is
   counted (``groups_skipped``) and not trained on.
5. One Datum per answer of the other groups (:func:`rollout_datum`), then one
   ``forward_backward(datums, RL_LOSS, RL_LOSS_CONFIG)`` and one ``optim_step``.

The Datums follow Tinker's RL loss inputs (https://tinker-docs.thinkingmachines.ai/losses):
``model_input`` is the prompt and the answer less its last token; ``target_tokens`` the same
sequence shifted by one; ``logprobs`` the sampler's log-probabilities and ``advantages`` the
answer's advantage on answer positions, 0 on prompt positions. The losses are sums over tokens.

Exact resume: the prompts of step N and the sampling seed of each prompt
(:func:`sampling_seed`) are functions of ``(SEED, N)``, and the engine restores weights and AdamW
state, so a resumed run samples the same answers and logs the same metrics as an uninterrupted
one.

Example::

    config = load_config("config.py", overrides=["RL_GROUP_SIZE=8"])
    result = rl(config, init_from="runs/sft")
    print(result.final_checkpoint)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tinker
from rich.console import Console

from tinkerkit import engines, files
from tinkerkit.config import RLLoss, TrainConfig
from tinkerkit.data.conversation import Conversation
from tinkerkit.errors import DataError, plural
from tinkerkit.evaluate import grade_sequence, with_end_of_turn
from tinkerkit.grader import Grader, GraderConfig, grading_example
from tinkerkit.render import Renderer
from tinkerkit.train import (
    METRICS_FILE,
    PendingStep,
    StepLog,
    StepRecord,
    StepTimer,
    adam_params,
    await_step,
    batch_indices,
    check_trackers,
    export_final,
    interrupt_names_checkpoint,
    is_due,
    learning_rate_at,
    load_held_out,
    make_renderer,
    open_client,
    open_trackers,
    plan_steps,
    plot_curves,
    progress_bar,
    sample_evaluations,
    save_checkpoint,
    split_data,
    start_run,
    write_summary,
)

__all__ = ["Prompt", "RLResult", "Rollout", "group_advantages", "kl_sampler_learner",
           "load_prompts", "rl", "rollout_datum", "sampling_seed"]

REWARD_PLOT = "reward_curve.png"


@dataclass(frozen=True)
class Prompt:
    """One training prompt of RL.

    Attributes:
        conversation: The record (its prompt messages are sent; its reference answer grades).
        model_input: The generation prompt, as ``tinkerkit eval`` renders it.
    """

    conversation: Conversation
    model_input: tinker.types.ModelInput


@dataclass(frozen=True)
class Rollout:
    """One sampled answer, graded.

    Attributes:
        tokens: The sampled tokens (the stop token included when the sampler kept it).
        logprobs: The sampler's log-probability of each of ``tokens`` (natural log, float).
        reward: ``Grader.reward_of`` of the answer plus the format reward, if any.
        correct: Whether the final answer is equivalent to the reference.
        truncated: Whether the answer stopped at ``RL_MAX_TOKENS`` (stop reason ``length``).
        grading_error: Why the ``GRADER`` file failed on the answer (its reward is then 0, as
            ``tinkerkit eval`` counts it wrong), or None.
    """

    tokens: list[int]
    logprobs: list[float]
    reward: float
    correct: bool
    truncated: bool
    grading_error: str | None = None


@dataclass(frozen=True)
class RLResult:
    """What a finished RL run leaves behind.

    Attributes:
        run_dir: The run directory.
        final_checkpoint: Path of the last checkpoint.
        steps: Optimizer steps completed (all invocations).
        rewards: The mean reward of each step of this invocation.
    """

    run_dir: Path
    final_checkpoint: str
    steps: int
    rewards: list[float]


def load_prompts(config: TrainConfig, renderer: Renderer, console: Console) -> list[Prompt]:
    """The training prompts: ``DATA_FILES`` (less ``EVAL_SPLIT_RATIO``'s held-out part) with a
    reference answer, rendered as generation prompts.

    A record without a reference answer cannot be graded, and a prompt that leaves fewer than
    ``RL_MAX_TOKENS`` of ``MAX_SEQUENCE_LENGTH`` for the answer cannot be sampled in full: both
    are skipped, counted and named.

    Raises:
        ConfigError: ``DATA_FILES`` is empty.
        DataError: A file cannot be read, or no prompt is left.
    """
    conversations = split_data(config)[0]
    prompts, no_reference, too_long = [], [], []
    room = config.max_sequence_length - config.rl_max_tokens
    for conversation in conversations:
        if conversation.reference_answer is None:
            no_reference.append(conversation.source)
            continue
        model_input = renderer.build_prompt(conversation)
        if model_input.length > room:
            too_long.append(conversation.source)
            continue
        prompts.append(Prompt(conversation, model_input))
    for sources, why in ((no_reference, "no reference answer to grade against"),
                         (too_long, f"the prompt leaves fewer than RL_MAX_TOKENS="
                                    f"{config.rl_max_tokens} of MAX_SEQUENCE_LENGTH="
                                    f"{config.max_sequence_length} tokens for the answer")):
        if sources:
            console.print(f"[yellow]Warning:[/yellow] skipped {len(sources)} record(s): {why} "
                          f"(the first: {sources[0]})", soft_wrap=True)
    if not prompts:
        raise DataError("no prompt left for RL: every record was skipped (see the warnings)",
                        path=", ".join(config.data_files))
    console.print(f"RL prompts: {len(prompts)}")
    return prompts


def sampling_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt ``index`` (its place in the step's batch) at 0-based ``step``.

    A function of ``(SEED, step, index)`` only (NumPy ``SeedSequence``), so a resumed run samples
    what the uninterrupted run sampled. Returns a 63-bit non-negative int.
    """
    state = np.random.SeedSequence([seed % 2**64, step, index]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def sampling_params(config: TrainConfig, tokenizer, seed: int) -> tinker.types.SamplingParams:
    """The sampling settings of RL: ``RL_TEMPERATURE``, ``RL_MAX_TOKENS``, ``STOP`` (with the
    end-of-turn tokens, as ``tinkerkit eval``), no top-p or top-k (the losses need the sampler's
    log-probabilities of the model's own distribution)."""
    return tinker.types.SamplingParams(
        max_tokens=config.rl_max_tokens, temperature=config.rl_temperature, top_p=1.0, top_k=-1,
        stop=with_end_of_turn(config.stop, tokenizer), seed=seed)


def grade_group(response: tinker.types.SampleResponse, prompt: Prompt, tokenizer,
                grader: Grader, format_reward: float) -> list[Rollout]:
    """Grade each sampled answer of one prompt (decoded as ``tinkerkit eval`` decodes).

    Raises:
        DataError: The sampler returned a sequence without log-probabilities.
    """
    conversation = prompt.conversation
    example = grading_example(conversation) if grader.scores else None
    rollouts = []
    for sequence in response.sequences:
        if sequence.logprobs is None or len(sequence.logprobs) != len(sequence.tokens):
            raise DataError(f"{conversation.source}: the sampler returned no log-probability per "
                            "sampled token; RL needs them")
        tokens, _, verdict = grade_sequence(sequence, conversation.reference_answer, example,
                                            tokenizer, grader)
        reward = grader.reward_of(verdict) + format_reward * (verdict.extracted is not None)
        rollouts.append(Rollout(tokens, [float(x) for x in sequence.logprobs], reward,
                                bool(verdict.equivalent), sequence.stop_reason == "length",
                                verdict.error))
    return rollouts


def group_advantages(rewards: Sequence[float]) -> list[float] | None:
    """Each reward minus the group's mean; None when every reward is the same (no signal).

    Args:
        rewards: The rewards of one prompt's group of answers.

    Returns:
        The advantages (summing to 0), or None for a group that teaches nothing.
    """
    if max(rewards) == min(rewards):
        return None
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def rollout_datum(prompt_tokens: Sequence[int], rollout: Rollout, advantage: float,
                  prompt_logprobs: Sequence[float] | None = None
                  ) -> tuple[tinker.types.Datum, np.ndarray]:
    """The Datum of one answer for Tinker's RL losses, and its answer mask.

    With ``P`` prompt tokens and ``N`` answer tokens the sequence ``prompt + answer`` has
    ``P + N`` tokens; position ``i`` of ``model_input`` predicts token ``i + 1``, so there are
    ``T = P + N - 1`` positions, the first ``P - 1`` of them on the prompt.

    Args:
        prompt_tokens: The prompt's ``P`` tokens.
        rollout: The answer (``N`` tokens and their sampler log-probabilities).
        advantage: The answer's advantage.
        prompt_logprobs: The sampler's log-probabilities of prompt tokens 1 to ``P - 1``
            (``compute_logprobs`` less its first None), for ``dro``, whose penalty
            ``(target_logprobs - logprobs)**2`` reaches prompt positions too; None: 0 there
            (the other losses multiply those positions by their advantage, 0).

    Returns:
        The Datum (``loss_fn_inputs``: ``target_tokens`` int64 ``[T]``, ``logprobs`` float32
        ``[T]``: ``prompt_logprobs`` (or 0) on prompt positions, the sampler's after; ``advantages`` float32 ``[T]``: 0 on
        prompt positions, ``advantage`` after) and the mask (float32 ``[T]``, 1 on answer
        positions).
    """
    tokens = [*prompt_tokens, *rollout.tokens]
    on_prompt = len(prompt_tokens) - 1
    mask = np.concatenate([np.zeros(on_prompt, np.float32), np.ones(len(rollout.tokens),
                                                                    np.float32)])
    on_prompt_logprobs = (np.zeros(on_prompt, np.float32) if prompt_logprobs is None
                          else np.asarray(prompt_logprobs, np.float32))
    logprobs = np.concatenate([on_prompt_logprobs, np.asarray(rollout.logprobs, np.float32)])
    datum = tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tinker.types.TensorData.from_numpy(np.asarray(tokens[1:], np.int64)),
            "logprobs": tinker.types.TensorData.from_numpy(logprobs),
            "advantages": tinker.types.TensorData.from_numpy(mask * np.float32(advantage)),
        })
    return datum, mask


def kl_sampler_learner(sampler_logprobs: np.ndarray, learner_logprobs: np.ndarray,
                       mask: np.ndarray) -> float:
    """The KL divergence KL(sampler || learner) per answer token, estimated on the sampled tokens.

    The estimator is Schulman's k3 ("Approximating KL Divergence", 2020,
    http://joschu.net/blog/kl-approx.html): with ``r = learner_logprob - sampler_logprob`` of a
    token drawn from the sampler, ``exp(r) - 1 - r`` is an unbiased, never negative estimate;
    its mean over the masked positions is returned. 0 when both compute the same log-probabilities.

    Args:
        sampler_logprobs, learner_logprobs, mask: float arrays of one shape (concatenated
            Datums), natural logs; ``mask`` 1 on answer positions.
    """
    r = (learner_logprobs - sampler_logprobs)[mask > 0].astype(np.float64)
    return float(np.mean(np.expm1(r) - r)) if r.size else 0.0


@dataclass
class RLBatch:
    """One step's sampled and graded answers, and the Datums trained on.

    Attributes:
        rollouts: Every answer, grouped by prompt.
        datums: The Datums of the groups with signal; ``masks`` their answer masks.
        groups_skipped: Groups whose rewards were all equal.
    """

    rollouts: list[list[Rollout]]
    datums: list[tinker.types.Datum]
    masks: list[np.ndarray]
    groups_skipped: int


def build_batch(prompts: Sequence[Prompt], groups: Sequence[list[Rollout]],
                prompt_logprobs: Sequence[Sequence[float] | None] | None = None) -> RLBatch:
    """The Datums of a step: one per answer of every group with signal (:func:`group_advantages`).

    Args:
        prompts: The step's prompts; ``groups`` their graded answers, in the same order.
        prompt_logprobs: Per prompt, what :func:`rollout_datum` takes (None: zeros).
    """
    datums, masks, skipped = [], [], 0
    prompt_logprobs = prompt_logprobs or [None] * len(prompts)
    for prompt, rollouts, on_prompt in zip(prompts, groups, prompt_logprobs):
        advantages = group_advantages([r.reward for r in rollouts])
        if advantages is None:
            skipped += 1
            continue
        for rollout, advantage in zip(rollouts, advantages):
            datum, mask = rollout_datum(prompt.model_input.to_ints(), rollout, advantage,
                                        on_prompt)
            datums.append(datum)
            masks.append(mask)
    return RLBatch(list(groups), datums, masks, skipped)


def sample_step(client, prompts: Sequence[Prompt], config: TrainConfig, step: int, tokenizer,
                grader: Grader) -> RLBatch:
    """Sample a group per prompt from the current weights, grade them, build the Datums.

    With ``RL_LOSS=dro`` the sampler also scores each prompt (``compute_logprobs``), so that
    the Datums carry its log-probabilities on prompt positions (:func:`rollout_datum`).
    """
    sampler = client.save_weights_and_get_sampling_client()
    try:
        futures = [sampler.sample(prompt=p.model_input, num_samples=config.rl_group_size,
                                  sampling_params=sampling_params(
                                      config, tokenizer, sampling_seed(config.seed, step, i)))
                   for i, p in enumerate(prompts)]
        prompt_futures = ([sampler.compute_logprobs(p.model_input) for p in prompts]
                          if config.rl_loss == RLLoss.DRO else [])
        responses = [f.result() for f in futures]
        prompt_logprobs = [f.result()[1:] for f in prompt_futures]
    finally:
        sampler.close()
    groups = [grade_group(r, p, tokenizer, grader, config.rl_format_reward)
              for r, p in zip(responses, prompts)]
    return build_batch(prompts, groups, prompt_logprobs)


def batch_metrics(batch: RLBatch) -> dict:
    """The sampling metrics of a step (see docs/RL.md): ``reward_mean``, ``accuracy``,
    ``groups_with_signal`` (fraction), ``groups_skipped``, ``answer_tokens_mean``,
    ``answers_truncated``, ``grading_errors``."""
    answers = [r for group in batch.rollouts for r in group]
    return {
        "reward_mean": float(np.mean([r.reward for r in answers])),
        "accuracy": float(np.mean([r.correct for r in answers])),
        "groups_with_signal": 1 - batch.groups_skipped / len(batch.rollouts),
        "groups_skipped": batch.groups_skipped,
        "answer_tokens_mean": float(np.mean([len(r.tokens) for r in answers])),
        "answers_truncated": sum(r.truncated for r in answers),
        "grading_errors": sum(r.grading_error is not None for r in answers),
    }


def grading_error_warning(batch: RLBatch, step: int) -> str | None:
    """The warning of a step where the ``GRADER`` file failed on some answers, or None.

    Args:
        batch: The step's graded answers; ``step`` its 1-based number.
    """
    failed = [r.grading_error for group in batch.rollouts for r in group
              if r.grading_error is not None]
    if not failed:
        return None
    total = sum(len(group) for group in batch.rollouts)
    return (f"the grader failed on {len(failed)} of {total} answers at step {step} (reward 0, "
            f"as tinkerkit eval counts them wrong; later steps count them in metrics.jsonl "
            f"grading_errors); the first: {failed[0]}")


def run_warnings(records: Sequence[dict], answers_per_step: int) -> list[str]:
    """What an RL run's metrics say went wrong with its learning signal, one line each.

    Args:
        records: The metrics of this invocation's steps (``metrics.jsonl`` lines).
        answers_per_step: ``RL_PROMPTS_PER_STEP * RL_GROUP_SIZE``.

    Returns:
        A line when steps had no group with signal (every answer of every group earned the
        same reward: nothing learned on them), and when more than half of the answers were cut
        at ``RL_MAX_TOKENS``; empty when neither.
    """
    if not records:
        return []
    warnings = []
    empty = sum(r["groups_with_signal"] == 0 for r in records)
    if empty:
        every = "every step" if empty == len(records) else f"{empty} of {len(records)} steps"
        warnings.append(f"{every} had no group with signal: every answer of a group earned the "
                        "same reward, so nothing was learned on those steps (docs/RL.md, 'When "
                        "RL helps': train the format first, use easier prompts or a larger "
                        "RL_GROUP_SIZE, or fix a GRADER that fails: grading_errors)")
    answers = sum(r["answers_truncated"] for r in records)
    total = answers_per_step * len(records)
    if answers * 2 > total:
        warnings.append(f"{answers} of {total} answers were cut at RL_MAX_TOKENS (graded on "
                        "what came before the cut: usually no final answer): raise RL_MAX_TOKENS or train the "
                        "format first")
    return warnings


def learner_metrics(batch: RLBatch, output) -> dict:
    """``kl_sampler_learner`` (:func:`kl_sampler_learner`) from the learner's log-probabilities
    of the trained answers (``forward_backward``'s, before the step's update)."""
    sampler = np.concatenate([d.loss_fn_inputs["logprobs"].to_numpy() for d in batch.datums])
    learner = np.concatenate([np.asarray(o["logprobs"].to_numpy(), np.float32)
                              for o in output.loss_fn_outputs])
    return {"kl_sampler_learner": kl_sampler_learner(sampler, learner,
                                                     np.concatenate(batch.masks))}


def describe(record: StepRecord) -> str:
    """The progress bar's text of an RL step."""
    m = record.metrics
    return (f"epoch {record.epoch} reward {m['reward_mean']:.3f} acc {m['accuracy']:.2f} "
            f"signal {m['groups_with_signal']:.2f} lr {record.lr:.2e}")


def rl(config: TrainConfig, *, run_dir: str | Path | None = None, resume: str | None = None,
       init_from: str | None = None, console: Console | None = None) -> RLResult:
    """Improve a LoRA adapter with RL on verifiable rewards, as ``config`` says, in ``run_dir``.

    Args:
        config: The validated settings (the ``RL_*`` settings, the optimizer's, the run's).
        run_dir: Where logs and checkpoints go (default ``config.run_dir`` or ``runs/<time>``).
        resume: A run directory or checkpoint of an RL run to continue exactly.
        init_from: A checkpoint (or a run directory: its latest one), usually of supervised
            training, whose weights RL starts from (fresh optimizer); None: the base model.
        console: Where to print.

    Returns:
        The :class:`RLResult`.

    Raises:
        ConfigError, DataError, ModelError, CheckpointError: Bad settings, data or checkpoints.
        TrainingDivergedError: The loss or gradient norm became NaN/inf.
        EngineError: The engine failed a step (the message names the checkpoint to resume from).
        ExportError: ``EXPORT_AFTER_TRAINING`` and the export failed.
    """
    console = console or Console()
    start = start_run(config, run_dir, resume, init_from, rl=True)
    run_dir, start_step = start.run_dir, start.start_step
    check_trackers(config.report_to)
    tokenizer = engines.load_engine_tokenizer(config)
    with GraderConfig.from_config(config).build() as grader:  # a broken grader stops here
        held_out = load_held_out(config, tokenizer, console, grader=grader)
        prompts = load_prompts(config, make_renderer(config, tokenizer), console)
        per_epoch, total_steps = plan_steps(len(prompts), config, config.rl_prompts_per_step,
                                            "RL_PROMPTS_PER_STEP")
        if start.finished(total_steps, console):
            return RLResult(run_dir, start.resumed["path"], start_step, [])
        client, resolved, kept, logged_through = open_client(config, start, console)
        console.print(f"RL for {plural(total_steps, 'step')} ({config.rl_prompts_per_step} "
                      f"prompts x {config.rl_group_size} answers, loss {config.rl_loss.value}) in {run_dir}")
        started = time.perf_counter()
        with open_trackers(config.report_to, run_dir, resolved, kept, logged_through) as trackers:
            with progress_bar(console) as progress, interrupt_names_checkpoint(run_dir):
                task = progress.add_task("rl", total=total_steps, completed=start_step, info="")
                log = StepLog(run_dir, progress, task, 0, trackers, describe)
                timer = StepTimer()
                logged = []  # this invocation's step metrics
                grader_warned = False
                for step in range(start_step, total_steps):
                    epoch, indices = batch_indices(step, len(prompts),
                                                   config.rl_prompts_per_step, config.seed)
                    lr = learning_rate_at(step, total_steps, config)
                    batch = sample_step(client, [prompts[i] for i in indices], config, step,
                                        tokenizer, grader)
                    failed = None if grader_warned else grading_error_warning(batch, step + 1)
                    if failed:
                        console.print(f"[yellow]Warning:[/yellow] {failed}", soft_wrap=True)
                        grader_warned = True
                    record = train_step(client, batch, config, step, epoch, lr, run_dir, timer)
                    if is_due(step + 1, config.eval_every, total_steps):
                        record.evaluations["eval_loss"] = sum(
                            float(client.forward(b, "cross_entropy").result().metrics["loss:sum"])
                            for b in held_out.batches)
                    if is_due(step + 1, config.sample_eval_every, total_steps):
                        record.evaluations.update(sample_evaluations(client, held_out, config,
                                                                     console))
                    log.write(record)
                    logged.append(record.metrics)
                    if config.save_every and (step + 1) % config.save_every == 0 \
                            and step + 1 < total_steps:
                        save_checkpoint(client, run_dir, step + 1, epoch)
            final_checkpoint = save_checkpoint(client, run_dir, total_steps,
                                               (total_steps - 1) // per_epoch)
            wall = time.perf_counter() - started
            exported = export_final(final_checkpoint, run_dir, config, console)
            plot_curves(run_dir, REWARD_PLOT, [("reward_mean", "reward (mean)", "-"),
                                               ("accuracy", "accuracy of the samples", "-"),
                                               ("eval_accuracy", "held-out accuracy", "o-")],
                        "reward / accuracy")
            summary = write_summary(console, run_dir, total_steps - start_step, wall,
                                    final_checkpoint, exported, engines.backend_of(config),
                                    extra=_reward_summary(run_dir))
            trackers.summarize(summary, total_steps)
            for warning in run_warnings(logged, config.rl_prompts_per_step * config.rl_group_size):
                console.print(f"[yellow]Warning:[/yellow] {warning}", soft_wrap=True)
    return RLResult(run_dir, final_checkpoint, total_steps,
                    [metrics["reward_mean"] for metrics in logged])


def train_step(client, batch: RLBatch, config: TrainConfig, step: int, epoch: int, lr: float,
               run_dir: Path, timer: StepTimer) -> StepRecord:
    """``forward_backward`` and ``optim_step`` on the batch's Datums, awaited and checked
    (:func:`~tinkerkit.train.loop.await_step`); a batch without Datums (no group with signal)
    changes nothing and is logged with loss 0.

    Returns:
        The step's record; ``loss`` is the loss's ``loss:sum`` per answer token trained on.
    """
    metrics = batch_metrics(batch)
    answer_tokens = int(sum(m.sum() for m in batch.masks))
    total_tokens = sum(d.model_input.length + 1 for d in batch.datums)
    if not batch.datums:
        metrics["kl_sampler_learner"] = None
        return StepRecord(step + 1, epoch + 1, 0.0, lr, 0, 0, timer.lap(), {}, metrics)
    forward_backward = client.forward_backward(batch.datums, config.rl_loss.value,
                                               dict(config.rl_loss_config) or None)
    pending = PendingStep(step, epoch, lr, answer_tokens, total_tokens, forward_backward,
                          client.optim_step(adam_params(config, lr)))
    record = await_step(pending, run_dir, timer)
    metrics.update(learner_metrics(batch, forward_backward.result()))
    return dataclasses.replace(record, loss=record.loss / answer_tokens, metrics=metrics,
                               evaluations=dict(record.evaluations))


def _reward_summary(run_dir: Path) -> dict:
    """``first_10_mean_reward``, ``last_10_mean_reward``, ``last_10_mean_accuracy`` and
    ``grading_errors`` (all steps)."""
    records = files.read_jsonl(run_dir / METRICS_FILE)
    rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
    if not rewards:
        return {}
    return {"first_10_mean_reward": float(np.mean(rewards[:10])),
            "last_10_mean_reward": float(np.mean(rewards[-10:])),
            "last_10_mean_accuracy": float(np.mean([r["accuracy"] for r in records][-10:])),
            "grading_errors": sum(r.get("grading_errors", 0) for r in records)}

