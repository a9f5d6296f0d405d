"""Every kind of bad input through `selfalign run`: exit 2, an error that names the place, nothing written.

One case per line: (pipeline edit, data file content, what the error must say). The place is `FILE:LINE`
for the pipeline, `file, row N, column 'C'` for data and `--set PATH=VALUE` for an override. The data is
written to the file the pipeline's `path:` names; every case also finds FIXTURES in its directory.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from selfalign.cli import main
from tests.support.fake_pipeline import CRITIQUE_CONSISTENCY_EXPORT, fake_pipeline_yaml

# One option a line: line 4 is the model, 6-8 stage 0 (load), 9-11 stage 1 (critique, `samples: 2` on 11).
PIPELINE = fake_pipeline_yaml("bad", [{"kind": "load", "path": "data.jsonl", "format": "trl"},
                                      *CRITIQUE_CONSISTENCY_EXPORT])
GOOD_ROW = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
HH_NO_ASSISTANT = json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hello"}) + "\n"

GZ_ROWS = gzip.compress(GOOD_ROW.encode() * 3)
GZ_BAD_CRC = GZ_ROWS[:-8] + bytes([GZ_ROWS[-8] ^ 0xFF]) + GZ_ROWS[-7:]  # the trailer's checksum, one byte off
OPENAI = "  critic: {backend: openai, base_url: '%s', model: m}"

CASES = [  # (id, (old, new) in the pipeline or None, data bytes, expected fragment; {p} is the pipeline path)
    ("malformed_yaml", ("    samples: 2", "    samples: [2"), GOOD_ROW, "{p}:12: malformed YAML"),
    ("unknown_key", ("    samples: 2", "    sampels: 2"), GOOD_ROW, "{p}:11: stage 1 (critique): sampels: unknown key; did you mean 'samples'?"),
    ("wrong_type", ("    samples: 2", "    samples: many"), GOOD_ROW, "{p}:11: stage 1 (critique): samples: Input should be a valid integer"),
    ("missing_prompt_file", ("    samples: 2", "    samples: 2\n    prompt: prompts/none.jinja"), GOOD_ROW, "{p}:12: stage 1 (critique): prompt: prompt file 'prompts/none.jinja' not found"),
    ("template_variable", ("    samples: 2", "    samples: 2\n    prompt: bad.jinja"), GOOD_ROW, "{p}:12: stage 1 (critique): prompt: template bad.jinja uses reference_answer, which this stage does not provide"),
    ("undefined_model", ("    model: critic", "    model: critc"), GOOD_ROW, "{p}:10: stage 1 (critique): model: model 'critc' is not defined under models:; did you mean 'critic'?"),
    ("column_no_stage_makes", ("  - kind: consistency\n", "  - kind: filter\n    where: \"judge_verdict = 'A'\"\n"), GOOD_ROW, "{p}:13: stage 2 (filter): where: needs column(s) judge_verdict, which no earlier stage makes"),
    ("missing_column", None, json.dumps({"prompt": "q", "chosen": "a"}) + "\n", "data.jsonl, row 1, column 'rejected': missing column"),
    ("null_value", None, GOOD_ROW + json.dumps({"prompt": "q", "chosen": None, "rejected": "b"}) + "\n", "data.jsonl, row 2, column 'chosen': is null"),
    ("wrong_value_type", None, json.dumps({"prompt": "q", "chosen": 5, "rejected": "b"}) + "\n", "data.jsonl, row 1, column 'chosen': expected a non-empty list"),
    ("empty_file", None, "", "data.jsonl: has no rows"),
    ("non_utf8", None, GOOD_ROW.encode() + b'{"prompt": "\xff\xfe"}\n', "data.jsonl, row 2: not UTF-8"),
    ("ten_megabyte_row", None, json.dumps({"prompt": "q", "chosen": "a" * 10_000_000, "rejected": "b"}) + "\n", "data.jsonl, row 1, column 'chosen': 10,000,000 characters, over max_chars"),
    # Security: the YAML cannot build Python objects; a template cannot reach Python internals.
    ("yaml_python_tag", ("name: bad", "name: !!python/object/apply:os.system [\"touch pwned\"]"), GOOD_ROW, "{p}:2: malformed YAML: could not determine a constructor for the tag"),
    ("template_dunder", ("    samples: 2", "    samples: 2\n    prompt: dunder.jinja"), GOOD_ROW, "dunder.jinja:1: the template reaches for '__subclasses__'"),
    ("template_attr_filter", ("    samples: 2", "    samples: 2\n    prompt: attr.jinja"), GOOD_ROW, "attr.jinja: the sandbox refused the template: access to attribute '__class__'"),
    ("hh_without_assistant", ("format: trl", "format: hh-rlhf"), HH_NO_ASSISTANT, "data.jsonl, row 1, column 'chosen': transcript has no final Assistant turn"),
    # The pipeline file's structure: a repeated key, a boolean for a number, an empty or non-mapping file.
    ("duplicate_key", ("    samples: 2", "    samples: 2\n    samples: 3"), GOOD_ROW, "{p}:12: stages.1.samples: duplicate key 'samples' (also at line 11)"),
    ("duplicate_model", ("  critic: {backend: fake}", "  critic: {backend: fake}\n  critic: {backend: fake, latency_s: 1}"), GOOD_ROW, "{p}:5: models.critic: duplicate key 'critic' (also at line 4); the second would silently replace the first: keep one (two models cannot share a name)"),
    ("duplicate_top_level_key", ("name: bad", "name: bad\nname: other"), GOOD_ROW, "{p}:3: name: duplicate key 'name' (also at line 2)"),
    ("bool_for_int", ("    samples: 2", "    samples: true"), GOOD_ROW, "{p}:11: stage 1 (critique): samples: expected a number, got a boolean"),
    ("yes_for_int", ("    samples: 2", "    samples: yes"), GOOD_ROW, "{p}:11: stage 1 (critique): samples: expected a number, got a boolean"),
    ("bool_in_int_pair", ("    samples: 2", "    samples: 2\n    score_range: [true, 10]"), GOOD_ROW, "{p}:12: stage 1 (critique): score_range: expected a number, got a boolean"),
    ("bool_for_float", ("    samples: 2", "    samples: 2\n    sampling: {temperature: on}"), GOOD_ROW, "{p}:12: stage 1 (critique): sampling.temperature: expected a number, got a boolean"),
    ("bool_for_model_number", ("  critic: {backend: fake}", "  critic: {backend: fake, latency_s: true}"), GOOD_ROW, "{p}:4: models.critic.latency_s: expected a number, got a boolean"),
    ("bool_for_schema_version", ("schema_version: 1", "schema_version: true"), GOOD_ROW, "{p}:1: schema_version: expected a number, got a boolean"),
    ("negative_samples", ("    samples: 2", "    samples: -1"), GOOD_ROW, "{p}:11: stage 1 (critique): samples: Input should be greater than or equal to 1"),
    ("empty_pipeline", (PIPELINE, ""), GOOD_ROW, "{p}:1: is empty; a pipeline file is a mapping with schema_version, name, models, stages"),
    ("pipeline_is_a_list", (PIPELINE, "- kind: load\n"), GOOD_ROW, "{p}:1: holds a list; a pipeline file is a mapping"),
    # Stage order: export writes the run's result, so it is last (publish aside) and there is one.
    ("export_before_a_stage", ("  - kind: consistency\n  - kind: export\n", "  - kind: export\n  - kind: consistency\n"), GOOD_ROW, "{p}:12: stage 2 (export): kind: export comes before stage 3 (consistency), so the exported dataset would not hold their result; move the export to the end"),
    ("second_export", ("  - kind: export\n", "  - kind: export\n  - kind: export\n    formats: [openrlhf]\n"), GOOD_ROW, "{p}:14: stage 4 (export): kind: a second export: it would replace dataset/ (and export/<format>/) written by stage 3 (export)"),
    # Models: a URL the client cannot use fails before any call.
    ("base_url_without_scheme", ("  critic: {backend: fake}", OPENAI % "127.0.0.1:8000/v1"), GOOD_ROW, "{p}:4: models.critic.base_url: Value error, '127.0.0.1:8000/v1' is not an http(s) URL; write the scheme, e.g. http://127.0.0.1:8000/v1"),
    ("base_url_host_only", ("  critic: {backend: fake}", OPENAI % "localhost:8000/v1"), GOOD_ROW, "{p}:4: models.critic.base_url: Value error, 'localhost:8000/v1' is not an http(s) URL; write the scheme, e.g. http://localhost:8000/v1"),
    ("base_url_is_the_endpoint", ("  critic: {backend: fake}", OPENAI % "http://h:8000/v1/chat/completions"), GOOD_ROW, "{p}:4: models.critic.base_url: Value error, 'http://h:8000/v1/chat/completions' is an endpoint; base_url is the API root that the client adds /chat/completions to: write http://h:8000/v1"),
    # Paths that are not a readable file of the kind named.
    ("prompt_is_a_directory", ("    samples: 2", "    samples: 2\n    prompt: rows"), GOOD_ROW, "{p}:12: stage 1 (critique): prompt: prompt 'rows' is a directory"),
    ("data_path_missing", ("path: data.jsonl", "path: nothing.jsonl"), None, "nothing.jsonl: file not found; fix `path:`"),
    ("data_path_is_a_directory", ("path: data.jsonl", "path: rows"), None, "rows: is a directory, not a file; point `path:` at a .jsonl, .jsonl.gz, .json, .parquet or .csv file in it"),
    ("data_path_symlink_loop", ("path: data.jsonl", "path: loop.jsonl"), None, "loop.jsonl: file not found (a symbolic link to a missing file, or a loop of links)"),
    ("data_unknown_type", ("path: data.jsonl", "path: data.txt"), GOOD_ROW, "data.txt: unknown file type; use .jsonl, .jsonl.gz, .json, .parquet or .csv"),
    # Compression and encoding: bytes that do not match the file's name.
    ("gz_that_is_not_gzip", ("path: data.jsonl", "path: data.jsonl.gz"), GOOD_ROW, "data.jsonl.gz: is not gzip-compressed (it may be plain text); rename it to what it is (e.g. .jsonl) or compress it with gzip"),
    ("gz_that_is_zstd", ("path: data.jsonl", "path: data.jsonl.gz"), b"\x28\xb5\x2f\xfd" + bytes(20), "data.jsonl.gz: is not gzip-compressed (it is zstd-compressed)"),
    ("gz_truncated", ("path: data.jsonl", "path: data.jsonl.gz"), GZ_ROWS[:len(GZ_ROWS) // 2], "data.jsonl.gz, row 1: the gzip data ends early: the file is truncated (an interrupted download or copy?); download or compress it again"),
    ("gz_bad_checksum", ("path: data.jsonl", "path: data.jsonl.gz"), GZ_BAD_CRC, "data.jsonl.gz, row 4: damaged gzip data (CRC check failed"),
    ("gz_not_utf8_inside", ("path: data.jsonl", "path: data.jsonl.gz"), gzip.compress(b'{"prompt": "\xff"}\n'), "data.jsonl.gz, row 1: not UTF-8"),
    ("gzip_bytes_in_jsonl", None, GZ_ROWS, "data.jsonl: is gzip-compressed, not the text its name (.jsonl) says; rename it to data.jsonl.gz (gzip is read directly) or decompress it"),
    ("zstd_bytes_in_jsonl", None, b"\x28\xb5\x2f\xfd" + bytes(20), "data.jsonl: is zstd-compressed, not the text its name (.jsonl) says; decompress it"),
    ("bzip2_bytes_in_jsonl", None, b"BZh91AY&SY" + bytes(20), "data.jsonl: is bzip2-compressed, not the text"),
    ("zip_in_json", ("path: data.jsonl", "path: data.json"), b"PK\x03\x04" + bytes(20), "data.json: is a zip archive, not the text its name (.json) says; decompress it"),
    ("parquet_bytes_in_jsonl", None, b"PAR1" + bytes(20), "data.jsonl: is a parquet file, not the text its name (.jsonl) says; rename it to data.parquet"),
    ("utf16_jsonl", None, GOOD_ROW.encode("utf-16"), "data.jsonl: is UTF-16 text, not the text its name (.jsonl) says; re-encode it as UTF-8"),
    ("parquet_that_is_text", ("path: data.jsonl", "path: data.parquet"), GOOD_ROW, "data.parquet: is not a parquet file (it may be plain text)"),
    ("parquet_empty", ("path: data.jsonl", "path: data.parquet"), b"", "data.parquet: is not a parquet file (it is empty)"),
    ("json_not_a_list", ("path: data.jsonl", "path: data.json"), GOOD_ROW, "data.json: a .json file must hold a list of objects, this one holds a dict"),
    ("json_list_of_numbers", ("path: data.jsonl", "path: data.json"), "[1, 2]", "data.json, row 1: expected a JSON object, got int"),
    ("json_invalid", ("path: data.jsonl", "path: data.json"), "[{\"prompt\": }]", "data.json: invalid JSON (Expecting value at line 1, column 13)"),
    ("json_not_utf8", ("path: data.jsonl", "path: data.json"), b'[{"prompt": "\xff"}]', "data.json: not UTF-8"),
    ("jsonl_line_not_an_object", None, GOOD_ROW + "[1, 2]\n", "data.jsonl, row 2: expected a JSON object per line, got list"),
]


# Command-line mistakes: --set, --limit, the pipeline path. (id, pipeline edit or None, argv, expected fragment);
# {p} is the pipeline path, {d} the case's directory.
ARGV_CASES = [
    ("set_wrong_type", None, ["run", "{p}", "--set", "stages.1.samples=many"], "error: --set stages.1.samples=many: stage 1 (critique): samples: Input should be a valid integer"),
    ("set_bool_for_int", None, ["run", "{p}", "--set", "stages.1.samples=true"], "--set stages.1.samples=true: stage 1 (critique): samples: expected a number, got a boolean"),
    ("set_unknown_key", None, ["run", "{p}", "--set", "stages.1.sampels=3"], "--set stages.1.sampels=3: stage 1 (critique): sampels: unknown key; did you mean 'samples'?"),
    ("set_unknown_backend", None, ["run", "{p}", "--set", "models.critic.backend=opena"], "--set models.critic.backend=opena: models.critic.backend: unknown backend 'opena'; did you mean 'openai'?"),
    ("set_undefined_model", None, ["run", "{p}", "--set", "models.critc.latency_s=1"], "--set models.critc.latency_s=1: model 'critc' is not defined under models:; did you mean 'critic'? (defined: critic); to add a model set it whole"),
    ("set_stage_model_undefined", None, ["run", "{p}", "--set", "stages.1.model=critc"], "--set stages.1.model=critc: stage 1 (critique): model: model 'critc' is not defined under models:; did you mean 'critic'?"),
    ("set_export_first", None, ["run", "{p}", "--set", "stages.1={kind: export}"], "--set stages.1={kind: export}: stage 1 (export): kind: export comes before stage 2 (consistency), so the exported dataset"),
    ("set_api_key_is_hidden", None, ["run", "{p}", "--set", "models.critic.api_key=sk-secret-1"], "--set models.critic.api_key=***: models.critic.api_key: a literal API key is refused"),
    ("set_base_url_without_scheme", None, ["validate", "{p}", "--set", "models.critic={backend: openai, base_url: 'localhost:8000/v1', model: m}"], "--set models.critic={backend: openai, base_url: 'localhost:8000/v1', model: m}: models.critic.base_url: Value error, 'localhost:8000/v1' is not an http(s) URL"),
    ("set_without_equals", None, ["run", "{p}", "--set", "stages.1.samples"], "error: --set stages.1.samples: no '=' in it; write --set PATH=VALUE, e.g. --set stages.1.samples=4"),
    ("set_empty_path", None, ["run", "{p}", "--set", "=3"], "error: --set =3: '' is not a dotted path (empty part)"),
    ("set_index_out_of_range", None, ["run", "{p}", "--set", "stages.9.samples=2"], "error: --set stages.9.samples=2: '9' is not an index of stages, a list of 4 items (use 0 to 3; stage numbers start at 0)"),
    ("set_negative_index", None, ["run", "{p}", "--set", "stages.-1.samples=2"], "error: --set stages.-1.samples=2: '-1' is not an index of stages"),
    ("set_into_a_scalar", None, ["run", "{p}", "--set", "name.x=1"], "error: --set name.x=1: name is the str 'bad', not a mapping, so it has no 'x'"),
    ("set_value_not_yaml", None, ["run", "{p}", "--set", "stages.1.samples=[2"], "error: --set stages.1.samples=[2: the value is not valid YAML"),
    ("set_value_python_tag", None, ["run", "{p}", "--set", "name=!!python/object/apply:os.system [ls]"], "--set name=!!python/object/apply:os.system [ls]: the value is not valid YAML (could not determine a constructor"),
    ("validate_base_url_without_scheme", ("  critic: {backend: fake}", OPENAI % "127.0.0.1:8000/v1"), ["validate", "{p}"], "{p}:4: models.critic.base_url: Value error, '127.0.0.1:8000/v1' is not an http(s) URL; write the scheme, e.g. http://127.0.0.1:8000/v1"),
    ("validate_duplicate_key", ("    samples: 2", "    samples: 2\n    samples: 3"), ["validate", "{p}"], "{p}:12: stages.1.samples: duplicate key 'samples' (also at line 11)"),
    ("validate_second_export", ("  - kind: export\n", "  - kind: export\n  - kind: export\n"), ["validate", "{p}"], "{p}:14: stage 4 (export): kind: a second export"),
    ("limit_zero", None, ["run", "{p}", "--limit", "0"], "argument --limit: must be a whole number, 1 or more, got '0'"),
    ("limit_negative", None, ["run", "{p}", "--limit", "-1"], "argument --limit: must be a whole number, 1 or more, got '-1'"),
    ("limit_not_a_number", None, ["run", "{p}", "--limit", "ten"], "argument --limit: must be a whole number, 1 or more, got 'ten'"),
    ("pipeline_missing", None, ["run", "{d}/nothing.yaml"], "error: {d}/nothing.yaml: file not found; check the path"),
    ("pipeline_is_a_directory", None, ["run", "{d}"], "error: {d}: is a directory; pass the pipeline's YAML file"),
    ("pipeline_symlink_loop", None, ["validate", "{d}/loop.yaml"], "error: {d}/loop.yaml: is a loop of symbolic links; point at the pipeline's real file"),
    ("pipeline_not_utf8", (PIPELINE, "name: caf\xe9\n"), ["run", "{p}"], "{p}: not UTF-8 text"),
]

# In every case's directory: templates some cases name, a directory, and links that go nowhere.
FIXTURES = {
    "bad.jinja": "{% block user %}{{ response }} {{ reference_answer }}{% endblock %}",
    "dunder.jinja": "{% block user %}{{ response.__class__.__mro__[1].__subclasses__() }}{% endblock %}",
    "attr.jinja": '{% block user %}{{ response|attr("__class__") }}{% endblock %}',
}
LINKS = {"loop.jsonl": "loop.jsonl", "loop.yaml": "loop.yaml"}  # each a link to itself


def prepare(tmp_path: Path, edit, data) -> Path:
    """The case's directory: the (edited) pipeline, its data file, FIXTURES; returns the pipeline's path."""
    text = PIPELINE
    if edit is not None:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1])
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_bytes(text.encode("latin-1" if "\xe9" in text else "utf-8"))
    source = re.search(r"path: (\S+)", text)
    if data is not None and source:
        (tmp_path / source.group(1)).write_bytes(data.encode() if isinstance(data, str) else data)
    for name, content in FIXTURES.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "rows").mkdir()
    for name, target in LINKS.items():
        (tmp_path / name).symlink_to(target)
    return pipeline


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse refuses an argument by exiting (status 2)
        return exc.code


@pytest.mark.parametrize("edit, data, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_the_place_and_writes_nothing(edit, data, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pipeline = prepare(tmp_path, edit, data)
    before = listing(tmp_path)

    assert main(["run", str(pipeline)]) == 2
    error = capsys.readouterr().err
    assert expected.format(p=pipeline) in error, error
    assert "Traceback" not in error
    assert listing(tmp_path) == before, "a failed run left files behind"


@pytest.mark.parametrize("edit, argv, expected", [c[1:] for c in ARGV_CASES], ids=[c[0] for c in ARGV_CASES])
def test_bad_command_line_exits_2_names_the_argument_and_writes_nothing(edit, argv, expected, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    pipeline = prepare(tmp_path, edit, GOOD_ROW)
    before = listing(tmp_path)

    def fill(text: str) -> str:  # not str.format: a --set value may hold YAML braces
        return text.replace("{p}", str(pipeline)).replace("{d}", str(tmp_path))

    assert exit_status([fill(arg) for arg in argv]) == 2
    error = capsys.readouterr().err
    assert fill(expected) in error, error
    assert "Traceback" not in error and "sk-secret-1" not in error
    assert listing(tmp_path) == before, "a failed run left files behind"


# What the checks above must not refuse: a UTF-8 byte-order mark (Windows editors write one; the text is UTF-8
# all the same) and a gzip-compressed .csv (polars decompresses it).
GOOD_INPUTS = [
    ("jsonl_with_bom", "data.jsonl", b"\xef\xbb\xbf" + GOOD_ROW.encode()),
    ("json_with_bom", "data.json", b"\xef\xbb\xbf[" + GOOD_ROW.strip().encode() + b"]"),
    ("jsonl_gz", "data.jsonl.gz", GZ_ROWS),
    ("csv_gzip", "data.csv", gzip.compress(b"prompt,chosen,rejected\nq,a,b\n")),
]


@pytest.mark.parametrize("name, data", [c[1:] for c in GOOD_INPUTS], ids=[c[0] for c in GOOD_INPUTS])
def test_inputs_that_look_odd_but_are_fine_are_read(name, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pipeline = prepare(tmp_path, ("path: data.jsonl", f"path: {name}"), data)
    assert main(["run", str(pipeline), "--quiet"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "outputs" / "bad" / "manifest.json").read_text())["rows"][0]["out"] == 1


def test_quiet_prints_nothing_but_errors(tmp_path, monkeypatch, capfd):
    # The quickstart with a fake model: every stage, the export and its `datasets` save, in silence.
    monkeypatch.chdir(tmp_path)
    quickstart = Path(__file__).resolve().parent.parent / "pipelines" / "quickstart.yaml"
    argv = ["run", str(quickstart), "--set", "models.critic.backend=fake", "--output", str(tmp_path / "run")]
    assert main(argv + ["--quiet"]) == 0
    out = capfd.readouterr()
    assert (out.out, out.err) == ("", "")
    assert (tmp_path / "run" / "dataset").is_dir()
    # ... and an error still prints.
    assert main(argv + ["--quiet", "--set", "stages.1.samples=0"]) == 2
    assert "--set stages.1.samples=0: stage 1 (critique): samples: Input should be greater than or equal to 1" in \
        capfd.readouterr().err
