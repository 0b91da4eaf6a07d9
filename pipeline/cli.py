"""`distill`: the command line of the pipeline. Parses arguments, loads the config, calls one stage driver.

Options, the config file and `section.key=value` overrides may come in any order after the sub-command. A user's
mistake (a `PipelineError`, or a full disk) ends with exit code 2 and one message naming the file, key or field and
the fix, without a traceback unless `--debug`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config, reference_markdown
from pipeline.errors import PipelineError
from pipeline.infra.atomic import is_disk_full, storage_error
from pipeline.infra.runtime import configure_logging
from pipeline.models.templates import TEACHER_TEMPLATES

logger = logging.getLogger("pipeline")

OVERRIDES_HELP = "config overrides as section.key=value (e.g. student.num_heads=2 cache.encoding=topk)"
OVERWRITE_HELP = "replace output made from other inputs (without it the stage refuses, naming the differing field)"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _common_arguments() -> argparse.ArgumentParser:
    """--debug and --log-level, accepted before or after the sub-command (SUPPRESS: a sub-command's default must
    not reset what was given before it)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks for every error")
    common.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING (default INFO)")
    return common


def _add_config_arguments(parser: argparse.ArgumentParser, overwrite: bool = False) -> None:
    parser.add_argument("config", type=Path, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _launcher_arguments() -> argparse.ArgumentParser:
    """The DeepSpeed launcher passes --local_rank=N (before the sub-command); stages read LOCAL_RANK instead."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The `distill` argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Squeezing-Heads Distillation: teacher → cached squeezed attention + sparse logits → students "
        "of any head count trained with DeepSpeed, tracked in MLflow.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of every error, not only of bugs")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_arguments()
    launcher = _launcher_arguments()

    show = commands.add_parser(
        "config", parents=[common], help="print the resolved config (file + overrides, validated)"
    )
    show.add_argument("config", type=Path, nargs="?", help="YAML config file (see configs/)")
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.add_argument("--reference", action="store_true", help="print the reference of every key as markdown")

    teacher = commands.add_parser("teacher", parents=[common], help="teacher utilities")
    teacher_commands = teacher.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    teacher_import = teacher_commands.add_parser(
        "import",
        parents=[common],
        help="turn teacher.source (smollm2, a .gguf file, an HF directory, tiny-random-*) into the HF directory "
        "teacher.path",
    )
    _add_config_arguments(teacher_import, overwrite=True)

    prepare = commands.add_parser(
        "prepare", parents=[common], help="tokenize and pack data.sources into data.output_dir"
    )
    _add_config_arguments(prepare, overwrite=True)

    cache = commands.add_parser(
        "cache",
        parents=[common, launcher],
        help="run the teacher once and cache squeezed attention targets + sparse logits (one process per rank "
        "under the DeepSpeed launcher); `distill cache verify DIR` checks a cache",
        description="distill cache CONFIG [overrides]  |  distill cache CONFIG --plan [--template NAME]  |  "
        "distill cache verify DIR",
    )
    cache.add_argument("config", help="YAML config file, or the word `verify` followed by a cache directory")
    cache.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    cache.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    cache.add_argument(
        "--plan",
        action="store_true",
        help="print the bytes per token of every tensor the cache would store and each split's total, from the config "
        "and the teacher's config.json alone (no teacher runs, nothing is written)",
    )
    cache.add_argument(
        "--template",
        choices=sorted(TEACHER_TEMPLATES),
        help="with --plan: price the cache for a teacher of this shape instead of teacher.path",
    )

    train = commands.add_parser(
        "train",
        parents=[common, launcher],
        help="train the student with DeepSpeed on the cached (or live, train.mode=online) teacher targets; run as "
        "one process or under the DeepSpeed launcher",
    )
    _add_config_arguments(train, overwrite=True)

    evaluate = commands.add_parser(
        "eval",
        parents=[common, launcher],
        help="evaluate the exported student (train.output_dir/student), another HF directory or a training "
        "checkpoint on the cached validation targets",
    )
    _add_config_arguments(evaluate)
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="an exported HF student directory")
    source.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint directory (or their parent)")
    evaluate.add_argument(
        "--split",
        default="validation",
        choices=["validation", "test"],
        help="the cached split to evaluate on (test: the held-out split of data.test_fraction)",
    )

    run = commands.add_parser("run", parents=[common, launcher], help="every stage in order, skipping completed ones")
    _add_config_arguments(run, overwrite=True)

    compare = commands.add_parser(
        "compare",
        parents=[common],
        help="compare the MLflow runs of one experiment: table of differing params and final metrics, curves, "
        "α histograms and attention heat maps side by side, in OUTPUT/<experiment>/ and a summary run",
    )
    compare.add_argument("config", type=Path, nargs="?", help="YAML config whose mlflow.experiment/tracking_uri apply")
    compare.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    compare.add_argument("--experiment", metavar="NAME", help="experiment (default: the config's mlflow.experiment)")
    compare.add_argument("--runs", nargs="+", default=[], metavar="ID_OR_NAME", help="only these runs (ids or names)")
    compare.add_argument(
        "--filter",
        default="",
        metavar="MLFLOW_FILTER",
        help="MLflow filter, e.g. \"params.distill.attn.squeeze = 'shd'\"",
    )
    compare.add_argument(
        "--output", type=Path, default=Path("reports"), metavar="DIR", help="writes DIR/<experiment>/ (default reports)"
    )
    compare.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow store (default: config, MLFLOW_TRACKING_URI, sqlite:///mlflow.db)"
    )

    study = commands.add_parser(
        "study",
        parents=[common],
        help="which objective pays for this teacher and student: a seeded grid of variants × settings laid out by "
        "the config's `study:` section (configs/quality.yaml), tuned on validation, reported on the test split; "
        "resumable",
    )
    _add_config_arguments(study)
    study.add_argument("--plan", action="store_true", help="print what would run and the time estimate, then stop")
    study.add_argument("--quick", action="store_true", help="the config's study.quick subset and budget, no search")
    study.add_argument("--work", "--work-dir", type=Path, metavar="DIR", help="default study.work_dir (+ -quick)")
    study.add_argument("--report", "--report-dir", type=Path, metavar="DIR", help="default study.report_dir (+ -quick)")
    study.add_argument("--report-only", action="store_true", help="rebuild the report from the finished runs")
    study.add_argument("--keep-models", action="store_true", help="keep each run's checkpoint and exported student")
    study.add_argument("--run-logs", action="store_true", help="each run's own INFO messages too (DeepSpeed config…)")

    mlflow = commands.add_parser("mlflow", parents=[common], help="MLflow utilities")
    mlflow_commands = mlflow.add_subparsers(dest="mlflow_command", required=True, metavar="ACTION")
    sync = mlflow_commands.add_parser(
        "sync",
        parents=[common],
        help="copy the runs a job logged to its local fallback store (RUN_DIR/mlflow-local.db, used while the "
        "tracking store could not be reached) to the tracking store",
    )
    sync.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's train.output_dir")
    sync.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="where to copy them (default: the store each run was meant for, else MLFLOW_TRACKING_URI)",
    )
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with options, config and overrides in any order after the sub-command.

    argparse fills the positionals from the first run of plain words; words after a later option come back unknown
    and are overrides (a config file not given yet comes first). Unknown options are still errors.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    unknown = [word for word in extras if word.startswith("-")]
    if unknown or (extras and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extras)}")
    if extras and getattr(args, "config", None) is None:
        args.config = Path(extras.pop(0)) if args.command != "cache" else extras.pop(0)
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config, args.overrides)
    logger.info("config %s%s", args.config, f" with overrides {args.overrides}" if args.overrides else "")
    return config


def _dispatch(args: argparse.Namespace) -> None:
    # Each branch imports only its stage: DeepSpeed, MLflow and transformers take seconds to import.
    if args.command == "config" and args.reference:
        print(reference_markdown(), end="")
    elif args.command == "config":
        if args.config is None:
            raise ConfigError("usage: distill config CONFIG [overrides] | distill config --reference")
        print(_load(args).dump(), end="")
    elif args.command == "teacher":
        from pipeline.stages.teacher import teacher_stage

        teacher_stage(_load(args), overwrite=args.overwrite)
    elif args.command == "prepare":
        from pipeline.stages.prepare import prepare_stage

        prepare_stage(_load(args), overwrite=args.overwrite)
    elif args.command == "cache" and args.config == "verify":
        if len(args.overrides) != 1 or args.overwrite:
            raise ConfigError("usage: distill cache verify DIR")
        from pipeline.stages.cache import verify_stage

        verify_stage(Path(args.overrides[0]))
    elif args.command == "cache" and (args.plan or args.template):
        if not args.plan or args.overwrite:
            raise ConfigError("usage: distill cache CONFIG --plan [--template NAME] [overrides]")
        from pipeline.stages.cache import plan_stage

        args.config = Path(args.config)
        plan_stage(_load(args), args.template)
    elif args.command == "cache":
        from pipeline.stages.cache import cache_stage

        args.config = Path(args.config)
        cache_stage(_load(args), overwrite=args.overwrite)
    elif args.command == "train":
        from pipeline.stages.train import train_stage

        train_stage(_load(args), overwrite=args.overwrite)
    elif args.command == "eval":
        from pipeline.stages.evaluate import eval_stage

        eval_stage(_load(args), model_dir=args.model, checkpoint=args.checkpoint, split=args.split)
    elif args.command == "run":
        from pipeline.stages.run import run_stage

        run_stage(_load(args), overwrite=args.overwrite)
    elif args.command == "compare":
        from pipeline.reports.compare import compare_runs
        from pipeline.reports.runs import resolve_target

        uri, experiment = resolve_target(_load(args) if args.config else None, args.experiment, args.tracking_uri)
        report = compare_runs(uri, experiment, run_refs=args.runs, filter_string=args.filter, output=args.output)
        print(report.markdown, end="")
    elif args.command == "study":
        from pipeline.study.stage import study_stage

        options = ("quick", "plan", "report_only", "work", "report", "keep_models", "run_logs", "log_level")
        study_stage(args.config, args.overrides, **{name: getattr(args, name) for name in options})
    elif args.command == "mlflow":
        from pipeline.infra.mlflow_sync import sync_local_runs

        for local_id, copy_id in sync_local_runs(args.run_dir, args.tracking_uri).items():
            print(f"{local_id} -> {copy_id}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distill` console script; returns the process exit code (2: a mistake to fix, 130:
    interrupted)."""
    args = parse_arguments(argv)
    configure_logging(args.log_level)
    try:
        _dispatch(args)
    except PipelineError as error:
        logger.error("%s", error, exc_info=error if args.debug else None)
        return EXIT_USER_ERROR
    except (OSError, RuntimeError) as error:
        if not is_disk_full(error):
            raise
        where = Path(getattr(error, "filename", None) or Path.cwd())
        logger.error("%s", storage_error(error, where), exc_info=error if args.debug else None)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        logger.error("interrupted; a re-run continues from the last complete output")
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
