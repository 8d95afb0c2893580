"""The `finesmith` command: each subcommand parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from finesmith import __version__
from finesmith.config import METHODS
from finesmith.errors import FinesmithError

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that say how to get help."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}; see `{self.prog} --help`\n")
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> Parser:
    parser = Parser(prog="finesmith", description="Fine-tune a language model into a specialist for your task.")
    parser.add_argument("--version", action="version", version=f"finesmith {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser("train", help="fine-tune a model", description=(
        "Fine-tune a model. Settings come from an optional YAML file, then key=value overrides "
        "(e.g. lora.r=8), then the flags below."))
    train.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    train.add_argument("--model", help="built-in alias (smollm2-135m-instruct), model folder, .gguf file or hub id")
    train.add_argument("--data", help="training JSONL: chat messages, Alpaca or prompt/completion")
    train.add_argument("--eval-data", help="held-out JSONL for eval loss")
    train.add_argument("--method", choices=METHODS, help="full: all weights; lora: low-rank adapters (default)")
    train.add_argument("--output", help="run folder to write")
    train.add_argument("--epochs", type=float)
    train.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 lora, 2e-5 full)")
    train.add_argument("--batch-size", type=int, help="examples per micro-batch")
    train.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    train.add_argument("--max-length", type=int, help="max tokens per example")
    train.add_argument("--seed", type=int)
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --output")

    ev = sub.add_parser("eval", help="measure answer accuracy on a held-out file")
    ev.add_argument("--model", required=True, help="base model, or a finesmith run folder")
    ev.add_argument("--adapter", help="LoRA adapter folder to put on --model")
    ev.add_argument("--data", required=True, help="held-out JSONL; the last assistant turn is the reference")
    ev.add_argument("--shots", type=int, default=0, help="k examples placed as earlier chat turns")
    ev.add_argument("--shots-from", help="JSONL to draw the shots from (usually the training file)")
    ev.add_argument("--output", help="write results JSON here")
    ev.add_argument("--seed", type=int, default=42)
    ev.add_argument("--limit", type=int, help="evaluate only the first N examples")
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--batch-size", type=int, default=16)

    demo = sub.add_parser("demo", help="fine-tune the built-in model on the built-in task and compare")
    demo.add_argument("--output", default="runs/demo", help="folder for the demo run")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from finesmith.config import load_config
    from finesmith.pipeline import train

    positional = list(args.config_and_overrides)
    path = positional.pop(0) if positional and "=" not in positional[0] else None
    flags = {"model": args.model, "data": args.data, "eval_data": args.eval_data, "method": args.method,
             "output": args.output, "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr,
             "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length,
             "seed": args.seed}
    train(load_config(path, positional, flags), overwrite=args.overwrite)


def cmd_eval(args: argparse.Namespace) -> None:
    from finesmith.pipeline import console, evaluate

    result = evaluate(args.model, args.data, args.adapter, args.shots, args.shots_from, args.seed,
                      args.limit, args.max_new_tokens, args.batch_size)
    console.print(f"accuracy {result.accuracy:.3f} ({sum(p['correct'] for p in result.predictions)}/{result.n}) "
                  f"· {args.shots}-shot · {args.data}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        console.print(f"results written to {args.output}")


def cmd_demo(args: argparse.Namespace) -> None:
    from finesmith.demo import run_demo

    run_demo(Path(args.output))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo}


def quiet_libraries() -> None:
    """Keep library progress bars and advisory warnings out of the user's terminal."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        COMMANDS[args.command](args)
    except FinesmithError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
