"""The run report (HTML + PNG plots) and `inspect`, on fake-backend runs of the HH-RLHF test rows.

The slow test opens the report in headless Chromium (Debian package `chromium`) behind a counting proxy:
no request may leave the page, and every image must decode.
"""

import base64
import fcntl
import gzip
import http.server
import io
import json
import re
import shutil
import socketserver
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from selfalign import plots, report
from selfalign.cli import build_parser
from selfalign.config import load_pipeline
from selfalign.errors import RunError
from selfalign.input_formats import RowError, from_hh_rlhf
from selfalign.inspect_run import inspect
from selfalign.report import write_report
from selfalign.runner import run_pipeline
from tests.support.fake_pipeline import fake_pipeline_yaml, load_hh_rlhf

ROOT = Path(__file__).resolve().parent.parent
HH_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-test-1500.jsonl.gz"
SECTIONS = ["summary", "funnel", "scores", "agreement", "position_consistency", "length_bias", "category", "cost",
            "lengths", "samples"]
CATEGORIES = ["violence", "drugs", "privacy", "self-harm", "fraud"]


def _hh() -> Path:
    if not HH_DATA.exists():
        pytest.fail(f"{HH_DATA} is missing: the tests need ../shared/data beside the project (CI has it)")
    return HH_DATA


@pytest.fixture(scope="module")
def critic_rm_run(tmp_path_factory) -> Path:
    """The ready Critic-RM pipeline on all 1,500 rows, fake critic (random scores)."""
    run_dir = tmp_path_factory.mktemp("critic_rm") / "run"
    overrides = ["models.critic.backend=fake", f"stages.0.path={_hh()}", "stages.0.on_bad_row=drop"]
    run_pipeline(load_pipeline(ROOT / "pipelines" / "critic_rm.yaml", overrides), output=run_dir, quiet=True)
    return run_dir


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> Path:
    """Human pairs critiqued and filtered, mixed with synthetic pairs (the longer answer chosen), judged in
    both orders, filtered; then a `category` column is added to every stage file, as data with one would
    carry it."""
    base = tmp_path_factory.mktemp("mixed")
    synthetic = base / "synthetic.jsonl"
    rows = []
    with gzip.open(_hh(), "rt") as source:
        for number, line in enumerate(source):
            if number < 1000:
                continue
            try:
                row = from_hh_rlhf(json.loads(line))
            except RowError:
                continue
            chosen, rejected = sorted([row["chosen"], row["rejected"]], key=len, reverse=True)
            rows.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
            if len(rows) == 120:
                break
    synthetic.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipeline = base / "mixed.yaml"
    pipeline.write_text(fake_pipeline_yaml("mixed", [
        load_hh_rlhf(_hh()),
        {"kind": "critique", "model": "critic", "samples": 3},
        {"kind": "consistency", "min_margin": 1},
        {"kind": "mix", "add": [{"path": synthetic, "format": "trl"}]},
        {"kind": "judge", "model": "j", "on_disagreement": "swap"},
        {"kind": "filter", "where": "margin >= 2 OR margin IS NULL", "reason": "small_margin"},
        {"kind": "export"},
    ], models=("critic", "j")))
    run_dir = base / "run"
    run_pipeline(load_pipeline(pipeline), output=run_dir, limit=250, quiet=True)
    for path in [*run_dir.glob("stages/*.parquet"), *run_dir.glob("dropped/*.parquet")]:
        frame = pl.read_parquet(path)
        if "row_id" in frame.columns:
            frame.with_columns(category=pl.col("row_id").map_elements(
                lambda r: CATEGORIES[int(r[:4], 16) % len(CATEGORIES)], return_dtype=pl.Utf8)).write_parquet(path)
    return run_dir


class Page(HTMLParser):
    """Section ids, image sources, links and script/style/link tags of a page."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.refs, self.tags, self.styles = [], [], [], [], []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        self._in_style = tag == "style"
        for name in ("src", "href", "srcset", "poster", "data", "action", "background"):
            if attrs.get(name):
                self.refs.append(attrs[name])
        if attrs.get("style"):
            self.styles.append(attrs["style"])

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def parse(path: Path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def decode_png(source: str, folder: Path) -> Image.Image:
    if source.startswith("data:"):
        header, payload = source.split(",", 1)
        assert header == "data:image/png;base64", header
        data = base64.b64decode(payload, validate=True)
    else:
        data = (folder / source).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel; raises on a truncated or corrupt file
    assert image.width > 200 and image.height > 100
    return image


def assert_self_contained(page: Page) -> None:
    """Nothing the browser would fetch: no script, style sheet, frame or object, no url() or @import in CSS,
    and every src/href a data: PNG or an in-page anchor. (URLs in the data's own text are just text.)"""
    assert not {"script", "link", "iframe", "object", "embed", "base", "video", "audio", "source"} & set(page.tags)
    assert page.styles and not any("url(" in css or "@import" in css for css in page.styles)
    for ref in page.refs:
        assert ref.startswith(("data:image/png;base64,", "#")), ref[:80]


# -- the report ---------------------------------------------------------------------------------------------

def test_critic_rm_report_has_every_section_and_every_image_is_a_png(critic_rm_run):
    path = write_report(critic_rm_run)
    assert path == critic_rm_run / "report" / "index.html"
    text, page = parse(path)
    assert page.sections == SECTIONS
    assert_self_contained(page)
    # Critic-RM on human data: no pairwise judge and no category column, so those two are notes, not plots.
    drawn = {"funnel", "scores", "agreement", "length_bias", "cost"}
    assert sorted(p.stem for p in (critic_rm_run / "report").glob("*.png")) == sorted(drawn)
    assert len(page.images) == len(drawn)
    for source in page.images:
        decode_png(source, path.parent)
    for name in drawn:  # the embedded image is the PNG beside the page, byte for byte
        png = (critic_rm_run / "report" / f"{name}.png").read_bytes()
        assert base64.b64encode(png).decode() in text
    for skipped, why in (("position_consistency", "no judge stage ran"), ("category", "no `category` column")):
        section = text.split(f'<section id="{skipped}">', 1)[1].split("</section>", 1)[0]
        assert "<img" not in section and "class=note" in section and why in section


def test_critic_rm_report_numbers_match_the_manifest(critic_rm_run):
    manifest = json.loads((critic_rm_run / "manifest.json").read_text())
    run = report.load_run(critic_rm_run)
    table = plots.agreement_table(run.stages)
    by_stage = {row["stage"]: row for row in table.iter_rows(named=True)}
    for stage in manifest["rows"]:
        if stage["agreement_with_human"] is not None:
            assert by_stage[stage["stage"]]["agreement"] == stage["agreement_with_human"]
    consistency = manifest["rows"][2]
    before, after = by_stage[1], by_stage[2]  # the confusion table before and after the consistency filter
    assert before["agreement"] == consistency["metrics"]["agreement_with_human_before"]
    assert before["human_rows"] == consistency["in"]
    assert before["tied"] == consistency["drop_reasons"]["scores_tied"]
    assert before["disagrees"] == consistency["drop_reasons"]["scores_contradict_label"]
    assert (after["agrees"], after["tied"], after["disagrees"]) == (consistency["out"], 0, 0)
    text = write_report(critic_rm_run).read_text()
    assert f"scores_contradict_label: {before['disagrees']:,}" in text
    # Calls paid over the run's whole life, from the attempts the cache recorded.
    assert manifest["attempts"] and manifest["calls_sent_all_attempts"] == manifest["model_calls"]["sent"]
    assert f"{manifest['calls_sent_all_attempts']:,} over {len(manifest['attempts'])} attempt(s)" in text
    # The plot functions stand alone (the dataset card calls them): the score plot from the manifest only.
    png = plots.plot_scores(critic_rm_run / "alone" / "scores.png", manifest=manifest)
    assert decode_png(png.name, png.parent).width > 200
    with pytest.raises(plots.NoData, match="no judge stage"):
        plots.plot_position_consistency(plots.judge_table(run.stages), critic_rm_run / "alone" / "judge.png")
    lengths = plots.length_bias_table(run.stages)
    final = lengths.filter(pl.col("stage") == 4)
    assert final["chosen_longer"].to_list() == [manifest["dataset"]["length_bias_chosen_longer"]["human"]]


def test_mixed_run_draws_judge_length_and_category_plots(mixed_run):
    path = write_report(mixed_run)
    text, page = parse(path)
    assert page.sections == SECTIONS
    assert_self_contained(page)
    assert len(page.images) == 7 and "class=note" not in text
    for source in page.images:
        decode_png(source, path.parent)
    manifest = json.loads((mixed_run / "manifest.json").read_text())
    run = report.load_run(mixed_run)
    judged = plots.judge_table(run.stages)
    assert sorted(judged["source"].to_list()) == ["human", "synthetic"]
    outcomes = {o: judged[o].sum() for o in plots.JUDGE_OUTCOMES}
    consistent = outcomes["agrees with label"] + outcomes["disagrees with label"]
    judge = manifest["rows"][4]
    assert round(consistent / judge["in"], 4) == judge["metrics"]["position_consistency"]
    assert round(outcomes["agrees with label"] / consistent, 4) == judge["metrics"]["agreement_with_label"]
    assert outcomes["position inconsistent"] == judge["drop_reasons"]["position_inconsistent"]
    lengths = plots.length_bias_table(run.stages)
    after_mix = dict(lengths.filter(pl.col("stage") == 3).select("source", "chosen_longer").rows())
    assert after_mix["synthetic"] > 0.9  # the synthetic pairs chose the longer answer by construction
    categories = plots.category_table(run.stages)
    assert sorted(categories["category"].to_list()) == sorted(CATEGORIES)
    assert categories["pairs"].sum() == manifest["rows"][1]["out"]
    final_human = run.final.filter(pl.col("source") == "human").height
    assert categories["kept"].sum() == final_human


def test_report_refuses_missing_unfinished_and_busy_run_dirs(critic_rm_run, tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a selfalign run directory"):
        write_report(tmp_path / "empty")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(critic_rm_run / "stages", unfinished / "stages")
    with pytest.raises(RunError, match="did not finish.*re-run"):
        write_report(unfinished)
    # ... but inspect reads the stages it has, which is when one needs it.
    assert "has not finished" in inspect(unfinished, limit=1)
    busy = tmp_path / "busy"
    shutil.copytree(critic_rm_run, busy, ignore=shutil.ignore_patterns("cache.sqlite*", "dataset", "export"))
    with open(busy / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunError, match="being written by a running"):
            write_report(busy)
    assert write_report(busy).exists()
    (busy / "stages" / "03-refine.parquet").unlink()
    with pytest.raises(RunError, match="missing \\(stages/03-refine.parquet\\)"):
        write_report(busy)


def test_cli_subcommands(critic_rm_run, capsys):
    parser = build_parser()
    args = parser.parse_args(["report", str(critic_rm_run)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(critic_rm_run / "report" / "index.html")
    args = parser.parse_args(["inspect", str(critic_rm_run), "--dropped", "scores_tied", "--limit", "1"])
    assert args.func(args) == 0
    assert "dropped: scores_tied" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # one of --row-id / --dropped
        parser.parse_args(["inspect", str(critic_rm_run), "--row-id", "x", "--dropped", "y"])


# -- inspect ------------------------------------------------------------------------------------------------

def test_inspect_row_shows_prompt_answers_critiques_and_scores(critic_rm_run):
    final = pl.read_parquet(critic_rm_run / "stages" / "04-export.parquet")
    row = final.row(0, named=True)
    text = inspect(critic_rm_run, row_id=row["row_id"][:8], width=88)
    assert text.startswith("trail: 0 load: kept -> 1 critique: kept -> 2 consistency: kept -> 3 refine: kept")
    assert f"row {row['row_id']} | stage 4 (export), kept | source human" in text
    flat = " ".join(text.split())
    for message in row["prompt"]:
        assert " ".join(message["content"].split()) in flat
    assert " ".join(row["chosen"].split()) in flat and " ".join(row["rejected"].split()) in flat
    assert f"chosen_score {row['chosen_score']:.2f}" in text and f"rejected_score {row['rejected_score']:.2f}" in text
    for side in ("chosen", "rejected"):
        critique = row[f"{side}_critiques"][0]
        assert critique["text"] in text and f"score {critique['score']:.2f}, refined" in text
    assert f"margin (chosen - rejected score): {row['margin']:.2f}" in text
    assert max(len(line) for line in text.splitlines()) <= 88
    # Earlier stage: all four sampled critiques, with their sample index.
    text = inspect(critic_rm_run, stage="critique", row_id=row["row_id"], width=88)
    assert "critiques: 4, mean score" in text and "sample 3, model critic" in text


def test_inspect_follows_a_dropped_row_and_lists_drops_by_reason(critic_rm_run):
    manifest = json.loads((critic_rm_run / "manifest.json").read_text())
    tied = pl.read_parquet(critic_rm_run / "dropped" / "02-consistency.parquet").filter(
        pl.col("drop_reason") == "scores_tied")
    text = inspect(critic_rm_run, row_id=tied["row_id"][0])
    assert "2 consistency: DROPPED (scores_tied)" in text and "dropped: scores_tied" in text
    text = inspect(critic_rm_run, dropped="scores_tied", limit=2)
    count = manifest["rows"][2]["drop_reasons"]["scores_tied"]
    assert text.startswith(f"{count} rows dropped with reason 'scores_tied': stage 2 (consistency) {count}")
    assert text.count("dropped: scores_tied") == 2 and f"... {count - 2} more" in text
    # A substring finds the load stage's long reason; the raw input row is shown field by field.
    text = inspect(critic_rm_run, dropped="transcripts differ")
    assert "stage 0 (load), dropped" in text and "input file row:" in text and "  chosen:" in text
    with pytest.raises(RunError, match="(?s)drop reasons in this run are:\n.*2 consistency: scores_contradict_label"):
        inspect(critic_rm_run, dropped="no_such_reason")
    with pytest.raises(RunError, match="no row 'ffffffffffffffff'"):
        inspect(critic_rm_run, row_id="ffffffffffffffff")
    with pytest.raises(RunError, match="no stage 'judge'.*0 \\(load\\)"):
        inspect(critic_rm_run, stage="judge")


def test_inspect_stage_overview(critic_rm_run):
    consistency = json.loads((critic_rm_run / "manifest.json").read_text())["rows"][2]
    text = inspect(critic_rm_run, stage=2, limit=2, width=100)
    assert text.startswith(f"stage 2 (consistency): {consistency['out']} rows kept, {consistency['dropped']} dropped")
    assert f"dropped {consistency['drop_reasons']['scores_contradict_label']}: scores_contradict_label" in text
    assert inspect(critic_rm_run, stage="02-consistency", limit=2, width=100) == text
    assert text.count("| stage 2 (consistency), kept |") == 2 and "--limit N shows more" in text


# -- in a real browser ----------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                  "--disable-default-apps", "--hide-scrollbars"]
# Chromium's own services (update checks, sign-in) call home whatever the flags; they bypass the counting proxy
# and resolve to nothing, so that the proxy sees exactly the requests the page makes.
BROWSER_SERVICES = "update.googleapis.com;accounts.google.com;clients2.google.com"
PROBE = """<script>window.addEventListener("load", function () {
  var images = [].slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var fetched = performance.getEntriesByType("resource").map(function (e) { return e.name; });
  document.title = "PROBE " + JSON.stringify({rendered: ok, images: images.length, fetched: fetched});
});</script>"""


class CountingProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy that answers 502 to everything and remembers what was asked."""

    daemon_threads = True

    def __init__(self):
        self.requests: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def handle_one(self):
                proxy.requests.append(f"{self.command} {self.path}")
                self.send_response(502)
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_CONNECT = do_PUT = do_OPTIONS = handle_one

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (Debian) for the browser test")
    proxy = CountingProxy()
    try:
        profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
        result = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--proxy-server=http://127.0.0.1:{proxy.server_address[1]}", f"--proxy-bypass-list={BROWSER_SERVICES}",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *args],
            capture_output=True, text=True, timeout=120)
    finally:
        proxy.shutdown()
        proxy.server_close()
    result.proxied = proxy.requests
    return result


def probe(tmp_path: Path, html: str, name: str) -> tuple[dict, list[str]]:
    page = tmp_path / name
    page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    title = re.search(r"<title>PROBE (.*?)</title>", result.stdout)
    assert title, result.stderr[-2000:]
    return json.loads(title.group(1).replace("&quot;", '"')), result.proxied


@pytest.mark.slow
def test_report_loads_from_disk_without_network_and_every_image_renders(critic_rm_run, mixed_run, tmp_path):
    # The check can fail: a page with an external image and style sheet is seen by both probes.
    control, proxied = probe(tmp_path, '<html><head><link rel=stylesheet href="http://example.com/a.css"></head>'
                                       '<body><img src="https://example.com/x.png"></body></html>', "control.html")
    assert control["rendered"] == 0 and len(control["fetched"]) == 2
    assert "GET http://example.com/a.css" in proxied and "CONNECT example.com:443" in proxied
    for run_dir, images in ((critic_rm_run, 5), (mixed_run, 7)):
        html = write_report(run_dir).read_text(encoding="utf-8")
        seen, proxied = probe(tmp_path, html, f"{run_dir.parent.name}.html")
        assert seen == {"rendered": images, "images": images, "fetched": []}
        assert proxied == []
    # A screenshot of the page as a person sees it: it must show the plots (many colours), not a blank page.
    shot = tmp_path / "report.png"
    result = chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}",
                      (critic_rm_run / "report" / "index.html").as_uri())
    assert shot.exists(), result.stderr[-2000:]
    assert result.proxied == []
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 200
