"""Round-trip tests for tests/support/fake_hub.py, driven by the official clients.

The push and the download each run in a *fresh* Python process whose environment points
HF_ENDPOINT at the FakeHub (that is the most faithful setup: huggingface_hub and datasets read
HF_ENDPOINT at import time). One test also checks the in-process patching helper.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

# Imported at module level on purpose: test_in_process_clients proves that the clients can be
# redirected *after* import (their endpoint constants are frozen at import time).
datasets = pytest.importorskip("datasets")
huggingface_hub = pytest.importorskip("huggingface_hub")

try:
    from tests.support.fake_hub import (  # noqa: F401  (fixtures are used by name)
        FakeHub,
        fake_hub,
        hub_clients,
        subprocess_env,
    )
except ImportError:  # tests/ is not a package on sys.path (e.g. pytest run from another directory)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.fake_hub import (  # noqa: F401
        FakeHub,
        fake_hub,
        hub_clients,
        subprocess_env,
    )

TOKEN = "hf_test_roundtrip_token_abcdef"
REPO = "test-user/selfalign-prefs"

# 1x1 transparent PNG
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)

TRL_TRAIN = {
    "prompt": ["What is 2+2?", "Name a colour."],
    "chosen": ["4", "Blue"],
    "rejected": ["5", "Loud"],
}
TRL_TEST = {"prompt": ["Capital of France?"], "chosen": ["Paris"], "rejected": ["Lyon"]}
OPENRLHF_TRAIN = {
    "prompt": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "bye"}]],
    "chosen": [[{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "see you"}]],
    "rejected": [[{"role": "assistant", "content": "go away"}], [{"role": "assistant", "content": "no"}]],
}
OPENRLHF_TEST = {
    "prompt": [[{"role": "user", "content": "2+2?"}]],
    "chosen": [[{"role": "assistant", "content": "4"}]],
    "rejected": [[{"role": "assistant", "content": "22"}]],
}


def run_client(script: str, hub: FakeHub, hf_home: Path, token: str | None = TOKEN, **extra_env: str) -> dict:
    """Run `script` in a fresh interpreter pointed at `hub`; the script prints one JSON line last."""
    env = subprocess_env(hub.url, hf_home=hf_home, token=token)
    env["HF_HUB_OFFLINE"] = "0"
    env.update(extra_env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"client script failed ({proc.returncode})\n--- stdout\n{proc.stdout[-3000:]}\n"
        f"--- stderr\n{proc.stderr[-6000:]}\n--- unhandled: {[(r.method, r.path) for r in hub.unhandled]}"
        f"\n--- problems: {hub.problems}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


PUSH_SCRIPT = f"""
    import json, os
    from huggingface_hub import HfApi, DatasetCard
    from datasets import Dataset, DatasetDict

    token = os.environ["HF_TOKEN"]
    api = HfApi(token=token)
    url = api.create_repo({REPO!r}, repo_type="dataset", private=True)

    trl = DatasetDict({{"train": Dataset.from_dict({TRL_TRAIN!r}), "test": Dataset.from_dict({TRL_TEST!r})}})
    orl = DatasetDict({{"train": Dataset.from_dict({OPENRLHF_TRAIN!r}), "test": Dataset.from_dict({OPENRLHF_TEST!r})}})
    trl.push_to_hub({REPO!r}, config_name="trl", private=True, token=token)
    orl.push_to_hub({REPO!r}, config_name="openrlhf", private=True, token=token)

    # Enrich the card written by datasets (it holds the `configs:` metadata load_dataset needs).
    card = DatasetCard.load({REPO!r}, repo_type="dataset", token=token)
    card.data.license = "apache-2.0"
    card.data.tags = ["selfalign", "dpo"]
    card.data.pretty_name = "selfalign test prefs"
    card.text = "# selfalign test prefs\\n\\n![preview](assets/preview.png)\\n"
    folder = os.path.join(os.environ["HF_HOME"], "upload")
    os.makedirs(os.path.join(folder, "assets"), exist_ok=True)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(str(card))
    with open(os.path.join(folder, "assets", "preview.png"), "wb") as f:
        f.write(bytes.fromhex({PNG.hex()!r}))
    api.upload_folder(repo_id={REPO!r}, repo_type="dataset", folder_path=folder, commit_message="Add card and preview")

    print(json.dumps({{"url": str(url), "files": sorted(api.list_repo_files({REPO!r}, repo_type="dataset"))}}))
"""

LOAD_SCRIPT = f"""
    import json, os
    assert "HF_HUB_OFFLINE" not in os.environ or os.environ["HF_HUB_OFFLINE"] in ("0", "")
    from huggingface_hub import HfApi, DatasetCard, hf_hub_download
    from datasets import load_dataset

    out = {{}}
    for config in ("trl", "openrlhf"):
        ds = load_dataset({REPO!r}, config)
        out[config] = {{split: ds[split].to_dict() for split in ds}}
    card = DatasetCard.load({REPO!r}, repo_type="dataset")
    out["card"] = card.data.to_dict()
    png_path = hf_hub_download({REPO!r}, "assets/preview.png", repo_type="dataset")
    out["png"] = open(png_path, "rb").read().hex()
    info = HfApi().repo_info({REPO!r}, repo_type="dataset")
    out["private"] = info.private
    out["sha"] = info.sha
    out["files"] = sorted(HfApi().list_repo_files({REPO!r}, repo_type="dataset"))
    print(json.dumps(out))
"""


def test_push_and_load_round_trip(tmp_path: Path) -> None:
    with FakeHub(token=TOKEN) as hub:
        pushed = run_client(PUSH_SCRIPT, hub, tmp_path / "push_home")

        # --- what arrived on the server
        repo = hub.repos[REPO]
        assert repo["type"] == "dataset"
        assert repo["private"] is True
        files = repo["files"]
        expected_data = {
            f"{config}/{split}-00000-of-00001.parquet" for config in ("trl", "openrlhf") for split in ("train", "test")
        }
        assert expected_data <= set(files)
        assert set(pushed["files"]) == set(files)
        assert pushed["url"].endswith(f"/datasets/{REPO}")
        assert files["assets/preview.png"] == PNG
        # parquet and png went through LFS (basic transfer), README is a regular git blob
        assert expected_data | {"assets/preview.png"} <= repo["lfs_files"]
        assert "README.md" not in repo["lfs_files"]
        readme = files["README.md"].decode()
        assert "config_name: trl" in readme and "config_name: openrlhf" in readme
        assert "license: apache-2.0" in readme
        assert len(hub.requests_to("lfs-upload")) == 5  # 4 parquet shards + 1 png
        assert all(r.status == 200 for r in hub.requests_to("lfs-verify"))

        # every write request carried the right token
        writes = [r for r in hub.requests if r.route in ("create-repo", "preupload", "commit", "lfs-batch")]
        assert writes and all(r.auth == "valid" for r in writes)
        # the LFS PUT goes to the pre-signed-style href, without Authorization (like S3)
        assert all(r.auth == "missing" for r in hub.requests_to("lfs-upload"))
        # the token value itself is never stored
        assert all(r.headers.get("authorization") in (None, "<redacted>") for r in hub.requests)
        assert hub.unhandled == [], [(r.method, r.path) for r in hub.unhandled]
        assert hub.problems == []

        # --- read back in a fresh process with its own empty HF_HOME
        n_before = len(hub.requests)
        loaded = run_client(LOAD_SCRIPT, hub, tmp_path / "load_home")
        assert loaded["trl"] == {"train": TRL_TRAIN, "test": TRL_TEST}
        assert loaded["openrlhf"] == {"train": OPENRLHF_TRAIN, "test": OPENRLHF_TEST}
        assert loaded["card"]["license"] == "apache-2.0"
        assert loaded["card"]["tags"] == ["selfalign", "dpo"]
        assert {c["config_name"] for c in loaded["card"]["configs"]} == {"trl", "openrlhf"}
        assert bytes.fromhex(loaded["png"]) == PNG
        assert loaded["private"] is True
        assert loaded["sha"] == repo["sha"]
        assert loaded["files"] == sorted(files)
        reads = hub.requests[n_before:]
        assert any(r.route == "resolve" and r.path.endswith(".parquet") for r in reads)
        assert all(r.auth == "valid" for r in reads)
        assert hub.unhandled == [] and hub.problems == []

        # --- anonymous clients cannot see the private repo
        anon = run_client(
            f"""
            import json
            from huggingface_hub import HfApi
            from huggingface_hub.errors import RepositoryNotFoundError
            try:
                HfApi(token=False).repo_info({REPO!r}, repo_type="dataset")
                print(json.dumps({{"visible": True}}))
            except RepositoryNotFoundError:
                print(json.dumps({{"visible": False}}))
            """,
            hub,
            tmp_path / "anon_home",
            token=None,
        )
        assert anon == {"visible": False}


def test_wrong_or_missing_token_is_rejected(hub_clients: FakeHub) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    hub = hub_clients
    good = HfApi(token=hub.token)
    good.create_repo("test-user/secret", repo_type="dataset", private=True)

    bad = HfApi(token="hf_wrong_token")
    with pytest.raises(HfHubHTTPError) as exc:
        bad.create_repo("test-user/other", repo_type="dataset", private=True)
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:
        bad.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="test-user/secret", repo_type="dataset")
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:
        bad.repo_info("test-user/secret", repo_type="dataset")
    assert exc.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).repo_info("test-user/secret", repo_type="dataset")

    # read-only token: may read, may not write
    ro = HfApi(token="hf_test_read_only")
    assert ro.repo_info("test-user/secret", repo_type="dataset").private is True
    with pytest.raises(HfHubHTTPError) as exc:
        ro.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="test-user/secret", repo_type="dataset")
    assert exc.value.response.status_code == 403

    # plain HTTP without any token on a write endpoint
    req = urllib.request.Request(
        hub.url + "/api/repos/create",
        data=json.dumps({"name": "x", "type": "dataset"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as http_exc:
        urllib.request.urlopen(req, timeout=10)
    assert http_exc.value.code == 401

    assert "test-user/other" not in hub.repos
    assert hub.repos["test-user/secret"]["files"].keys() == {".gitattributes"}
    assert [r.auth for r in hub.requests_to("create-repo")] == ["valid", "invalid", "missing"]
    assert not any(r.token_matched for r in hub.requests if r.auth == "invalid")


def test_in_process_clients(hub_clients: FakeHub, tmp_path: Path) -> None:
    """patch_hub_clients lets already-imported huggingface_hub/datasets talk to the fake."""
    from huggingface_hub import HfApi, hf_hub_download

    hub = hub_clients
    api = HfApi(token=hub.token)
    api.create_repo("test-user/inproc", repo_type="dataset", private=True)
    api.upload_file(path_or_fileobj=b"hello\n", path_in_repo="notes/hello.txt", repo_id="test-user/inproc",
                    repo_type="dataset")
    path = hf_hub_download("test-user/inproc", "notes/hello.txt", repo_type="dataset", token=hub.token)
    assert Path(path).read_bytes() == b"hello\n"
    assert str(tmp_path / "hf_home") in path  # the temp HF_HOME, not ~/.cache/huggingface

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(TRL_TRAIN)})
    dd.push_to_hub("test-user/inproc", config_name="trl", token=hub.token)
    back = datasets.load_dataset("test-user/inproc", "trl", token=hub.token)
    assert back["train"].to_dict() == TRL_TRAIN
    assert hub.unhandled == [] and hub.problems == []


def test_lfs_threshold_and_modes(tmp_path: Path) -> None:
    with FakeHub(token=TOKEN, lfs_threshold=1024) as hub:
        out = run_client(
            """
            import json
            from huggingface_hub import HfApi, CommitOperationAdd
            api = HfApi()
            api.create_repo("test-user/modes", repo_type="dataset")
            api.create_commit(
                "test-user/modes", repo_type="dataset", commit_message="mixed",
                operations=[
                    CommitOperationAdd("small.txt", b"small text"),
                    CommitOperationAdd("big.jsonl", b'{"a": 1}\\n' * 200),
                    CommitOperationAdd("blob.dat", bytes(range(256))),
                    CommitOperationAdd("empty.parquet", b""),
                ],
            )
            info = {f.path: bool(f.lfs) for f in api.list_repo_tree("test-user/modes", repo_type="dataset")}
            print(json.dumps(info))
            """,
            hub,
            tmp_path / "home",
        )
    assert out == {
        ".gitattributes": False,
        "small.txt": False,
        "big.jsonl": True,  # >= lfs_threshold
        "blob.dat": True,  # binary sample
        "empty.parquet": False,  # empty files are always regular (client-side rule)
    }
    assert hub.repos["test-user/modes"]["private"] is False
    assert len(hub.requests_to("lfs-upload")) == 2


def test_xet_is_not_emulated(tmp_path: Path) -> None:
    """Without HF_HUB_DISABLE_XET=1 the client (hf_xet installed) asks for a Xet token and fails fast."""
    with FakeHub(token=TOKEN) as hub:
        env = subprocess_env(hub.url, hf_home=tmp_path / "home", token=TOKEN)
        env.pop("HF_HUB_DISABLE_XET")
        script = textwrap.dedent(
            """
            from huggingface_hub import HfApi
            api = HfApi()
            api.create_repo("test-user/x", repo_type="dataset")
            api.upload_file(path_or_fileobj=bytes(range(256)), path_in_repo="a.bin",
                            repo_id="test-user/x", repo_type="dataset")
            """
        )
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    # find_spec, not import: importing hf_xet starts its logging under ~/.cache/huggingface/xet/logs
    if importlib.util.find_spec("hf_xet") is None:
        assert proc.returncode == 0, proc.stderr  # no hf_xet: the LFS path is used anyway
        return
    assert proc.returncode != 0
    assert "xet-write-token" in proc.stderr
    assert any("xet token requested" in p for p in hub.problems)


def test_fake_hub_basics() -> None:
    hub = FakeHub(token=TOKEN)
    url = hub.start()
    try:
        assert url == hub.url and url.startswith("http://127.0.0.1:")
        hub.add_repo("org/seeded", files={"data/x.txt": b"x", "img.png": PNG}, private=True)
        snap = hub.repos["org/seeded"]
        assert snap["private"] and snap["lfs_files"] == {"img.png"}
        assert hub.file("org/seeded", "data/x.txt") == b"x"
        req = urllib.request.Request(
            f"{url}/datasets/org/seeded/resolve/main/data/x.txt",
            headers={"Authorization": f"Bearer {TOKEN}", "Range": "bytes=0-0"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 206
            assert resp.headers["X-Repo-Commit"] == snap["sha"]
            assert resp.headers["Content-Range"] == "bytes 0-0/1"
            assert resp.read() == b"x"

        # raw LFS basic transfer: batch -> PUT (chunked body, no auth) -> verify
        data = os.urandom(3000)
        oid = hashlib.sha256(data).hexdigest()
        batch = urllib.request.Request(
            f"{url}/datasets/org/seeded.git/info/lfs/objects/batch",
            data=json.dumps({"operation": "upload", "transfers": ["basic"],
                             "objects": [{"oid": oid, "size": len(data)}]}).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/vnd.git-lfs+json"},
            method="POST",
        )
        with urllib.request.urlopen(batch, timeout=10) as resp:
            actions = json.load(resp)["objects"][0]["actions"]
        href = urllib.parse.urlsplit(actions["upload"]["href"])
        conn = http.client.HTTPConnection(href.hostname, href.port, timeout=10)
        conn.request("PUT", href.path, body=iter([data[:1000], data[1000:]]), encode_chunked=True)
        put = conn.getresponse()
        put.read()
        conn.close()
        assert put.status == 200
        verify = urllib.request.Request(
            actions["verify"]["href"],
            data=json.dumps({"oid": oid, "size": len(data)}).encode(),
            headers={"Authorization": f"Bearer {TOKEN}"},
            method="POST",
        )
        with urllib.request.urlopen(verify, timeout=10) as resp:
            assert resp.status == 200
        assert hub.requests_to("lfs-upload")[-1].headers.get("transfer-encoding") == "chunked"
    finally:
        hub.stop()
    assert os.environ.get("HF_ENDPOINT", "") != url


def test_failure_switch_makes_a_route_fail_until_cleared(hub_clients: FakeHub) -> None:
    """hub.fail(route, status, message) answers that route with the error; the clients see it as the Hub's."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    hub = hub_clients
    api = HfApi(token=hub.token)
    api.create_repo("test-user/flaky", repo_type="dataset")
    hub.fail("commit", 422, "Your push was rejected (injected)")
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit("test-user/flaky", [CommitOperationAdd("a.txt", b"a")], commit_message="a",
                          repo_type="dataset")
    assert exc.value.response.status_code == 422 and "injected" in str(exc.value)
    assert [r.route for r in hub.injected] == ["commit"]
    assert set(hub.repos["test-user/flaky"]["files"]) == {".gitattributes"}  # nothing was committed
    hub.clear_failures()
    api.create_commit("test-user/flaky", [CommitOperationAdd("a.txt", b"a")], commit_message="a", repo_type="dataset")
    assert hub.file("test-user/flaky", "a.txt") == b"a"
