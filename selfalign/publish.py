"""Publishing a finished run: local export for training, and a push to the Hugging Face Hub.

`export_run(run_dir, fmt, to_dir)` writes `<to_dir>/<split>.parquet` (+ `dataset_info.json` for LLaMA-Factory).
`push_run(run_dir, repo_id, options=CardOptions(language=["en"]))` pushes, in one commit, every trainer format
as a `datasets` config (`load_dataset(repo, "trl")`), the dataset card (README.md, see card.py), its score
histograms, `dataset_info.json` for LLaMA-Factory and `selfalign/pipeline.yaml` + `selfalign/manifest.json`.
If anything fails, a repo this push created is deleted again and one that existed is left as it was. Repos are
private unless asked. Local paths in the card, pipeline and manifest are rewritten to file names.

The token comes from the caller, `HF_TOKEN` or the `huggingface_hub` login (token=None lets the library find
it). It is never printed, logged or written: errors are re-raised as `PublishError` with it scrubbed out, and
every text file uploaded is checked for it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import polars as pl

from . import plots
from .card import CardInputs, render_card, render_histograms
from .errors import PublishError
from .manifest import RunContents
from .rundir import stage_path
from .trainer_formats import (FORMAT_NAMES, NEEDS, TRAINER_FORMATS, CritiquePrompt, default_critique_prompt,
                              format_frame, split_by_prompt)

DEFAULT_TEST_SIZE = 0.1
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REDACTED = "<redacted>"


def _test_size(stages: list[Any] | None) -> float:
    for stage in reversed(stages or []):
        if getattr(stage, "kind", None) in ("export", "publish") and getattr(stage, "test_size", None) is not None:
            return stage.test_size
    return DEFAULT_TEST_SIZE


def run_splits(run: RunContents, test_size: float | None = None) -> dict[str, pl.DataFrame]:
    """The run's train/test split: the one its export stage wrote (by row id) when there is one, else by the
    prompt hash with the export stage's test_size (default 0.1)."""
    frame = run.frame
    if test_size is None and run.test_row_ids is not None and "row_id" in frame.columns:
        is_test = pl.col("row_id").is_in(list(run.test_row_ids))
        splits = {"train": frame.filter(~is_test), "test": frame.filter(is_test)}
    else:
        splits = split_by_prompt(frame, _test_size(run.stages) if test_size is None else test_size)
    return {name: part for name, part in splits.items() if part.height or name == "train"}


def critique_prompt_for(run: RunContents) -> CritiquePrompt:
    """Re-render the critique stage's exact messages (template and hash checked against the manifest); the
    built-in prompt when the template is gone or changed."""
    from .paths import resolve_path
    from .prompts import load_template
    from .stages.export import critique_prompt_from_stages

    if run.loaded is None:
        return default_critique_prompt
    expected = run.manifest["templates"]

    def template(value: str):
        loaded = load_template(resolve_path(value, run.loaded.path))
        if value in expected and loaded.sha256 != expected[value]:
            raise ValueError(f"{value} changed since the run")
        return loaded

    render = critique_prompt_from_stages(run.stages, template)
    if render is None:
        return default_critique_prompt

    def safe(prompt, response, critique):
        try:
            return render(prompt, response, critique)
        except Exception:  # noqa: BLE001 - template missing or edited: the built-in prompt still teaches the task
            return default_critique_prompt(prompt, response, critique)
    return safe


def _check_formats(formats: Iterable[str], frame: pl.DataFrame) -> list[str]:
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMAT_NAMES]
    if unknown:
        raise PublishError(f"unknown format(s) {unknown}; choose from {', '.join(FORMAT_NAMES)}")
    for name in formats:
        missing = NEEDS[name] - set(frame.columns)
        if missing:
            raise PublishError(f"format {name!r} needs column(s) {sorted(missing)} that this run's rows do not "
                               f"have (they have {sorted(frame.columns)}); add the stage that makes them (critique + "
                               "consistency for critique columns) or choose another format")
    return formats


def build_formats(run: RunContents, formats: Iterable[str], splits: dict[str, pl.DataFrame] | None = None) \
        -> dict[str, dict[str, pl.DataFrame]]:
    formats = _check_formats(formats, run.frame)
    splits = run_splits(run) if splits is None else splits
    critique_prompt = critique_prompt_for(run) if "critique-sft" in formats else None
    from .stages.export import margin_setting
    try:  # the same `margin` column as the run's own export wrote
        margin, scale = margin_setting(run.stages)
    except ValueError as exc:
        raise PublishError(f"{exc} (the export stage of {run.run_dir / 'pipeline.yaml'})") from None
    return {name: {split: format_frame(name, part, critique_prompt, margin, scale) for split, part in splits.items()}
            for name in formats}


# -- local export ----------------------------------------------------------------------------------


def export_run(run: RunContents, fmt: str, to_dir: str | Path) -> dict[str, Path]:
    """Write `<to_dir>/<split>.parquet` in format `fmt` and its side files (`dataset_info.json` for llama-factory);
    returns {split or side file name without its suffix: path}."""
    from .stages.export import write_format

    frames = build_formats(run, [fmt])[fmt]
    to_dir = Path(to_dir)
    try:
        return write_format(frames, fmt, to_dir)
    except OSError as exc:
        raise PublishError(f"cannot write {to_dir}: {exc.strerror}; choose another --to directory") from None


# -- what the card declares ------------------------------------------------------------------------


LANGUAGE = re.compile(r"^(?:[a-z]{2,3}|code|multilingual)$")       # what the Hub's `language:` accepts
LICENSE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")           # an id, like my-license-1.0


@dataclass
class CardOptions:
    """What only the user can know about the data, declared in the publish stage's `hub:` or with
    `selfalign push` flags: its language(s), its license, and the license/attribution of the input data."""

    language: list[str] = field(default_factory=list)
    license: str = "other"
    license_name: str | None = None      # for license: other (the Hub's id for it)
    license_link: str | None = None      # for license: other: "LICENSE" (a file in the repo) or a URL
    source_license: str | None = None
    source_attribution: str | None = None

    def problems(self) -> list[str]:
        found = []
        if not self.language:
            found.append("the card needs the data's language: add `language: [en]` (ISO 639 codes) under the "
                         "publish stage's hub:, or pass --language en to `selfalign push` (repeatable)")
        bad = [code for code in self.language if not LANGUAGE.match(code)]
        if bad:
            found.append(f"language {bad} is not an ISO 639 code (two or three lower-case letters, e.g. en, de, "
                         "fra) or `code`/`multilingual`")
        if self.license_name is not None and not LICENSE_NAME.match(self.license_name):
            found.append(f"license_name {self.license_name!r} is not an id; use lower-case letters, digits, . _ - "
                         "(e.g. my-license-1.0)")
        if self.license != "other" and (self.license_name or self.license_link):
            found.append(f"license_name/license_link describe a license that is `other`, not {self.license!r}; "
                         "drop them or set license: other")
        return found


def data_sources(run: RunContents, options: CardOptions) -> list[dict[str, Any]] | None:
    """The pipeline's input data (load stages, and mix stages' `add:`) as the card names it: the `hf:` id, or a
    local file's or folder's name only; None when the pipeline file is not available."""
    if run.stages is None:
        return None
    sources = []
    for stage in run.stages:
        for entry in [stage, *(getattr(stage, "add", None) or [])]:
            path, hf = getattr(entry, "path", None), getattr(entry, "hf", None)
            if stage.kind not in ("load", "mix") or (path is None and hf is None):
                continue
            if path is not None:
                kind, name = "file", Path(path).name
            elif hf.startswith(("/", "~", ".")) or "\\" in hf or os.path.isdir(hf):
                kind, name = "folder", Path(hf).name  # load_dataset reads a saved dataset folder too
            else:
                kind, name = "hf", hf
            sources.append({"kind": kind, "name": name, "license": options.source_license,
                            "attribution": options.source_attribution})
    return sources


# -- local paths never leave the machine -----------------------------------------------------------


_PATH_REST = r"[^\s'\"`<>|,;()\[\]{}]*"  # a path goes on to the next space, quote or bracket


def local_path_rewriter(run: RunContents) -> Callable[[str], str]:
    """A function that rewrites local paths in text bound for the Hub (card, pipeline.yaml, manifest.json) to
    their last component, so that nothing shows a user's home directory, temp directory or disk layout.

    Known paths go first, exactly as the pipeline wrote them (that covers names with spaces): the input files,
    model files, the pipeline file and the run directory. Then any other path under the home, temp, current,
    run or pipeline directory."""
    known: set[str] = set()
    roots: set[str] = {str(Path.home()), tempfile.gettempdir(), os.getcwd(), str(run.run_dir.resolve())}
    if run.pipeline_file:
        known.add(run.pipeline_file)
        roots.add(str(Path(run.pipeline_file).resolve().parent))
    known.add(run.manifest["pipeline_file"])
    for stage in run.stages or []:
        calibration = [stage.calibrate] if getattr(stage, "calibrate", None) is not None else []
        for entry in [stage, *(getattr(stage, "add", None) or []), *calibration]:
            path, hf = getattr(entry, "path", None), getattr(entry, "hf", None)
            local = [path] if isinstance(path, str) else []
            if isinstance(hf, str) and (hf.startswith(("/", "~", ".")) or os.path.isdir(hf)):
                local.append(hf)  # a saved dataset folder, not a Hub id
            for value in local:
                if "/" in value or "\\" in value:
                    known.add(value)
                    roots.add(str(Path(value).expanduser().resolve().parent))
    if run.loaded is not None:
        for model in run.loaded.pipeline.models.values():
            for value in (getattr(model, "model_path", None), getattr(model, "model", None)):
                if isinstance(value, str) and (value.startswith(("/", "~")) or os.path.exists(value)):
                    known.add(value)
    known |= {str(Path(value).expanduser().resolve()) for value in list(known)}
    # "/" or a one-level root (e.g. /tmp when it is the cwd's parent) would swallow unrelated text.
    roots = {root for root in roots if len(Path(root).parts) >= 2}
    known_first = sorted((value for value in known if Path(value).name), key=len, reverse=True)
    # Not inside a longer word or URL (`(?<!...)`), and only a whole directory name (`(?=...)`).
    alternatives = "|".join(re.escape(root) for root in sorted(roots, key=len, reverse=True))
    under_roots = re.compile(rf"(?<![\w.:/-])(?:{alternatives})(?:[/\\]{_PATH_REST})?(?=$|[\s'\"`<>|,;()\[\]{{}}])")

    def rewrite(text: str) -> str:
        for value in known_first:
            text = text.replace(value, Path(value).name)
        if roots:
            text = under_roots.sub(lambda match: Path(match.group(0).rstrip("/\\")).name or ".", text)
        return text
    return rewrite


# -- push ------------------------------------------------------------------------------------------


def _secrets(token: str | None) -> list[str]:
    found = [token] if isinstance(token, str) else []
    try:
        from huggingface_hub import get_token

        found.append(get_token())
    except Exception:  # noqa: BLE001
        pass
    return sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def _hub_error(exc: BaseException, repo_id: str, secrets: list[str], step: str) -> str:
    """What went wrong at `step` on the Hub, with a fix, the token scrubbed from every word of it."""
    # huggingface_hub wraps some HTTP errors (an LFS upload's, for one) in a RuntimeError: the status and the
    # server's words are on the exception it was raised from.
    chain, cause = [], exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    status = next((s for e in chain if (s := getattr(getattr(e, "response", None), "status_code", None))), None)
    words = []
    for error in chain[:2]:
        lines = scrub(f"{type(error).__name__}: {error}", secrets).strip().splitlines()
        words.append(lines[0] if lines else type(error).__name__)
    server = next((e.server_message for e in chain if getattr(e, "server_message", None)), None)
    if server:  # the Hub's own words (X-Error-Message), e.g. why it rejected a commit
        words.append(f"the Hub said: {scrub(server, secrets).strip().splitlines()[0]}")
    detail = "; ".join(words)
    exc = next((e for e in chain if not isinstance(e, RuntimeError)), exc)
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if status == 401:
        message = (f"the Hub at {endpoint} rejected the token (401); set HF_TOKEN to a valid write token or run "
                   "`hf auth login`")
    elif status == 403:
        message = (f"the token may not write to {repo_id} (403); use a token with write access to that namespace "
                   "(a fine-grained token needs 'write' on it)")
    elif status == 404:
        message = f"{repo_id} was not found on {endpoint} (404); check the namespace and that the token can see it"
    elif status is not None and status >= 500:
        message = f"the Hub at {endpoint} answered {status} while pushing {repo_id}; try again later"
    elif status is not None:
        message = f"the Hub at {endpoint} refused the push to {repo_id} ({status}); see its words below"
    elif isinstance(exc, (ConnectionError, OSError, TimeoutError)) or "connect" in type(exc).__name__.lower():
        message = f"cannot reach the Hub at {endpoint}; check the network (and HF_ENDPOINT if you set it)"
    else:
        message = f"pushing {repo_id} failed"
    return f"{step} failed: {message} [{detail}]"


def _write_text(path: Path, text: str, secrets: list[str], public: Callable[[str], str] = lambda text: text) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(public(scrub(text, secrets)), encoding="utf-8")


def card_inputs(run: RunContents, splits: dict[str, pl.DataFrame], formatted: dict[str, dict[str, pl.DataFrame]],
                default_format: str | None, options: CardOptions, repo_id: str | None) -> CardInputs:
    # Every critique score of the run's critique stages, as the report's score plot reads them.
    parts = []
    for entry in run.manifest["rows"]:
        if entry["kind"] != "critique":
            continue
        try:
            stage = pl.read_parquet(stage_path(run.run_dir, entry["stage"], entry["kind"]))
        except (OSError, pl.exceptions.PolarsError):
            continue
        if {"chosen_critiques", "rejected_critiques"} & set(stage.columns):
            parts.append(plots.critique_scores(stage).with_columns(pl.col("score").cast(pl.Float64)))
    critique_scores = pl.concat(parts) if parts else None
    return CardInputs(
        name=run.name, manifest=run.manifest, frame=run.frame, splits=splits,
        formats={name: {split: part.height for split, part in frames.items()} for name, frames in formatted.items()},
        default_format=default_format, pipeline_text=run.pipeline_text, pipeline_file=run.pipeline_file,
        pipeline_matches_run=run.pipeline_matches_run, stages=run.stages, critique_scores=critique_scores,
        license=options.license, license_name=options.license_name, license_link=options.license_link,
        language=list(options.language), sources=data_sources(run, options), repo_id=repo_id)


def write_card(run: RunContents, directory: str | Path, formats: Iterable[str] | None = None, repo_id: str | None = None,
               options: CardOptions | None = None, existing_metadata: dict[str, Any] | None = None,
               secrets: Iterable[str] = (), splits: dict[str, pl.DataFrame] | None = None,
               formatted: dict[str, dict[str, pl.DataFrame]] | None = None) -> Path:
    """Render README.md and its images (`assets/*.png`) into `directory`, as `push_run` uploads them, local paths
    rewritten to file names; returns the README path. Without `repo_id` the card says REPO where the Hub id goes."""
    directory = Path(directory)
    splits = run_splits(run) if splits is None else splits
    if formatted is None:
        formatted = build_formats(run, formats or supported_formats(run.frame), splits)
    default = "trl" if "trl" in formatted else next(iter(formatted))
    inputs = card_inputs(run, splits, formatted, default, options or CardOptions(), repo_id)
    images = render_histograms(inputs, directory)
    readme = directory / "README.md"
    _write_text(readme, render_card(inputs, images, existing_metadata), list(secrets), local_path_rewriter(run))
    return readme


def _resolve_repo(api, repo_id: str) -> str:
    if "/" in repo_id:
        return repo_id
    return f"{api.whoami()['name']}/{repo_id}"


# datasets' push_to_hub default: shards of at most this many bytes of Arrow data.
MAX_SHARD_BYTES = 500 * 1024 * 1024


def _write_config(name: str, frames: dict[str, pl.DataFrame], folder: Path) -> tuple[list[str], Any]:
    """`<name>/<split>-NNNNN-of-NNNNN.parquet` as `DatasetDict.push_to_hub(config_name=name)` names them, written
    with datasets' own parquet writer (its features go into the file); returns (paths, DatasetInfo)."""
    import datasets

    paths, split_infos, download = [], datasets.SplitDict(), 0
    features = None
    for split, frame in frames.items():
        dataset = datasets.Dataset(frame.to_arrow())
        features = dataset.features
        shards = max(1, -(-dataset.data.nbytes // MAX_SHARD_BYTES))
        for index in range(shards):
            path = f"{name}/{split}-{index:05d}-of-{shards:05d}.parquet"
            (folder / name).mkdir(parents=True, exist_ok=True)
            download += dataset.shard(shards, index, contiguous=True).to_parquet(str(folder / path))
            paths.append(path)
        split_infos.add(datasets.SplitInfo(name=split, num_bytes=dataset.data.nbytes, num_examples=len(dataset)))
    dataset_size = sum(info.num_bytes for info in split_infos.values())
    info = datasets.DatasetInfo(config_name=name, features=features, splits=split_infos, download_size=download,
                                dataset_size=dataset_size)
    return paths, info


def _merged_metadata(existing: dict[str, Any], infos: dict[str, Any], formats: dict[str, dict[str, int]],
                     default: str) -> dict[str, Any]:
    """The repo's `configs` and `dataset_info` with this push's configs put in (others kept, as push_to_hub
    keeps them); `default` becomes the only default config."""
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    from .card import configs_metadata

    configs = [dict(c) for c in existing.get("configs") or [] if c.get("config_name") not in formats]
    for config in configs:
        config.pop("default", None)
    configs += configs_metadata(formats, default)
    card_data = DatasetCardData(dataset_info=existing.get("dataset_info"))
    DatasetInfosDict(infos).to_dataset_card_data(card_data)
    dataset_info = card_data.to_dict()["dataset_info"]
    return {"configs": configs, "dataset_info": dataset_info if isinstance(dataset_info, list) else [dataset_info]}


def push_frames(run: RunContents, repo_id: str, private: bool = True, formats: Iterable[str] | None = None,
                token: str | None = None, options: CardOptions | None = None,
                splits: dict[str, pl.DataFrame] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Everything goes up in one `create_commit`, so the repo either gets all of it or nothing; a repo that this
    push created is deleted again when anything fails, and one that existed is left as it was."""
    log = log or (lambda message: print(message, file=sys.stderr))
    if not REPO_ID.match(repo_id or ""):
        raise PublishError(f"--repo {repo_id!r} is not a Hub dataset id; use NAMESPACE/NAME (letters, digits, . _ -)")
    options = options or CardOptions()
    problems = options.problems()
    if problems:
        raise PublishError("; ".join(problems) + " (nothing was pushed)")
    formats = _check_formats(formats or supported_formats(run.frame), run.frame)
    splits = run_splits(run) if splits is None else splits
    formatted = build_formats(run, formats, splits)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi, constants
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    secrets = _secrets(token)
    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (and HF_DATASETS_OFFLINE)")
    if not secrets:
        raise PublishError("no Hugging Face token found; set HF_TOKEN to a write token or run `hf auth login`, "
                           "then push again (nothing was pushed)")
    api = HfApi(token=token)
    default = "trl" if "trl" in formatted else formats[0]
    step = "checking the token"
    existing: dict[str, Any] = {}
    try:
        repo_id = _resolve_repo(api, repo_id)
        step = f"looking up {repo_id}"
        try:
            info = api.repo_info(repo_id, repo_type="dataset")
        except RepositoryNotFoundError:
            info = None
        if info is not None:
            if bool(info.private) != private:
                state, wanted = ("public", "--public") if not info.private else ("private", "--private")
                raise PublishError(f"{repo_id} already exists and is {state}; pass {wanted} to push to it as it is, "
                                   "or change its visibility on the Hub first (selfalign never changes it)")
            step = f"reading {repo_id}'s files and card"
            files_before = set(api.list_repo_files(repo_id, repo_type="dataset", revision=info.sha))
            if "README.md" in files_before:
                try:
                    card = DatasetCard.load(repo_id, repo_type="dataset", token=token)
                    existing = {k: v for k, v in card.data.to_dict().items() if k in ("configs", "dataset_info")}
                except EntryNotFoundError:
                    pass
    except PublishError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PublishError(_hub_error(exc, repo_id, secrets, step) + " (nothing was pushed)") from None

    public = local_path_rewriter(run)
    with tempfile.TemporaryDirectory(prefix="selfalign-push-") as tmp:
        folder = Path(tmp)
        data_files, infos = [], {}
        for name, frames in formatted.items():
            log(f"push: {repo_id} config {name!r}: "
                + ", ".join(f"{split} {frame.height} rows" for split, frame in frames.items()))
            paths, infos[name] = _write_config(name, frames, folder)
            data_files += paths
        counts = {name: {split: frame.height for split, frame in frames.items()} for name, frames in formatted.items()}
        readme = write_card(run, folder, formats, repo_id, options, _merged_metadata(existing, infos, counts, default),
                            secrets, splits=splits, formatted=formatted)
        DatasetCard(readme.read_text(encoding="utf-8")).validate(repo_type="dataset")
        for name, frames in formatted.items():  # files a trainer reads beside the data, at the repo root
            side_files = TRAINER_FORMATS[name].side_files
            for file_name, content in (side_files(tuple(frames), repo_id) if side_files else {}).items():
                _write_text(folder / file_name, json.dumps(content, indent=2) + "\n", secrets, public)
        if run.pipeline_text is not None:
            _write_text(folder / "selfalign" / "pipeline.yaml", run.pipeline_text, secrets, public)
        _write_text(folder / "selfalign" / "manifest.json", json.dumps(run.manifest, indent=2, ensure_ascii=False,
                                                                         default=str), secrets, public)
        _assert_no_secret(folder, secrets)
        uploads = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        operations: list[Any] = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path))
                                 for path in uploads]
        if info is not None:
            # A format pushed again replaces its old shards, as push_to_hub does: stale ones are deleted.
            operations += [CommitOperationDelete(path_in_repo=path) for path in sorted(files_before)
                           if path.split("/", 1)[0] in formatted and path not in uploads]
        created, url = False, f"{constants.ENDPOINT}/datasets/{repo_id}"
        try:
            if info is None:
                step = f"creating {repo_id}"
                # exist_ok=False: if the repo appeared meanwhile it is not this push's to delete.
                url = str(api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=False))
                created = True
            step = f"uploading and committing {len(uploads)} files to {repo_id}"
            log(f"push: {repo_id}: one commit with {len(uploads)} files (data, card, histograms, pipeline, manifest)")
            api.create_commit(repo_id, operations, repo_type="dataset", commit_message=f"selfalign: {run.name}",
                              commit_description=f"configs: {', '.join(formatted)}",
                              parent_commit=info.sha if info is not None else None)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
            message = (_hub_error(exc, repo_id, secrets, step) if isinstance(exc, Exception)
                       else f"{step} was interrupted")
            if created:
                message += "; " + _delete_created_repo(api, repo_id, url, secrets)
            else:
                message += f"; {repo_id} is as it was before this push (nothing was committed)"
            if isinstance(exc, KeyboardInterrupt):
                log(f"push: {message}")
                raise
            raise PublishError(message + ". Fix the cause and push again") from None
    if info is not None:
        url = f"{constants.ENDPOINT}/datasets/{repo_id}"
    return {"repo_id": repo_id, "url": str(url), "private": private, "configs": counts, "default": default}


def _delete_created_repo(api, repo_id: str, url: str, secrets: list[str]) -> str:
    """Remove the repo a failed push created, so no empty repo is left behind; says what happened."""
    try:
        api.delete_repo(repo_id, repo_type="dataset", missing_ok=True)
    except Exception as exc:  # noqa: BLE001
        detail = scrub(f"{type(exc).__name__}: {exc}", secrets).strip().splitlines()
        return (f"the repo this push created could not be deleted ({detail[0] if detail else type(exc).__name__}); "
                f"delete it at {url}/settings")
    return f"the repo this push had created was deleted, so nothing is left on the Hub"


def supported_formats(frame: pl.DataFrame) -> list[str]:
    """Every format whose columns the rows have (all seven for a Critic-RM run, the pair formats otherwise)."""
    return [name for name in FORMAT_NAMES if NEEDS[name] <= set(frame.columns)]


def _assert_no_secret(folder: Path, secrets: list[str]) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(secret.encode() in data for secret in secrets):
                raise PublishError(f"{path.name} would contain the Hub token; nothing was pushed. Remove the "
                                   "token from the pipeline file or data")


# -- what the pipeline declares ---------------------------------------------------------------------


def card_options_from_pipeline(run: RunContents) -> dict[str, Any]:
    """The card options of the pipeline's publish stage (`hub:`), if it has one: `selfalign push` starts from them."""
    for stage in reversed(run.stages or []):
        if stage.kind == "publish":
            return stage.hub.card_options()
    return {}
