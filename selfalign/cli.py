"""`selfalign` command line. Thin: each verb parses its arguments and calls the library."""

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
    from .runner import run_dir_for, run_pipeline

    loaded = load_pipeline(args.file, (args.set or []) + executor_overrides(args))
    run_dir = run_dir_for(loaded, args.output)
    created = first_missing(run_dir)
    try:
        manifest = run_pipeline(loaded, output=args.output, limit=args.limit, quiet=args.quiet)
    except Exception as exc:
        if created is not None and not holds_replies(run_dir / "cache.sqlite"):
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
        where = ", ".join(str(run_dir / "dropped" / f"{stage['stage']:02d}-{stage['kind']}.parquet")
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


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run_dir, flag_overrides
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

    validate = with_file(sub.add_parser("validate", help="check a pipeline completely without calling a model"))
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the JSON schema of the pipeline file")
    schema.set_defaults(func=cmd_schema)

    render = with_file(sub.add_parser("render", help="print the exact messages a stage sends for one row"))
    render.add_argument("--stage", type=int, required=True, help="stage index (0 is the load stage)")
    render.add_argument("--row", type=int, default=0, help="row index in that stage's input")
    render.add_argument("--output", help="run directory whose cache serves earlier model stages")
    render.set_defaults(func=cmd_render)

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

    from . import inspect_run, publish, report
    publish.add_cli(sub)  # push, export
    report.add_cli(sub)
    inspect_run.add_cli(sub)
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
