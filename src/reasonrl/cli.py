"""Command line: `reasonrl train`, `eval`, `pool`, `export`, `compare` and `report`.

Only the standard library is imported at module level so that `reasonrl --help` answers at once; torch and
transformers load when a command runs. User errors print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from reasonrl.errors import UserError

EXAMPLES = """examples:
  reasonrl train                                        # the embedded demo: tiny model, arithmetic, GRPO
  reasonrl train algorithm.advantage=rloo rollout.group_size=4
  reasonrl train --config recipes/lampo-tiny.yaml train.steps=100
  reasonrl train --resume runs/grpo-20260101-120000
  reasonrl eval --model runs/grpo-20260101-120000 --data problems.jsonl -k 8
  reasonrl eval --model runs/lanpo-20260101-120000 --feedback  # also accuracy after reflecting on a first attempt
  reasonrl pool runs/lanpo-20260101-120000                      # inspect a LANPO run's experience pool
  reasonrl compare --seeds 0 1 --seconds 120 --out runs/cmp      # GRPO vs LamPO vs LANPO, same budget each
  reasonrl report runs/cmp --target 0.6                          # HTML: accuracy vs steps, seconds, tokens
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reasonrl",
        description="Reinforcement learning with verifiable rewards for language models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from reasonrl import __version__

    parser.add_argument("--version", action="version", version=f"reasonrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a policy with RL (no arguments: the embedded offline demo)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML config file (see recipes/)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (every key, with --config and overrides applied) as YAML and exit; "
        "the output is a valid --config file",
    )
    train.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes (one per GPU; CPU: gloo): shorthand for `accelerate launch --multi_gpu "
        "--num_processes N -m reasonrl train ...` (docs/scale-out.md)",
    )
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")

    ev = sub.add_parser("eval", help="score a model on datasets (greedy accuracy, mean@k, pass@k, maj@k)")
    ev.add_argument(
        "--model",
        default=None,
        help="run directory, local model directory or hub name (default: the tiny model's cached warm-start)",
    )
    ev.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="DATA",
        help="repeatable; a JSONL/Parquet file or datasets name (read with data.columns), a benchmark preset from the "
        "Hub (gsm8k, math500, aime24, aime25, amc, gpqa_diamond) or PRESET=PATH: a local file in that benchmark's "
        "public layout (default: the run's eval data or the built-in task)",
    )
    ev.add_argument("--split", default=None, help="split for datasets names (default: test; a preset's own split)")
    ev.add_argument("-k", type=int, default=None, help="k of mean@k, pass@k and maj@k (sampled answers per problem)")
    ev.add_argument("--samples", type=int, default=None, metavar="N", help="samples per problem, N >= k (default k)")
    ev.add_argument(
        "-n",
        "--num-problems",
        type=int,
        default=None,
        help="evaluate the first N problems of each dataset (default: eval.num_problems; all of a preset)",
    )
    ev.add_argument(
        "--prompt-template",
        default=None,
        metavar="TEMPLATE",
        help="presets' prompt, {problem} replaced by the problem text (default: the problem, a blank line and "
        "'Please reason step by step, and put your final answer within \\boxed{}.')",
    )
    ev.add_argument("--config", help="YAML config file (eval.*, data.columns, rollout.max_new_tokens...)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON, one object (line) per dataset")
    ev.add_argument(
        "--feedback",
        action="store_true",
        help="also report feedback_accuracy: a second greedy attempt reflecting on the first (LANPO, reward-agnostic)",
    )
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")

    pool = sub.add_parser("pool", help="inspect a LANPO run's experience pool (read only)")
    pool.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with algorithm.lanpo.enabled=true")
    pool.add_argument("--problem", metavar="ID", default=None, help="show the entries of this problem id")
    pool.add_argument("-n", type=int, default=5, help="rows of the problem and entry tables (default 5)")
    pool.add_argument("--json", action="store_true", help="print summary, problems and entries as one JSON object")

    exp = sub.add_parser("export", help="merge a LoRA run's adapters into its base model: a plain transformers model")
    exp.add_argument("source", metavar="RUN_DIR", help="a LoRA run directory (its final model or latest checkpoint) "
                     "or an adapter directory (a checkpoint)")  # fmt: skip
    exp.add_argument("--out", required=True, metavar="DIR", help="directory for the merged model and tokenizer")

    from reasonrl.tools import compare

    cmp = sub.add_parser(
        "compare",
        help="train several configurations × seeds under one shared budget (resumable)",
        description=compare.__doc__,
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmp.add_argument("variants", nargs="*", metavar="LABEL=OVERRIDES", help="default: grpo, lampo and lanpo")
    cmp.add_argument("--seeds", nargs="+", default=["0"], metavar="S", help="seeds of every label (default 0)")
    budget = cmp.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, metavar="N", help="train.steps of every run")
    budget.add_argument("--seconds", type=float, metavar="S", help="train.max_seconds: seconds of RL steps per run")
    budget.add_argument("--tokens", type=int, metavar="T", help="train.max_tokens: generated tokens per run")
    cmp.add_argument("--out", default="runs/compare", metavar="DIR", help="comparison directory (default runs/compare)")
    cmp.add_argument("-j", "--jobs", type=int, default=1, metavar="J", help="runs at a time (default 1)")
    cmp.add_argument("--config", help="base YAML config of every run")
    rep = sub.add_parser(
        "report",
        help="HTML report of runs: accuracy against steps, seconds and tokens; stage costs; config differences",
    )
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or comparison directories with runs/")
    rep.add_argument("--out", default=None, help="output directory (default: the first DIR's report/)")
    rep.add_argument("--target", type=float, default=0.6, help="eval accuracy for time-to-target (default 0.6)")
    return parser


COMPARE_EXAMPLES = """examples:
  reasonrl compare --seeds 0 1 --steps 60                             # grpo, lampo, lanpo; 2 seeds each
  reasonrl compare grpo=algorithm.advantage=grpo lampo=algorithm.advantage=lampo \\
      lanpo+lampo=algorithm.lanpo.enabled=true,algorithm.advantage=lampo --seconds 300 --jobs 2 --out runs/cmp
  reasonrl compare dapo=algorithm.eps_high=0.28,algorithm.loss_agg=token-mean --tokens 200000 -- rollout.group_size=4
  (the same command again continues an interrupted comparison; then: reasonrl report DIR)
"""


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    common: list[str] = []
    if argv[:1] == ["compare"] and "--" in argv:  # `reasonrl compare ... -- KEY=VALUE ...`: overrides for every run
        argv, common = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args, extra = parser.parse_known_args(argv)
    # overrides may sit between options (`train a.b=1 --config X c.d=2`), which argparse splits off; take them back
    stray = [a for a in extra if not (hasattr(args, "overrides") and OVERRIDE.match(a))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.common, args.argv = common, argv
    if args.command is None:
        parser.print_help()
        return 0
    _quiet_libraries()
    if args.command in ("train", "eval", "compare"):
        from reasonrl.rollout.cpu.workers import keep_freed_memory

        keep_freed_memory()  # CPU tensors reuse freed pages instead of faulting in fresh ones every step
    try:
        cmds = {
            "train": cmd_train, "eval": cmd_eval, "pool": cmd_pool, "export": cmd_export, "compare": cmd_compare,
            "report": cmd_report,
        }  # fmt: skip
        return cmds[args.command](args)
    except UserError as e:
        print(f"reasonrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reasonrl: interrupted (the latest checkpoint can be resumed with --resume)", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Library progress bars and advice ("Loading weights", "Writing model shards") drown the run's own output."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    default = warnings.formatwarning

    def one_line(message: Warning | str, category: type[Warning], filename: str, *args: Any, **kw: Any) -> str:
        """reasonrl's own warnings are messages to the user, not code locations."""
        if f"{os.sep}reasonrl{os.sep}" in filename:
            return f"reasonrl: warning: {message}\n"
        return default(message, category, filename, *args, **kw)

    warnings.formatwarning = one_line


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def cmd_train(args: argparse.Namespace) -> int:
    if args.print_config:
        from reasonrl.config import load_config

        cfg = load_config(Path(args.resume) / "config.yaml" if args.resume else args.config, args.overrides)
        sys.stdout.write(cfg.to_yaml())
        return 0
    if args.num_processes < 1:
        raise UserError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from reasonrl.config import load_config
    from reasonrl.rewards.stage import reward_spec
    from reasonrl.training.distributed import rank_from_env, world_size_from_env
    from reasonrl.training.run import finished_state, new_run_dir, resume_config, run_training

    console = _console()
    if rank_from_env() > 0:  # multi-process launch: process 0 speaks for the run
        console.quiet = True
    if args.resume:
        run_dir = Path(args.resume)
        cfg = resume_config(run_dir, args.config, args.overrides)
        if (done := finished_state(run_dir)) is not None:
            if done.get("stopped_by", "steps") == "steps":
                raise UserError(f"{run_dir} already finished its {cfg.train.steps} steps")
            limit = done["stopped_by"]
            value = getattr(cfg.train, limit)
            raise UserError(f"{run_dir} already finished: train.{limit}={value:g} reached at step {done['step']}")
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = new_run_dir(cfg)
    console.print(
        f"reasonrl: {'resuming' if args.resume else 'training'} [bold]{cfg.algorithm.advantage}[/bold] "
        f"on {cfg.data.source} with model {cfg.model.name} → {run_dir}"
    )
    if (world := world_size_from_env()) > 1:
        how = "sharded (FSDP2)" if cfg.train.sharding == "fsdp" else "data-parallel"
        console.print(f"{how} over {world} processes; process 0 logs, evaluates and checkpoints")
    a = cfg.algorithm
    names, weights = reward_spec(cfg)
    options = (
        f"tau={a.lampo.tau}, weight={a.lampo.weight}, normalize={a.lampo.normalize}, score={a.lampo.score}, "
        f"lambda_sem={a.lampo.lambda_sem}, rouge_tokens={a.lampo.rouge_tokens}"
        if a.advantage == "lampo"
        else f"scale_rewards={a.scale_rewards}"
    )
    console.print(
        f"algorithm: {a.advantage} ({options}); clip [{a.eps_low}, {a.eps_high}] {a.ratio_level}-level, "
        f"loss {a.loss_agg}, beta {a.beta}; rewards "
        + ", ".join(f"{n}×{w:g}" for n, w in zip(names, weights or [1.0] * len(names), strict=False))
    )
    if a.lanpo.enabled:
        mix = ", ".join(f"{k} {v:g}" for k, v in a.lanpo.mix.items())
        console.print(
            f"LANPO: mix ({mix}), gamma {a.lanpo.gamma}, top_k {a.lanpo.top_k}, "
            f"context_in_loss={a.lanpo.context_in_loss}, advantage_scope={a.lanpo.advantage_scope}"
        )
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console, transient=False, disable=console.quiet) as progress:
        summary = run_training(cfg, run_dir, resume=bool(args.resume), console=console, progress=progress)
    _print_eval_change(console, summary.get("eval_before", {}), summary["eval_after"])
    if summary.get("stopped_by") not in (None, "steps"):
        limit = summary["stopped_by"]
        console.print(
            f"stopped at step {summary['step']} of {cfg.train.steps}: train.{limit}={getattr(cfg.train, limit):g} "
            f"reached ({summary['elapsed_seconds']:.1f} s of RL steps, {summary['tokens_total']} tokens generated)"
        )
    if cfg.algorithm.lanpo.enabled:
        _print_feedback_summary(console, run_dir, summary["eval_after"])
    console.print(
        f"run files: {run_dir}  (config.yaml, metrics.jsonl, completions.jsonl, tensorboard/, checkpoints/, model/"
        + (", pool.sqlite)" if cfg.algorithm.lanpo.enabled else ")")
    )
    return 0


def _launch(args: argparse.Namespace) -> int:
    """`--num-processes N`: the same command under `accelerate launch` (DDP; gloo on CPUs, NCCL on GPUs)."""
    import shutil
    import subprocess

    if shutil.which("accelerate") is None:
        raise UserError("--num-processes needs the `accelerate` command (pip install accelerate)")
    from reasonrl.config import load_config

    cfg = load_config(Path(args.resume) / "config.yaml" if args.resume else args.config, args.overrides)
    if cfg.rollout.engine == "vllm":
        import torch

        if not torch.cuda.is_available() or cfg.model.device == "cpu":
            raise UserError(
                "rollout.engine=vllm under a multi-process launch needs one GPU per process; on a CPU train with one "
                "process (or rollout.engine=fast)"
            )
    rest = _without_option(args.argv[args.argv.index("train") + 1 :], "--num-processes")
    # mixed precision comes from train.mixed_precision
    cmd = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", str(args.num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "reasonrl", "train", *rest,
    ]  # fmt: skip
    return subprocess.call(cmd)


def _without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def _print_feedback_summary(console: Any, run_dir: Path, eval_after: dict[str, float]) -> None:
    """SPEC §5: per-mode training accuracy and what the language feedback cost, over the whole run."""
    from reasonrl.training.metrics import feedback_summary, read_metrics

    s = feedback_summary(read_metrics(run_dir))
    modes = ", ".join(
        f"{m} {s[f'{m}/accuracy']:.1%} (n={s[f'{m}/count']:.0f})" for m in ("scratch", "reflect", "abstract")
        if s[f"{m}/count"]
    )  # fmt: skip
    console.print(f"LANPO train accuracy by mode: {modes}; {s['fallbacks']:.0f} fallbacks to scratch")
    share = s["feedback_seconds"] / s["step_seconds"] if s["step_seconds"] else 0.0
    console.print(
        f"LANPO extra compute: {s['lesson_tokens']:.0f} lesson tokens generated "
        f"({s['lesson_tokens'] / max(s['generated_tokens'], 1):.1%} of rollout tokens), "
        f"+{s['context_tokens_per_rollout']:.0f} context tokens per feedback rollout, "
        f"{s['feedback_seconds']:.1f} s in prompt building, abstraction and pool I/O ({share:.1%} of step time)"
    )
    if "eval/feedback_accuracy" in eval_after:
        console.print(
            f"eval accuracy with a reward-agnostic second attempt: {eval_after['eval/feedback_accuracy']:.1%} "
            f"(zero-shot {eval_after['eval/accuracy']:.1%})"
        )


def _print_eval_change(console: Any, before: dict[str, float], after: dict[str, float]) -> None:
    """Eval accuracy before → after RL; the mean reward where no reward function judges correctness."""
    key, what = ("eval/accuracy", "accuracy") if "eval/accuracy" in after else ("eval/reward", "mean reward")
    fmt = "{:.1%}" if key == "eval/accuracy" else "{:.3f}"
    a, b = after[key], before.get(key)
    if b is None:
        console.print(f"eval {what} after RL: [bold]{fmt.format(a)}[/bold]")
        return
    change = f"{(a - b) * 100:+.1f} points" if key == "eval/accuracy" else f"{a - b:+.3f}"
    console.print(f"eval {what}: {fmt.format(b)} before RL → [bold]{fmt.format(a)}[/bold] after ({change})")


def cmd_eval(args: argparse.Namespace) -> int:
    """One block (or JSON line) per --data dataset: greedy accuracy, mean@k, pass@k, maj@k, feedback_accuracy."""
    import json

    from reasonrl.config import load_config
    from reasonrl.data.presets import EvalSet, load_eval_set, parse_data_specs
    from reasonrl.data.prompts import PromptFormat, check_prompts
    from reasonrl.data.sources import has_held_out, load_training_data
    from reasonrl.evaluate import evaluate
    from reasonrl.model.loading import load_pretrained, resolve_device, resolve_dtype
    from reasonrl.rewards.stage import Rewards

    for flag, value in (("-k", args.k), ("--samples", args.samples), ("-n/--num-problems", args.num_problems)):
        if value is not None and value < 1:  # 0 would silently mean "the default", a negative count a slice
            raise UserError(f"{flag} must be >= 1, got {value}")
    run_cfg = Path(args.model, "config.yaml") if args.model else None
    base = None
    if run_cfg is not None and run_cfg.is_file():
        from reasonrl.training.run import check_received_code

        saved = load_config(run_cfg)
        check_received_code(saved, run_cfg, load_config(args.config, args.overrides), rewards=False)
        base = saved.to_dict()
    cfg = load_config(args.config, args.overrides, base=base)
    specs = parse_data_specs(args.data or [])
    cfg.eval.k = args.k or cfg.eval.k
    cfg.eval.num_problems = args.num_problems or cfg.eval.num_problems
    samples = args.samples or cfg.eval.k
    if samples < cfg.eval.k:
        raise UserError(f"--samples {samples} is less than -k {cfg.eval.k}: pass@k needs at least k samples")
    device = resolve_device(cfg.model.device)
    model_path = _model_path(args.model, cfg)
    model, tokenizer = load_pretrained(str(model_path), cfg.model, device, resolve_dtype(cfg.model.dtype, device))
    if specs:
        sets = [
            load_eval_set(
                s,
                columns=cfg.data.columns,
                split=args.split,
                template=args.prompt_template,
                limit=args.num_problems if s.preset is not None else cfg.eval.num_problems,
                task=cfg.task,
                data=cfg.data,
            )
            for s in specs
        ]
    else:
        if cfg.data.eval_source is None and not has_held_out(cfg.data.source):
            raise UserError("pass --data FILE_OR_NAME: this model's run was not on the built-in task")
        if args.prompt_template is not None:
            raise UserError("--prompt-template applies to benchmark presets only (--data gsm8k=PATH, --data math500)")
        _, problems = load_training_data(_eval_only(cfg))
        builtin = cfg.data.source == "arithmetic" and cfg.data.eval_source in (None, "arithmetic")
        sets = [EvalSet(cfg.data.eval_source or cfg.data.source, problems[: cfg.eval.num_problems], builtin)]
    for s in sets:
        check_prompts(
            tokenizer,
            s.problems,
            PromptFormat.from_config(cfg.data),
            max_new_tokens=cfg.rollout.max_new_tokens,
            max_positions=getattr(getattr(model, "config", None), "max_position_embeddings", None),
            label=s.label,
        )
    reflect = [None] * len(sets)
    if args.feedback:
        from reasonrl.lanpo.feedback import templates_for

        reflect = [templates_for(cfg.algorithm.lanpo, builtin_task=s.builtin).reflect for s in sets]
    results = []
    with Rewards(["math_answer"], timeout_s=cfg.rewards.timeout_s, num_workers=cfg.rewards.num_workers) as verifier:
        for s, reflect_template in zip(sets, reflect, strict=True):
            res = evaluate(
                model,
                tokenizer,
                s.problems,
                verifier,
                max_new_tokens=cfg.rollout.max_new_tokens,
                k=cfg.eval.k,
                samples=samples,
                temperature=cfg.eval.temperature,
                batch_size=cfg.eval.batch_size,
                prompt_format=PromptFormat.from_config(cfg.data),
                reflect_template=reflect_template,
                engine=cfg.rollout.engine,
            )
            head = {"dataset": s.label, "model": str(model_path), "problems": len(s.problems)}
            results.append({**head, **({"samples": samples} if samples > 1 else {}), **res})
    for i, res in enumerate(results):
        if args.json:
            print(json.dumps(res))
            continue
        if i:
            print()
        for k, v in res.items():
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    return 0


def cmd_pool(args: argparse.Namespace) -> int:
    """Summary, most attempted problems and newest entries of `RUN_DIR/pool.sqlite`; it never writes entries."""
    import json

    path = Path(args.run_dir) / "pool.sqlite"
    if not path.is_file():  # checked first: opening an ExperiencePool would create an empty one
        raise UserError(f"{args.run_dir} has no experience pool: was it trained with algorithm.lanpo.enabled=true?")
    if args.n < 0:
        raise UserError(f"-n must be >= 0, got {args.n}")
    from reasonrl.lanpo.pool import ExperiencePool

    try:
        pool = ExperiencePool(path)
    except Exception as e:  # sqlite3.DatabaseError, schema version, no FTS5: all unreadable for the user
        raise UserError(f"cannot read the experience pool {path}: {e}") from None
    try:
        stats = pool.stats()
        problems = pool.problem_attempts(limit=args.n)
        entries = pool.sample_entries(n=args.n, problem_id=args.problem)
    finally:
        pool.close()
    if args.problem is not None and not entries:
        raise UserError(f"problem '{args.problem}' has no live entries in {path}")
    if args.json:
        import dataclasses

        print(
            json.dumps(
                {
                    "pool": str(path),
                    "stats": stats,
                    "problems": [{"problem_id": p, "attempts": n, "mean_reward": r} for p, n, r in problems],
                    "entries": [dataclasses.asdict(e) for e in entries],
                }
            )
        )
        return 0
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    summary = Table(title=escape(f"experience pool {path}"), show_header=False)
    for key, value in stats.items():
        summary.add_row(key.replace("_", " "), f"{value:.3f}" if key == "mean_reward" else f"{value:.0f}")
    console.print(summary)
    if args.problem is None:
        top = Table(title="most attempted problems")
        for col in ("problem", "attempts", "mean reward"):
            top.add_column(col, justify="left" if col == "problem" else "right")
        for pid, n, r in problems:
            top.add_row(escape(pid), str(n), f"{r:.3f}")
        console.print(top)
    sample = Table(title=escape(f"entries of {args.problem}") if args.problem else "newest entries")
    for col in ("id", "problem", "mode", "step", "reward", "response"):
        sample.add_column(col, justify="right" if col in ("step", "reward") else "left", overflow="fold")
    for e in entries:
        row = (escape(e.problem_id), _clip(e.problem, 40), e.mode, str(e.step), f"{e.reward:g}", _clip(e.response, 80))
        sample.add_row(*row)
    console.print(sample)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge LoRA adapters into their base model (recorded in adapter_config.json) and save it with the tokenizer."""
    import torch

    from reasonrl.config import ModelConfig, load_config
    from reasonrl.model.loading import merged_lora_model

    src = Path(args.source)
    adapters = Path(_model_path(str(src), None)) if (src / "config.yaml").exists() else src
    if not (adapters / "adapter_config.json").is_file():
        raise UserError(f"{adapters} holds no LoRA adapters (adapter_config.json); only lora.enabled runs need export")
    model_cfg = load_config(src / "config.yaml").model if (src / "config.yaml").exists() else ModelConfig()
    dtype = torch.float32 if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype)
    model, tokenizer = merged_lora_model(adapters, model_cfg, dtype)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged {adapters} into its base model → {out} (load with transformers' AutoModelForCausalLM)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Plan and validate every configuration first (a typo fails at once, naming its label), then run."""
    from reasonrl.tools.compare import make_plan, run_compare

    # `--seeds 0 1 grpo=...` makes argparse hand the labels to --seeds: the integers are the seeds, the rest labels
    seeds = [int(s) for s in args.seeds if s.lstrip("-").isdigit()]
    variants = [*args.variants, *(s for s in args.seeds if not s.lstrip("-").isdigit())]
    plan = make_plan(
        variants,
        seeds,
        steps=args.steps,
        seconds=args.seconds,
        tokens=args.tokens,
        out=args.out,
        config=args.config,
        common=args.common,
    )
    return run_compare(plan, jobs=args.jobs, console=_console())


def cmd_report(args: argparse.Namespace) -> int:
    """Write report.html and its figures; warnings (skipped runs) go to stderr, the report's path to stdout."""
    from reasonrl.tools.report import build_report

    path = build_report(args.dirs, args.out, args.target)
    print(f"report: {path}")
    return 0


def _clip(text: str, width: int) -> str:
    """One line of at most `width` characters: newlines shown as ⏎, the tail cut with …."""
    from rich.markup import escape

    flat = text.strip().replace("\n", " ⏎ ")
    return escape(flat if len(flat) <= width else flat[: width - 1] + "…")


def _eval_only(cfg: Any) -> Any:
    """Loading eval data must not load (or validate) the training source."""
    import copy

    c = copy.deepcopy(cfg)
    if c.data.eval_source not in (None, "arithmetic"):
        c.data.source = "arithmetic"
        c.task.train_size = 1
    return c


def _model_path(model: str | None, cfg: Any) -> Path | str:
    """A run directory's final model (or latest checkpoint); the config's `model.name` when it is not the tiny model;
    the tiny warm-start; or a path / hub name as given."""
    from reasonrl.model.builtin import BUILTIN_MODELS
    from reasonrl.training.checkpoint import latest_checkpoint

    if model is None and cfg.model.name not in BUILTIN_MODELS:
        return cfg.model.name
    if model is None:
        from reasonrl.data.sources import load_training_data
        from reasonrl.demo.warmstart import cache_root, warmstart_key

        path = cache_root(cfg) / warmstart_key(cfg, load_training_data(cfg)[0])
        if not path.exists():
            raise UserError("no --model given and no cached warm-start yet; run `reasonrl train` first")
        return path
    p = Path(model)
    if (p / "config.yaml").exists():
        if (p / "model").exists():
            return p / "model"
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise UserError(f"run {p} has no saved model or checkpoint yet")
        return ckpt
    return model


if __name__ == "__main__":
    raise SystemExit(main())
