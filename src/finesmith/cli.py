"""The `finesmith` command: each subcommand parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from finesmith import __version__
from finesmith.config import METHODS
from finesmith.errors import FinesmithError

if TYPE_CHECKING:
    from finesmith.evaluate.tasks import EvalOptions

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT during training: checkpoint saved, run with --resume to continue


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
    train.add_argument("--data", help="training data (.jsonl/.json/.csv/.parquet, .txt/.md or a folder); sets data.path")
    train.add_argument("--eval-data", help="held-out JSONL for eval loss")
    train.add_argument("--method", choices=METHODS, help="full: all weights; lora: low-rank adapters (default); "
                       "qlora: LoRA on a 4-bit base (CUDA); prompt_tuning, prefix_tuning: virtual tokens; "
                       "ia3: learned scaling vectors")
    train.add_argument("--output", help="run folder to write")
    train.add_argument("--epochs", type=number_or_auto(float), help="passes over the data, or auto")
    train.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    train.add_argument("--lr", type=number_or_auto(float), help="peak learning rate, or auto (the method's default)")
    train.add_argument("--batch-size", type=number_or_auto(int), help="examples per micro-batch, or auto")
    train.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    train.add_argument("--max-length", type=int, help="max tokens per example")
    train.add_argument("--seed", type=int)
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --output")
    train.add_argument("--dry-run", action="store_true",
                       help="check config and data, print the predicted memory and time, train nothing "
                       "(exit non-zero when it would not fit)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output from its latest complete checkpoint (staged runs: "
                            "finished stages are skipped)")
    train.add_argument("--extend", action="store_true",
                       help="with --resume: continue to another max_steps/epochs (usually larger); the remaining steps follow a "
                            "new cosine from the current learning rate")
    launch = train.add_argument_group("several processes (started with torchrun; also: torchrun ... -m finesmith train ...)")
    launch.add_argument("--nproc-per-node", type=int, help="processes on this machine (one per GPU; on a CPU: gloo ranks)")
    launch.add_argument("--nnodes", help="machines taking part, e.g. 2 (torchrun's rendezvous)")
    launch.add_argument("--node-rank", type=int, help="this machine's index (static rendezvous)")
    launch.add_argument("--rdzv-endpoint", help="HOST:PORT every machine can reach (torchrun's c10d rendezvous)")
    launch.add_argument("--rdzv-id", help="job id shared by the machines of one run")
    train.add_argument("--skip-invalid", action="store_true", default=None,
                       help="drop invalid examples (counted) instead of refusing; see max_invalid_fraction")

    ev = sub.add_parser("eval", help="measure answer accuracy on a held-out file")
    ev.add_argument("--model", required=True, help="base model, or a finesmith run folder")
    ev.add_argument("--adapter", help="LoRA adapter folder to put on --model")
    ev.add_argument("--data", required=True, help="held-out JSONL; the last assistant turn is the reference")
    ev.add_argument("--output", help="write results JSON here")
    add_eval_options(ev)
    ev.add_argument("--shots", type=int, default=0, help="k training examples shown before each query")

    cmp = sub.add_parser("compare", help="base model zero-shot and k-shot vs fine-tuned runs, as a report",
                         description="Evaluate the base model (zero-shot, and k-shot with --shots) and each "
                                     "fine-tuned RUN folder on the same held-out file; write DIR/report.md and "
                                     "a self-contained DIR/report.html.")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="finesmith run folder (output of `finesmith train`)")
    cmp.add_argument("--base", required=True, help="the base model the runs started from")
    cmp.add_argument("--data", required=True, help="held-out file shared by every approach")
    cmp.add_argument("--output", required=True, metavar="DIR", help="report folder")
    add_eval_options(cmp)
    cmp.add_argument("--shots", type=shot_list, default=None, metavar="K[,K...]", dest="shot_sweep",
                     help="k to sweep for the base model, e.g. 1,4,8 (the default with --shots-from); zero-shot always "
                          "runs, and the verdict uses the best prompting result")

    add_export_and_serve_commands(sub)

    add_data_commands(sub)

    add_advise_command(sub)

    demo = sub.add_parser("demo", help="fine-tune the built-in model on the built-in task and compare")
    demo.add_argument("--output", default="runs/demo", help="folder for the demo run")
    return parser


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """`finesmith data check` and `finesmith data scan`."""
    data = sub.add_parser("data", help="check a data file, or scan it for sensitive data")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    check = data_sub.add_parser("check", help="list every problem of a data file, with file:line, and its statistics")
    check.add_argument("file", help="training data (.jsonl/.json/.csv/.parquet, .txt/.md or a folder)")
    check.add_argument("--model", required=True, help="model whose tokenizer and chat template count the tokens")
    check.add_argument("--max-length", type=int, default=1024, help="max tokens per example in training")
    check.add_argument("--truncation", choices=("truncate", "drop"), default="truncate")
    check.add_argument("--eval-data", help="held-out file: validated too, and checked for overlap")
    check.add_argument("--show", type=int, default=0, metavar="N", help="render N examples with trained tokens highlighted")
    check.add_argument("--format", default="auto", help="auto, chat, sharegpt, alpaca, prompt_completion, text or preference")
    check.add_argument("--tool-format", default="template", choices=("template", "hermes"),
                       help="template: the model's own chat template must render tools; hermes: render tools, "
                            "calls and results as text (see README)")
    check.add_argument("--thinking", default="auto", choices=("auto", "on", "off"),
                       help="reasoning models: train with or without thinking, as `thinking:` in the config")
    check.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN",
                       help="read field NAME from COLUMN (repeatable), e.g. --field output=answer")
    check.add_argument("--objective", default="sft", choices=("sft", "grpo"),
                       help="grpo: check the rows as prompts for reinforcement (a conversation ending in a user "
                            "turn, or the prompt of an SFT row), the other fields as what rewards and graders read")
    scan = data_sub.add_parser("scan", help="count sensitive data (PII, secrets) by kind with file:line, never the values")
    scan.add_argument("file")
    scan.add_argument("--redact", metavar="OUT", help="write a redacted copy to OUT (the input is left untouched)")
    vocab = data_sub.add_parser("vocab", help="tokens per word on a corpus vs general English, and terms worth adding")
    vocab.add_argument("corpus", help="folder (searched recursively) or file: .txt .md .html .pdf, or .jsonl with `text`")
    vocab.add_argument("--model", required=True, help="model whose tokenizer is measured")
    vocab.add_argument("--top", type=int, default=20, help="fragmented terms to list (and add for the saving estimate)")
    vocab.add_argument("--output", help="write the report as JSON here")


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `eval` and `compare`; they fill `finesmith.evaluate.tasks.EvalOptions`."""
    parser.add_argument("--task", default="auto", choices=("auto", "classification", "generation", "perplexity", "tool_call"),
                        help="auto: classification when the references are a few repeated labels, else generation; "
                             "perplexity for raw text")
    parser.add_argument("--scoring", default="both", choices=("generate", "loglik", "both"),
                        help="classification: greedy answers, label log-likelihood, or both")
    parser.add_argument("--shots-from", help="file to draw the shots from (usually the training file)")
    parser.add_argument("--shot-strategy", default="auto", choices=("auto", "random", "balanced", "similar"),
                        help="auto (balanced for classification, else random), random (seeded), balanced (round-robin "
                             "over labels), similar (BM25 over prompts, per query)")
    parser.add_argument("--vary-shots", action="store_true",
                        help="random/balanced: draw the shots per query instead of the same shots, in the same order, "
                             "before every query")
    parser.add_argument("--shot-format", default="chat", choices=("chat", "inline"),
                        help="chat: shots as earlier turns; inline: worked examples in one user message")
    parser.add_argument("--max-prompt-tokens", type=int, help="drop shots until each prompt fits (never cuts the query)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward, at most")
    parser.add_argument("--thinking", default="auto", choices=("auto", "on", "off"),
                        help="reasoning models: ask with thinking on or off (default: the model's template; a run "
                             "asks as it was trained, and compare asks the base model the way its runs were trained)")
    parser.add_argument("--eval-memory", default="auto", metavar="SIZE",
                        help="memory the evaluation may use beyond the model's weights, e.g. 4GB (default auto: half "
                             "the free RAM, 80%% of the free GPU memory); batch and decoding pool sizes follow from it")
    add_precision_flag(parser)


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="model dtype for inference: auto = bf16 on CUDA, fp32 on CPU (where half precision "
                             "is emulated and slower); fp32 keeps full precision everywhere")


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The evaluation flags as an `EvalOptions`."""
    from finesmith.evaluate.tasks import EvalOptions

    return EvalOptions(task=args.task, shots=getattr(args, "shots", 0),
                       shot_strategy=args.shot_strategy, shot_format=args.shot_format, fixed_shots=not args.vary_shots,
                       max_prompt_tokens=args.max_prompt_tokens, scoring=args.scoring, seed=args.seed,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, precision=args.precision,
                       memory=args.eval_memory, thinking=args.thinking)


def shot_list(text: str) -> list[int]:
    """`1,4,8` as [1, 4, 8] (argparse type of `compare --shots`)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give shot counts as integers separated by commas, e.g. 1,4,8")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more shot counts of 0 or more, e.g. 1,4,8")
    return values


def number_or_auto(kind: type) -> Any:
    """argparse type: a number of `kind`, or the word auto."""

    def parse(text: str) -> Any:
        if text == "auto":
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or auto, got '{text}'") from None

    return parse


def launch_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this same `train` command under torchrun, one process per `--nproc-per-node`."""
    import subprocess

    if args.nproc_per_node < 1:
        raise FinesmithError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc_per_node)]
    if args.nnodes:
        launcher += ["--nnodes", str(args.nnodes)]
    if args.node_rank is not None:
        launcher += ["--node-rank", str(args.node_rank)]
    if args.rdzv_endpoint:
        launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint]
    if args.rdzv_id:
        launcher += ["--rdzv-id", args.rdzv_id]
    if not (args.nnodes or args.rdzv_endpoint):
        launcher += ["--standalone"]  # one machine: a free local port, nothing to configure
    rest, skip = [], False
    for item in argv:  # the same command without the launch flags
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in item
            continue
        rest.append(item)
    return subprocess.call(launcher + ["-m", "finesmith"] + rest)


def run_state(output: Path) -> str | None:
    """The state in a run folder's record, if it has one."""
    record = output / "run.json"
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("state")
    except (OSError, ValueError):
        return None


LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id")


def cmd_train(args: argparse.Namespace) -> int:
    from finesmith.config import load_config
    from finesmith.pipeline import train


    positional = list(args.config_and_overrides)
    path = positional.pop(0) if positional and "=" not in positional[0] else None
    flags = {"model": args.model, "data.path": args.data, "eval_data": args.eval_data, "method": args.method,
             "output": args.output, "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr,
             "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length,
             "seed": args.seed, "skip_invalid": args.skip_invalid}
    from finesmith.domain.stages import has_stages, run_stages
    from finesmith.train.loop import Preempted

    if args.extend and not args.resume:
        raise FinesmithError("--extend continues a run to a new horizon; use it together with --resume")
    if args.nproc_per_node is not None and "WORLD_SIZE" not in os.environ:
        if has_stages(path):
            raise FinesmithError("--nproc-per-node runs one training config; launch each stage's config with it")
        from finesmith.pipeline import check_world
        from finesmith.train.distributed import World

        config = load_config(path, positional, flags).validate()  # bad settings fail here, once
        nodes = int(str(args.nnodes or "1").split(":")[0])
        check_world(config, World(0, args.nproc_per_node * nodes, 0))
        output = Path(config.output)
        code = launch_torchrun(args, args.argv)
        if code and run_state(output) == "preempted":
            sys.stderr.write(f"stopped with a checkpoint in {output}; continue with the same command plus --resume "
                             "(on any number of processes)\n")
            return EXIT_PREEMPTED
        return code
    if has_stages(path):  # continued pre-training then instruction tuning, one stage after another
        try:
            run_stages(path, positional, overwrite=args.overwrite, flags=flags, resume=args.resume,
                       dry_run=args.dry_run, extend=args.extend)
        except Preempted as stopped:
            sys.stderr.write(f"{stopped}; continue the staged run with the same command plus --resume\n")
            return EXIT_PREEMPTED
        return 0
    if args.dry_run:
        from finesmith.pipeline import dry_run

        dry_run(load_config(path, positional, flags))
        return 0
    try:
        train(load_config(path, positional, flags), overwrite=args.overwrite, resume=args.resume,
              extend=args.extend)
    except Preempted as stopped:
        sys.stderr.write(f"{stopped}; continue with the same command plus --resume\n")
        return EXIT_PREEMPTED
    return 0


def cmd_data(args: argparse.Namespace) -> None:
    from finesmith.core.console import console

    if args.data_command == "vocab":
        from finesmith.domain.vocab import corpus_vocab_report, format_report

        report = corpus_vocab_report(args.corpus, args.model, args.top)
        console.print(format_report(report), markup=False)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        return
    if args.data_command == "scan":
        from finesmith.data.pii import redact_file, scan_file
        from finesmith.data.show import print_scan_report

        report = redact_file(args.file, args.redact) if args.redact else scan_file(args.file)
        print_scan_report(console, args.file, report)
        if args.redact:
            console.print(f"redacted copy written to {args.redact}; {args.file} is unchanged")
        return
    from finesmith.config import DataSettings, TrainConfig
    from finesmith.data.show import data_check
    from finesmith.model.load import load_chat_tokenizer
    from finesmith.pipeline import apply_tool_format

    fields = dict(item.partition("=")[::2] for item in args.field)
    TrainConfig(model=args.model, output="-", max_length=args.max_length, truncation=args.truncation,
                data=DataSettings(args.file, args.format, fields)).validate()  # same errors as train
    tokenizer, _ = load_chat_tokenizer(args.model, notify=console.print)
    apply_tool_format(tokenizer, args.tool_format, args.thinking)
    if args.objective == "grpo":
        return check_prompt_file(args.file, tokenizer, args.max_length, args.format, fields)
    report = data_check(args.file, tokenizer, args.max_length, args.format, fields, args.truncation,
                        args.eval_data, args.show, console)
    if not report.ok:
        raise FinesmithError(f"{args.file}: not trainable ({len(report.errors)} errors, listed above); fix them "
                             "or train with --skip-invalid")


def check_prompt_file(path: str, tokenizer: Any, max_length: int, fmt: str, fields: dict[str, str]) -> None:
    """`finesmith data check --objective grpo`: every row as a prompt, each problem with its file:line."""
    from collections import Counter

    from finesmith.core.console import console
    from finesmith.train.grpo import iter_prompts

    lengths, seen, problems = [], Counter(), []
    for prompt, problem in iter_prompts(tokenizer, path, fmt, fields, max_length):
        if problem:
            problems.append(problem)
            continue
        lengths.append(len(prompt.prompt_ids))
        seen.update(k for k in prompt.fields if k != "reference" or prompt.fields[k] is not None)
    for problem in problems:
        console.print(f"error: {problem}", markup=False, highlight=False, soft_wrap=True)
    if lengths:
        shown = ", ".join(f"item.{k} ({n})" for k, n in seen.most_common()) or "none"
        console.print(f"{path}: {len(lengths)} prompts, {sum(lengths)} prompt tokens (longest {max(lengths)}, "
                      f"max_length {max_length}); fields for rewards and graders: {shown}",
                      markup=False, highlight=False, soft_wrap=True)
    if problems or not lengths:
        raise FinesmithError(f"{path}: not usable for grpo ({len(problems)} errors" + (", listed above)" if problems
                             else ")") + ("; no prompts found" if not lengths else "") + "; fix them and check again")


def cmd_eval(args: argparse.Namespace) -> None:
    from finesmith.evaluate.report import print_result
    from finesmith.core.console import console
    from finesmith.pipeline import evaluate

    result = evaluate(args.model, args.data, args.adapter, args.shots_from, eval_options(args), args.limit)
    print_result(console, result, f"{result.task} · {args.shots}-shot · {args.data}")
    if result.accuracy is not None:
        from finesmith.evaluate.report import headline_interval

        interval = headline_interval(result)
        ci = f", 95% CI [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        console.print(f"accuracy {result.accuracy:.3f} ({round(result.accuracy * result.n)}/{result.n}{ci}) "
                      f"· {args.shots}-shot · {args.data}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        console.print(f"results written to {args.output}")


def cmd_compare(args: argparse.Namespace) -> None:
    from finesmith.evaluate.compare import compare
    from finesmith.core.console import console

    compare(args.data, args.base, args.runs, Path(args.output), args.shots_from, eval_options(args), args.limit,
            args.shot_sweep)
    console.print(f"report written to {Path(args.output) / 'report.md'} and {Path(args.output) / 'report.html'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from finesmith.demo import run_demo

    run_demo(Path(args.output))


def add_export_and_serve_commands(sub: argparse._SubParsersAction) -> None:
    """`export`, `chat` and `serve`: use a trained run outside finesmith."""
    from finesmith.export import FORMATS, QUANTS

    exp = sub.add_parser("export", help="write a run as a merged model, an adapter or a GGUF file",
                         description="Export a run folder with a model card; --verify reloads the export and "
                                     "compares its logits (and for GGUF its greedy output and tokens) with the run.")
    exp.add_argument("run", metavar="RUN", help="finesmith run folder (output of `finesmith train`)")
    exp.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                     help="hf: merged safetensors model; adapter: PEFT folder; gguf: llama.cpp file (Llama models)")
    exp.add_argument("--quant", default="f16", choices=QUANTS, help="GGUF matrix encoding (default f16)")
    exp.add_argument("--output", required=True, metavar="DIR", help="folder to create")
    exp.add_argument("--verify", action="store_true", help="check the export numerically; exit 1 if out of tolerance")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")

    for name, text in (("chat", "talk to a run in the terminal"),
                       ("serve", "serve models over an OpenAI-compatible API, with fine-tuning jobs and a dashboard")):
        cmd = sub.add_parser(name, help=text)
        if name == "chat":
            cmd.add_argument("run", metavar="RUN", help="run folder, exported model folder, .gguf file or built-in alias")
        else:
            cmd.add_argument("run", metavar="MODEL", nargs="+",
                             help="models to serve (and fine-tune through the jobs API): run folders, exported model "
                                  "folders, .gguf files or built-in aliases; the first loads at start, the others "
                                  "on their first request")
        add_precision_flag(cmd)
    chat = sub.choices["chat"]
    chat.add_argument("--system", help="system prompt for the conversation")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    serve = sub.choices["serve"]
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every /v1 request "
                                         "(required on any interface but loopback)")
    serve.add_argument("--no-jobs", action="store_true", help="serve the models only: no files, jobs or dashboard")
    serve.add_argument("--runs", action="append", metavar="DIR",
                       help="a folder of runs (and compare reports) for the dashboard; repeatable (default: ./runs)")
    serve.add_argument("--queue-size", type=int, default=32, metavar="N",
                       help="requests that may wait for the model while one runs; beyond that clients get "
                            "HTTP 429 with Retry-After (default 32)")
    serve.add_argument("--allowed-host", action="append", metavar="NAME[:PORT]", default=[],
                       help="also answer requests whose Host header is NAME (any port, or only PORT); repeatable. "
                            "By default only the bound address and localhost/127.0.0.1/[::1] with the port are "
                            "answered, which defeats DNS rebinding")
    serve.add_argument("--max-upload-size", type=byte_size, default="512MB", metavar="SIZE",
                       help="largest training file /v1/files accepts, e.g. 200MB or 2GB (default 512MB, the "
                            "hosted API's limit); bigger uploads get HTTP 413")
    serve.add_argument("--max-adapters", type=int, default=8, metavar="N",
                       help="LoRA fine-tunes of one base are served from one loaded base with their adapters "
                            "attached; at most N stay loaded (least recently used dropped, reloaded on demand; "
                            "default 8; 0 merges every fine-tune into its own copy of the model)")


def cmd_export(args: argparse.Namespace) -> int:
    from finesmith.export.run import export_run

    result = export_run(args.run, args.fmt, args.output, args.quant, args.verify, args.overwrite)
    for check in result.checks:
        print(check.line())
    print(f"exported {args.run} as {args.fmt} to {result.output}: {', '.join(result.files)}")
    if not result.ok:
        sys.stderr.write("error: the export differs from the run beyond tolerance (see FAIL lines above)\n")
        return 1
    return 0


def cmd_chat(args: argparse.Namespace) -> None:
    from finesmith.serve.chat import run_chat
    from finesmith.serve.engine import Sampling

    run_chat(args.run, args.system, Sampling(args.max_new_tokens, args.temperature), sys.stdin, sys.stdout, sys.stderr,
             args.precision)


def cmd_serve(args: argparse.Namespace) -> None:
    from finesmith.serve.server import serve

    serve(args.run, args.host, args.port, args.api_key, queue_size=args.queue_size, precision=args.precision,
          jobs=not args.no_jobs, runs=args.runs, allowed_hosts=args.allowed_host,
          max_upload_bytes=args.max_upload_size, max_adapters=args.max_adapters)


def byte_size(text: str) -> int:
    """`512MB`, `2GB`, `300KB`, `1048576` → bytes (KB/MB/GB are powers of 1024)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 512MB, 2GB or a number of bytes")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get((match.group(2) or "b")[0], 1)
    return int(float(match.group(1)) * scale)


def add_advise_command(sub: argparse._SubParsersAction) -> None:
    from finesmith.advise.rules import GOALS, TASKS

    advise = sub.add_parser("advise", help="recommend an approach for this machine, model and data", description=(
        "Size few-shot prompting, prompt tuning, LoRA, QLoRA, full fine-tuning and continued pre-training "
        "for this machine, model and data; recommend one and optionally write its config."))
    advise.add_argument("--model", required=True, help="built-in alias, model folder, .gguf file or hub id")
    advise.add_argument("--data", required=True, help="training data file")
    advise.add_argument("--task", choices=TASKS, default="generation", help="what the model must do (default generation)")
    advise.add_argument("--goal", choices=GOALS, default="balanced", help="quality vs cost (default balanced)")
    advise.add_argument("--gpu-memory", type=float, metavar="GB", help="plan for a GPU with this much memory")
    advise.add_argument("--gpus", type=int, metavar="N", help="plan for N such GPUs (DDP/FSDP2; default: those detected)")
    advise.add_argument("--time-budget", type=float, metavar="H", help="longest acceptable training time in hours")
    advise.add_argument("--calibrate", action="store_true", help="time 3 real LoRA steps on this machine")
    advise.add_argument("--write-config", metavar="PATH", help="write a ready-to-run YAML config for the recommendation")


def cmd_advise(args: argparse.Namespace) -> None:
    from finesmith.advise.report import AdviseRequest, advise

    advise(AdviseRequest(args.model, args.data, args.task, args.goal, args.gpu_memory, args.time_budget,
                         args.calibrate, args.write_config, args.gpus))


COMMANDS = {"train": cmd_train, "advise": cmd_advise, "eval": cmd_eval, "compare": cmd_compare, "demo": cmd_demo, "data": cmd_data,
            "export": cmd_export, "chat": cmd_chat, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    from finesmith.core.console import quiet_libraries

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv
    quiet_libraries()
    try:
        code = COMMANDS[args.command](args)
    except FinesmithError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
