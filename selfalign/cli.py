"""`selfalign` command line: every verb's arguments (`build_parser`) and a thin `cmd_<verb>` that calls the
library and prints. No other module uses argparse."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .errors import EXIT_COMPLETE, EXIT_FINISHED_WITH_FAILED_CALLS, SelfalignError


def cmd_run(args) -> int:
    from .cache import holds_replies
    from .config import load_pipeline
    from .errors import disk_failure
    from .rundir import CACHE, DROPPED, stage_path
    from .runner import run_dir_for, run_pipeline

    loaded = load_pipeline(args.file, (args.set or []) + executor_overrides(args))
    run_dir = run_dir_for(loaded, args.output)
    created = first_missing(run_dir)
    try:
        manifest = run_pipeline(loaded, output=args.output, limit=args.limit, quiet=args.quiet)
    except Exception as exc:
        if created is not None and not holds_replies(run_dir / CACHE):
            # Bad input (a data error, a missing key) found before any model call: leave the disk as it was.
            shutil.rmtree(created, ignore_errors=True)
        failure = disk_failure(exc, str(run_dir))
        if failure is None:
            raise
        raise failure from None
    calls = manifest["model_calls"]
    summary = (f"{manifest['rows_out']} rows out; model calls: {calls['requested']} requested, {calls['cached']} "
               f"cached, {calls['sent']} sent, {calls['failed']} failed")
    if calls["failed"]:
        # Printed even with --quiet: a script or a person must not read this run as a clean success.
        where = ", ".join(str(stage_path(run_dir, stage["stage"], stage["kind"], DROPPED))
                          for stage in manifest["rows"] if stage["model_calls"]["failed"])
        print(f"finished with {calls['failed']} failed model calls in {manifest['seconds']:.1f}s: {summary}. "
              f"Their rows are in {where} (status, error, raw_output); run the same command again to retry only "
              f"those (exit status {EXIT_FINISHED_WITH_FAILED_CALLS})", file=sys.stderr)
        return EXIT_FINISHED_WITH_FAILED_CALLS
    if not args.quiet:
        print(f"done in {manifest['seconds']:.1f}s: {summary}", file=sys.stderr)
    return EXIT_COMPLETE


def first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (what a run would create), or None."""
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def executor_overrides(args) -> list[str]:
    """--executor/--address are shorthands for --set executor.kind=.../executor.address=... (same checks)."""
    overrides = []
    if args.executor:
        overrides.append(f"executor.kind={args.executor}")
    if args.address:
        overrides.append(f"executor.address={json.dumps(args.address)}")  # quoted: YAML would read 1:2 as a number
    return overrides


def cmd_validate(args) -> int:
    from .check import check_pipeline
    from .config import load_pipeline
    from .errors import ConfigErrors

    loaded = load_pipeline(args.file, args.set or [])
    errors = check_pipeline(loaded)
    if errors:
        raise ConfigErrors(errors)
    print(f"{args.file}: ok ({len(loaded.pipeline.stages)} stages)")
    return 0


def cmd_schema(args) -> int:
    from .config import Pipeline

    print(json.dumps(Pipeline.model_json_schema(), indent=2))
    return 0


def cmd_render(args) -> int:
    from .render import render

    print(render(args.file, args.stage, args.row, overrides=args.set or [], output=args.output))
    return 0


def cmd_push(args) -> int:
    from .publish import CardOptions, card_options_from_pipeline, push_frames
    from .finished_run import load_run

    run = load_run(args.run_dir)
    declared = card_options_from_pipeline(run)
    given = {"language": args.language, "license": args.license, "license_name": args.license_name,
             "license_link": args.license_link, "source_license": args.source_license,
             "source_attribution": args.source_attribution}
    options = CardOptions(**{**declared, **{k: v for k, v in given.items() if v is not None}})
    result = push_frames(run, args.repo, private=args.private, formats=args.format or None, options=options)
    configs = ", ".join(f"{name} ({', '.join(f'{s} {n}' for s, n in splits.items())})"
                        for name, splits in result["configs"].items())
    print(f"pushed {result['repo_id']} ({'private' if result['private'] else 'public'}): {configs}\n"
          f"load with: datasets.load_dataset({result['repo_id']!r}, {result['default']!r})")
    return 0


def cmd_export(args) -> int:
    from .publish import export_run
    from .finished_run import load_run

    written = export_run(load_run(args.run_dir), args.format, args.to)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_inspect(args) -> int:
    from .inspect_run import inspect

    print(inspect(args.run_dir, stage=args.stage, row_id=args.row_id, dropped=args.dropped, limit=args.limit),
          end="")
    return 0


def cmd_plan(args) -> int:
    from .plan import format_plan, plan_pipeline

    plan = plan_pipeline(args.file, args.set or [], limit=args.limit, output=args.output)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate_run import evaluate_run_dir, flag_overrides
    from .evaluate_view import arms_table
    from .progress import Progress

    result = evaluate_run_dir(args.run_dir, overrides=flag_overrides(args) + (args.set or []),
                              log=Progress(args.quiet).log)
    print(arms_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfalign", description="Make preference data with a model judging "
                                     "itself, checked against human labels.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_file(p):
        p.add_argument("file", help="pipeline YAML file")
        p.add_argument("--set", action="append", metavar="PATH=VALUE",
                       help="override a value, e.g. --set models.critic.base_url=http://127.0.0.1:9000/v1")
        return p

    run = with_file(sub.add_parser("run", help="run a pipeline (resumes from its cache)"))
    from .errors import positive_int
    run.add_argument("--limit", type=positive_int, metavar="N", help="read only the first N input rows (N >= 1)")
    run.add_argument("--output", help="run directory (default: outputs/<pipeline name>)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--executor", choices=["local", "ray"], help="where model calls run (default: the "
                     "pipeline's executor.kind, else local); ray: Ray Data actor pools, pip install 'selfalign[ray]'")
    run.add_argument("--address", help="Ray cluster address HOST:PORT (with --executor ray; default: a private Ray "
                     "started on this machine)")
    run.set_defaults(func=cmd_run)

    plan = with_file(sub.add_parser("plan", help="calls, cached calls, tokens, money and time per stage of a run "
                                                 "(or a resume), without calling a model"))
    plan.add_argument("--limit", type=positive_int, metavar="N", help="plan for the first N input rows, as run --limit")
    plan.add_argument("--output", help="run directory whose cache and manifest the plan reads (default: "
                      "outputs/<pipeline name>)")
    plan.add_argument("--json", action="store_true", help="the plan as JSON, for scripts")
    plan.set_defaults(func=cmd_plan)

    validate = with_file(sub.add_parser("validate", help="check a pipeline completely without calling a model"))
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the JSON schema of the pipeline file")
    schema.set_defaults(func=cmd_schema)

    render = with_file(sub.add_parser("render", help="print the exact messages a stage sends for one row"))
    render.add_argument("--stage", type=int, required=True, help="stage index (0 is the load stage)")
    render.add_argument("--row", type=int, default=0, help="row index in that stage's input")
    render.add_argument("--output", help="run directory whose cache serves earlier model stages")
    render.set_defaults(func=cmd_render)

    from .trainer_formats import FORMAT_NAMES

    push = sub.add_parser("push", help="push a finished run to the Hugging Face Hub (private by default)")
    push.add_argument("run_dir", metavar="RUN_DIR", help="run directory, e.g. outputs/<pipeline name>")
    push.add_argument("--repo", required=True, help="dataset repo id, NAMESPACE/NAME")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="create the repo private (the default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    push.add_argument("--format", action="append", choices=FORMAT_NAMES, metavar="FORMAT",
                      help=f"push only this format (repeatable; default: every format the rows support): "
                           f"{', '.join(FORMAT_NAMES)}")
    card = push.add_argument_group("dataset card (default: the pipeline's publish stage hub:, if any)")
    card.add_argument("--language", action="append", metavar="CODE",
                      help="language of the data, an ISO 639 code such as en (repeatable; required unless the "
                           "publish stage declares it)")
    card.add_argument("--license", help="license of this dataset, a Hub license id (default: other)")
    card.add_argument("--license-name", help="with license other: an id for it, e.g. my-license-1.0")
    card.add_argument("--license-link", help="with license other: LICENSE (a file in the repo) or a URL")
    card.add_argument("--source-license", help="license of the input data, e.g. mit")
    card.add_argument("--source-attribution",
                      help="credit for the input data, e.g. 'Anthropic HH-RLHF (Bai et al. 2022)'")
    push.set_defaults(func=cmd_push)

    export = sub.add_parser("export", help="write a finished run in one trainer format, for local training")
    export.add_argument("run_dir", metavar="RUN_DIR", help="run directory, e.g. outputs/<pipeline name>")
    export.add_argument("--format", required=True, choices=FORMAT_NAMES, metavar="FORMAT",
                        help=f"one of {', '.join(FORMAT_NAMES)}")
    export.add_argument("--to", required=True, metavar="DIR", help="folder for <split>.parquet")
    export.set_defaults(func=cmd_export)

    report = sub.add_parser("report", help="write RUN_DIR/report/index.html with plots of a finished run")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. outputs/<pipeline name>")
    report.set_defaults(func=cmd_report)

    inspect = sub.add_parser("inspect", help="show rows of a run: prompt, answers, critiques and scores")
    inspect.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. outputs/<pipeline name>")
    inspect.add_argument("--stage", help="stage index, kind or file name (default: the last stage; with --row-id: "
                                         "wherever the row ended)")
    which = inspect.add_mutually_exclusive_group()
    which.add_argument("--row-id", metavar="ID", help="one row (a unique prefix of its row_id is enough)")
    which.add_argument("--dropped", metavar="REASON", help="rows dropped with this reason (exact, else substring)")
    inspect.add_argument("--limit", type=int, default=3, help="rows to show (default 3)")
    inspect.set_defaults(func=cmd_inspect)

    evaluate = sub.add_parser("evaluate", help="train a reward model per arm (human, synthetic, filtered, final) "
                              "and score it on held-out human pairs; writes RUN_DIR/evaluate.json")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory, e.g. outputs/<pipeline name>")
    evaluate.add_argument("--eval", metavar="FILE|hf:ID", help="held-out human pairs (default: the run's own split)")
    evaluate.add_argument("--eval-format", choices=["hh-rlhf", "trl"], help="how --eval's pairs are written")
    evaluate.add_argument("--reward-model", choices=["probe", "finetune"], help="default: probe")
    evaluate.add_argument("--seeds", type=positive_int, metavar="N", help="draws of the budget per arm (default 5)")
    evaluate.add_argument("--budget", type=positive_int, metavar="N",
                          help="pairs per arm (default: the smallest arm's count)")
    evaluate.add_argument("--set", action="append", metavar="PATH=VALUE",
                          help="any setting, e.g. --set embedding.n_threads=2 or --set holdout=0.2")
    evaluate.add_argument("--quiet", action="store_true", help="no progress output")
    evaluate.set_defaults(func=cmd_evaluate)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SelfalignError as exc:
        print(f"error: {exc}" if "\n" not in str(exc) else f"error:\n{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished calls are cached, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
