"""The ``tinkerkit`` command: split, stats, train, rl, eval, export, chat, demo, serve.

Every error a user can cause ends in one line on stderr and a non-zero exit code (1), never a
traceback; set ``TINKERKIT_DEBUG=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from rich.console import Console

from tinkerkit.errors import ConfigError, TinkerkitError

# Each command imports the modules it runs when it runs (the one exception to imports at the top):
# `tinkerkit --help` or a usage error then answers in 0.06 s, where importing every command's
# modules (torch, transformers, PEFT) first takes 4.2 s (measured on 2 cores).

console = Console()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import transformers

    # Library notices that say nothing actionable to a tinkerkit user.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", message=r".*base_model_name_or_path.* was renamed")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# -- split and stats ---------------------------------------------------------------------------

def cmd_split(args: argparse.Namespace) -> None:
    from tinkerkit.data.split import run_split

    tokenizer = None
    if args.tokenizer:
        from tinkerkit.models import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
    test_ratio = None if args.test_size is not None else args.test_ratio
    run_split(args.files, args.output_dir, test_ratio=test_ratio, test_size=args.test_size,
              seed=args.seed, format=args.format, on_error=args.on_error, tokenizer=tokenizer,
              console=console)


def cmd_stats(args: argparse.Namespace) -> None:
    from tinkerkit.data.formats import load_conversations
    from tinkerkit.models import load_tokenizer
    from tinkerkit.render import Renderer, print_render_stats

    loaded = load_conversations(args.files, format=args.format, on_error=args.on_error)
    renderer = Renderer(load_tokenizer(args.model), args.train_on, args.max_length,
                        truncate=not args.no_truncate)
    examples, stats = renderer.render_dataset(loaded.conversations)
    console.print(f"{sum(loaded.counts.values())} records from {len(args.files)} file(s), "
                  f"model {args.model}")
    print_render_stats(stats, console, args.max_length, skipped_records=loaded.skipped)
    from tinkerkit.train import positions_warning

    warning = positions_warning(examples, args.model)
    if warning:
        console.print(f"[yellow]Warning: {warning}[/yellow]")


# -- train --------------------------------------------------------------------------------------

def _train_fields(args: argparse.Namespace) -> dict:
    return {"data_files": args.data, "base_model": args.model, "lora_rank": args.rank,
            "learning_rate": args.lr, "num_epochs": args.epochs, "batch_size": args.batch_size,
            "max_steps": args.max_steps, "max_sequence_length": args.max_length,
            "strict": args.strict, "backend": args.backend, "grader": args.grader}


def _run_config(args: argparse.Namespace):
    """The config of ``train`` or ``rl``: the config file and flags, or with ``--resume`` and no
    ``--config`` the run's saved config under the flags."""
    from tinkerkit.config import load_config, parse_overrides
    from tinkerkit.train import config_for_resume, resolve_resume

    if args.resume and args.init_from:
        raise ConfigError("--resume and --init-from exclude each other")
    if args.resume and not args.config:
        run_dir, _ = resolve_resume(args.resume)
        fields = {k: v for k, v in _train_fields(args).items() if v is not None}
        return config_for_resume(run_dir, {**fields, **parse_overrides(args.set)})
    return load_config(args.config, args.set, **_train_fields(args))


def cmd_train(args: argparse.Namespace) -> None:
    from tinkerkit.train import dry_run, train

    config = _run_config(args)
    if args.dry_run:
        if args.resume or args.init_from:
            raise ConfigError("--dry-run plans a new run from the base model; it takes no "
                              "--resume or --init-from")
        dry_run(config, console=console)
        return
    train(config, run_dir=args.run_dir, resume=args.resume, init_from=args.init_from,
          console=console)


def cmd_rl(args: argparse.Namespace) -> None:
    from tinkerkit.rl import rl

    rl(_run_config(args), run_dir=args.run_dir, resume=args.resume, init_from=args.init_from,
       console=console)


# -- eval ---------------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> None:
    from tinkerkit.evaluate import compare_results, load_results

    if args.compare:
        compare_results(load_results(args.compare[0]), load_results(args.compare[1]), console,
                        names=(args.compare[0], args.compare[1]))
        return
    from tinkerkit.config import load_config, parse_overrides
    from tinkerkit.evaluate import run_evaluation
    from tinkerkit.train import check_evaluation_trackers, report_evaluation

    config = load_config(args.config, args.set, base_model=args.model, max_tokens=args.max_tokens,
                         temperature=args.temperature, eval_limit=args.limit, grader=args.grader,
                         backend=args.backend)
    # A base model named on the command line (--model, or --set BASE_MODEL=) is the user's
    # choice, checked against a checkpoint's own; one from a config file yields to it.
    chosen = args.model or parse_overrides(args.set).get("base_model")
    data = args.data or config.test_files
    if not data:
        raise ConfigError("no test data: pass --data FILE (or set TEST_FILES in the config)")
    check_evaluation_trackers(args.checkpoint)  # the run's trackers, before the model loads
    result = run_evaluation(config, data=data if isinstance(data, list) else [data],
                            checkpoint=args.checkpoint, output=args.output,
                            num_samples=args.num_samples, console=console, base_model=chosen)
    reported = report_evaluation(args.checkpoint, result.metrics)
    if reported:
        console.print(f"Reported to the run's trackers: {', '.join(reported)}")


# -- export -------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> None:
    from tinkerkit.checkpoint import resolve_checkpoint
    from tinkerkit.export import export_checkpoint

    result = export_checkpoint(resolve_checkpoint(args.checkpoint), args.output,
                               merge=args.merge or args.gguf is not None, dtype=args.dtype,
                               base_model=args.model, logit_check=not args.no_logit_check)
    console.print(f"PEFT adapter: {result.adapter_dir}")
    if result.vllm_adapter_dir is not None:
        console.print(f"Per-expert adapter (vLLM's MoE layout): {result.vllm_adapter_dir}")
    if result.merged_dir is None:
        return
    console.print(f"Merged model ({result.dtype}): {result.merged_dir}  "
                  f"{result.merged_tensors} tensors merged, each checked", soft_wrap=True)
    if result.logit_check_skipped is not None:
        console.print(f"Logit check skipped: {result.logit_check_skipped}", soft_wrap=True)
    else:
        console.print(f"Logit check: max |logit diff| = {result.max_logit_diff:.3g} "
                      f"(tolerance {result.tolerance:.3g})")
    if args.gguf is not None:
        from tinkerkit.export_gguf import export_gguf

        gguf = export_gguf(result.merged_dir, Path(args.output) / f"model-{args.gguf}.gguf",
                           args.gguf)
        console.print(f"GGUF ({gguf.gguf_type}): {gguf.path}  max |logit diff| = "
                      f"{gguf.max_logit_diff:.3g} vs the merged model (tolerance "
                      f"{gguf.tolerance:.3g})", soft_wrap=True)


def cmd_chat(args: argparse.Namespace) -> None:
    from tinkerkit.chat import run_chat
    from tinkerkit.config import load_config

    config = load_config(args.config, args.set, max_tokens=args.max_tokens,
                         temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         backend=args.backend)
    # Ctrl-C stops the answer being generated, not the session: every press is an interrupt
    # (the console script otherwise ignores all but the first).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_chat(config, args.model, prompt=args.prompt, system=args.system,
             thinking=not args.no_thinking, seed=args.seed, console=console)


def cmd_demo(args: argparse.Namespace) -> None:
    from tinkerkit.demo import run_demo

    run_demo(Path(args.output_dir), console=console, quick=args.quick, overrides=args.set)


def cmd_serve(args: argparse.Namespace) -> None:
    import logging
    import socket

    from tinkerkit.serve import make_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    server = make_server(args.host, args.port, root=args.root, models_file=args.models,
                         api_keys_file=args.api_keys, device=args.device)
    url = f"http://{args.host}:{server.server_port}"
    # A wildcard bind is reached by one of the machine's addresses, not by the wildcard itself.
    client_host = socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host
    client_url = f"http://{client_host}:{server.server_port}"
    keys = "keys from " + args.api_keys if args.api_keys else "any tml- key (loopback only)"
    console.print(f"tinkerkit serve on {url}  (root {server.state.store.root}; {keys})\n"
                  f"served models: {', '.join(server.state.registry.names())}\n"
                  f"point the tinker SDK at it: export TINKER_BASE_URL={client_url}", soft_wrap=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


# -- parser -------------------------------------------------------------------------------------

def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", help="force a record shape (messages, prompt_completion, "
                   "question_answer, math, s1k, alpaca)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="stop at a malformed record (default) or skip and count it")


_BACKEND_HELP = ("BACKEND: local (in process) or tinker (the tinker SDK: the hosted service, or "
                 "`tinkerkit serve` at TINKER_BASE_URL)")
_GRADER_HELP = ("GRADER: a Python file of your own grading functions (extract_final_answer, "
                "check_answer_exact_match, check_answer_contains, check_answer_equivalent, "
                "score); what it does not define stays built in")


def _run_options(p: argparse.ArgumentParser) -> None:
    """The options of ``train`` and ``rl``."""
    p.add_argument("--config", help="config.py, .toml or .yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir")
    p.add_argument("--resume", metavar="PATH", help="a run directory or checkpoint to continue")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start a new stage from a checkpoint's weights (fresh optimizer); a run "
                   "directory means its latest checkpoint")
    p.add_argument("--data", nargs="+", help="DATA_FILES")
    p.add_argument("--model", help="BASE_MODEL")
    p.add_argument("--backend", choices=["local", "tinker"], help=_BACKEND_HELP)
    p.add_argument("--rank", type=int, help="LORA_RANK")
    p.add_argument("--lr", type=float, help="LEARNING_RATE")
    p.add_argument("--epochs", type=int, help="NUM_EPOCHS")
    p.add_argument("--batch-size", type=int, help="BATCH_SIZE")
    p.add_argument("--max-steps", type=int, help="MAX_STEPS")
    p.add_argument("--max-length", type=int, help="MAX_SEQUENCE_LENGTH")
    p.add_argument("--strict", action="store_true", default=None,
                   help="STRICT: stop before training when too many examples are too long")
    p.add_argument("--grader", metavar="FILE", help=_GRADER_HELP)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit code 2), like every other tinkerkit error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="tinkerkit", description="LoRA fine-tuning for the Tinker workflow: split, stats, "
        "train, rl, eval, export, chat, demo, serve. Run `tinkerkit COMMAND -h` for a command's "
        "options.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="merge data files and split them into train and test sets")
    p.add_argument("files", nargs="+")
    p.add_argument("--test-ratio", type=float, default=0.2)
    p.add_argument("--test-size", type=int)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", default="data")
    p.add_argument("--tokenizer", help="also count tokens with this model's tokenizer")
    _data_options(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("stats", help="token length statistics and truncation counts of data files")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-length", type=_positive_int, help="MAX_SEQUENCE_LENGTH in tokens")
    p.add_argument("--no-truncate", action="store_true", help="count long examples as skipped")
    p.add_argument("--train-on", choices=["all_assistant", "last_assistant"], default="all_assistant")
    _data_options(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("train", help="train a LoRA adapter")
    _run_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="render the data, print statistics, steps and time per step; no "
                   "training (with BACKEND=tinker: no session, nothing timed)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("rl", help="reinforcement learning with verifiable rewards: sample "
                       "answers, grade them as eval does, train on the better ones")
    _run_options(p)
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("eval", help="sample answers on a test set and grade them")
    p.add_argument("--model", help="BASE_MODEL")
    p.add_argument("--checkpoint", help="a checkpoint or adapter directory (default: base model)")
    p.add_argument("--data", nargs="+", help="test file(s)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples (EVAL_LIMIT)")
    p.add_argument("--output", default="evaluation_results.json",
                   help="results JSON (default: %(default)s); the Markdown report goes beside it "
                        "with the suffix .md")
    p.add_argument("--num-samples", type=int, default=1, help="samples per problem (pass@k)")
    p.add_argument("--max-tokens", type=int, help="most generated tokens per answer (MAX_TOKENS)")
    p.add_argument("--temperature", type=float, help="0 = greedy (TEMPERATURE)")
    p.add_argument("--grader", metavar="FILE", help=_GRADER_HELP)
    p.add_argument("--backend", choices=["local", "tinker"], help=_BACKEND_HELP)
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                   help="compare two evaluation_results.json files")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint or adapter directory (PEFT's or "
                                      "Tinker's layout) as a PEFT adapter (and merged model)")
    p.add_argument("checkpoint", help="a checkpoint, run directory, tinker:// path or adapter "
                                      "directory")
    p.add_argument("--output", required=True)
    p.add_argument("--merge", action="store_true",
                   help="also write a merged HF model (streamed shard by shard)")
    p.add_argument("--no-logit-check", action="store_true",
                   help="skip the merged model's end-to-end logit check (each merged tensor is "
                        "still checked); it is skipped anyway for a model too large for memory")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--gguf", choices=["f16", "q8_0"],
                   help="also write OUTPUT/model-TYPE.gguf for llama.cpp (implies --merge)")
    p.add_argument("--model", help="the base model, for an adapter that names none (default: "
                                   "the one recorded with the checkpoint)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("chat", help="chat with a model or checkpoint in the terminal")
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                   help="a registry name, HF model directory, checkpoint or adapter directory, "
                   "run directory (its latest checkpoint) or tinker:// path")
    p.add_argument("--prompt", help="ask this once, print the answer and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, help="TEMPERATURE (default 0: greedy)")
    p.add_argument("--top-p", type=float, help="TOP_P")
    p.add_argument("--top-k", type=int, help="TOP_K (-1: off)")
    p.add_argument("--max-tokens", type=int, help="MAX_TOKENS per answer")
    p.add_argument("--seed", type=int, help="sampling seed (default: a fresh one per answer)")
    p.add_argument("--no-thinking", action="store_true",
                   help="ask reasoning models (Qwen3) to answer without thinking first")
    p.add_argument("--backend", choices=["local", "tinker"], help=_BACKEND_HELP)
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="the whole pipeline on generated arithmetic problems")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo setting, e.g. --set 'REPORT_TO=[tensorboard, mlflow]'")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve the local engine over Tinker's HTTP API "
                       "(set TINKER_BASE_URL to its URL)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs --api-keys)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--root", help="directory of runs and checkpoints "
                   "(default ~/.cache/tinkerkit/serve)")
    p.add_argument("--models", metavar="FILE",
                   help="JSON/TOML file mapping Tinker base model names to local models")
    p.add_argument("--api-keys", metavar="FILE", help="accepted API keys (tml-...), one per line")
    p.add_argument("--device", default="auto", help="engine device: auto, cpu, cuda, cuda:1, ...")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tinkerkit`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _quiet_libraries()
        args.func(args)
    except TinkerkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path that cannot be written or read (exists as a file, no permission)
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # TrainingInterrupted says where the run resumes from
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line unless debugging
        if os.environ.get("TINKERKIT_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (TINKERKIT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


def _interrupt_once(signum: int, frame: object) -> None:
    """Ctrl-C: a ``KeyboardInterrupt``, the first time only (later ones are ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def run() -> None:
    """The ``tinkerkit`` console script: :func:`main`, then its exit code.

    After Ctrl-C (exit code 130) the process ends at once, without waiting for the engine's worker
    threads to finish the steps queued behind the interrupted one, and a second Ctrl-C is
    ignored: waiting there is what a user pressing Ctrl-C does not want, and a second interrupt
    while the first one unwinds (or during the interpreter's shutdown) aborted it with a
    traceback. Everything written is written
    atomically (checkpoints, results) or line by line (logs), as after a kill.
    """
    signal.signal(signal.SIGINT, _interrupt_once)
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
