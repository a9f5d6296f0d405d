"""A known API key goes to the server and nowhere else: not into outputs, logs, manifest or cache."""

import json

from selfalign.cli import main
from tests.support.fake_openai_server import FakeOpenAIServer

SECRET = "sk-selfalign-test-4f9c2e7a1b"


def test_api_key_never_lands_in_any_file_or_log(write_pipeline, hh_data, tmp_path, monkeypatch, capsys):
    server = FakeOpenAIServer().start()
    try:
        monkeypatch.setenv("SELFALIGN_TEST_KEY", SECRET)
        path = write_pipeline(f"""\
schema_version: 1
name: secrets
models:
  critic: {{backend: openai, base_url: '{server.url}', model: m, api_key_env: SELFALIGN_TEST_KEY}}
stages:
  - {{kind: load, path: {hh_data}, format: hh-rlhf, on_bad_row: drop}}
  - {{kind: critique, model: critic, samples: 2}}
  - {{kind: consistency}}
  - {{kind: export, formats: [trl, critic-rm]}}
""")
        run_dir = tmp_path / "run"
        assert main(["run", str(path), "--output", str(run_dir), "--limit", "20"]) == 0
        assert main(["report", str(run_dir)]) == 0
    finally:
        server.stop()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["model_calls"]["sent"] > 0
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(written) > 10
    for file in written:
        assert SECRET.encode() not in file.read_bytes(), f"the API key leaked into {file}"
    out = capsys.readouterr()
    assert SECRET not in out.out and SECRET not in out.err


def test_missing_key_variable_is_a_clear_error(write_pipeline, hh_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SELFALIGN_TEST_KEY", raising=False)
    path = write_pipeline(f"""\
schema_version: 1
name: secrets
models:
  critic: {{backend: openai, base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: SELFALIGN_TEST_KEY}}
stages:
  - {{kind: load, path: {hh_data}, format: hh-rlhf, on_bad_row: drop}}
  - {{kind: critique, model: critic, samples: 1}}
""")
    assert main(["run", str(path), "--output", str(tmp_path / "run"), "--limit", "2"]) == 2
    assert "environment variable SELFALIGN_TEST_KEY is not set" in capsys.readouterr().err
