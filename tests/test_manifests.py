"""Manifests (@FILE.txt, .csv, .jsonl), on local disk and on S3, with metadata that reaches
the results and survives a resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pytest

from awsserver import REGION, AwsServer
from cli import ics
from ics_service import sources
from ics_service.errors import ExitCode, UsageError
from ics_service.store import Store
from ics_service.types import ModelRef


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def csv_manifest(tmp_path: Path, photos: Path) -> Path:
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["uri", "camera", "note"])
        w.writerow([str(photos / "coffee.jpg"), "A7", "morning, cup"])
        w.writerow([str(photos / "rocket.jpg"), "", "launch"])
        w.writerow([str(photos / "gone.jpg"), "B2", "deleted"])
    return path


def test_csv_rows_are_items_and_their_other_columns_metadata(
    ics_home: Path, csv_manifest: Path, photos: Path
) -> None:
    res = ics("classify", f"@{csv_manifest}", "-o", "out.jsonl")
    assert res.exit_code == ExitCode.FAILED, res.output  # gone.jpg is missing
    by_uri = {r["uri"]: r for r in read_jsonl(Path("out.jsonl"))}
    assert by_uri[str(photos / "coffee.jpg")]["metadata"] == {
        "camera": "A7",
        "note": "morning, cup",
    }
    assert by_uri[str(photos / "coffee.jpg")]["label"] == "espresso"
    assert by_uri[str(photos / "rocket.jpg")]["metadata"] == {"camera": "", "note": "launch"}
    gone = by_uri[str(photos / "gone.jpg")]
    assert gone["error"]["type"] == "SourceNotFound" and gone["metadata"]["note"] == "deleted"

    # CSV results carry it as one JSON column.
    res = ics("classify", f"@{csv_manifest}", "-o", "out.csv")
    with Path("out.csv").open(newline="") as results:
        rows = list(csv.DictReader(results))
    assert {json.loads(r["metadata"])["note"] for r in rows} == {
        "morning, cup",
        "launch",
        "deleted",
    }


def test_jsonl_manifest_keeps_typed_fields_and_a_folder_source_has_none(
    ics_home: Path, tmp_path: Path, photos: Path
) -> None:
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"uri": str(photos / "camera.jpg"), "id": 7, "tags": ["a", "b"]},
        {"uri": "moon.jpg", "ok": True},  # relative to the current folder
    ]
    (tmp_path / "moon.jpg").write_bytes((photos / "moon.jpg").read_bytes())
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    res = ics("classify", f"@{manifest}", str(photos / "coffee.jpg"), "-o", "out.jsonl")
    assert res.exit_code in (ExitCode.OK, ExitCode.FAILED), res.output
    by_uri = {r["uri"]: r["metadata"] for r in read_jsonl(Path("out.jsonl"))}
    assert by_uri == {
        str(photos / "camera.jpg"): {"id": 7, "tags": ["a", "b"]},
        str(tmp_path / "moon.jpg"): {"ok": True},
        str(photos / "coffee.jpg"): None,
    }


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "path,x\n/a.jpg,1\n", "has no 'uri' column (its header: path, x)"),
        ("b.csv", "uri,x\n,1\n", "line 2: the uri column is empty"),
        ("c.csv", "uri,x\n/a.jpg,1,2\n", "line 2: more fields than the header has columns"),
        ("d.jsonl", '{"uri": "/a.jpg"}\n{oops\n', "line 2 is not JSON"),
        ("e.jsonl", '{"path": "/a.jpg"}\n', 'line 1: each line must be an object with a "uri"'),
        ("f.jsonl", '["/a.jpg"]\n', 'line 1: each line must be an object with a "uri"'),
    ],
)
def test_a_bad_manifest_says_which_line_and_what_to_fix(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(
        UsageError, match="manifest .*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        list(sources.expand([f"@{path}"]))


def test_a_text_list_keeps_listing_local_lines_and_takes_remote_uris_as_items(
    tmp_path: Path, photos: Path
) -> None:
    listing = tmp_path / "l.txt"
    listing.write_text(f"# photos\n{photos}/c*.jpg\ns3://bucket/one.jpg\n\n")
    got = list(sources.expand([f"@{listing}"]))
    assert got[-1] == "s3://bucket/one.jpg"
    assert [Path(u).name for u in got[:-1]] == [
        "camera.jpg",
        "chelsea.jpg",
        "clock.jpg",
        "coffee.jpg",
        "coins.jpg",
    ]


def test_manifests_on_s3_list_objects_with_their_metadata(
    aws: AwsServer, ics_home: Path, photos: Path
) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="lists")
    for name in ("coffee.jpg", "camera.jpg"):
        s3.put_object(Bucket="lists", Key=f"img/{name}", Body=(photos / name).read_bytes())
    s3.put_object(
        Bucket="lists",
        Key="m.csv",
        Body=b"\xef\xbb\xbfuri,shelf\ns3://lists/img/coffee.jpg,kitchen\ns3://lists/img/camera.jpg,studio\n",
    )
    s3.put_object(
        Bucket="lists", Key="m.jsonl", Body=b'{"uri": "s3://lists/img/coffee.jpg", "n": 1}\n'
    )
    s3.put_object(Bucket="lists", Key="m.txt", Body=b"s3://lists/img/\n")

    res = ics("classify", "@s3://lists/m.csv", "-o", "out.jsonl")
    assert res.exit_code in (ExitCode.OK, ExitCode.FAILED), res.output
    got = {r["uri"]: (r["metadata"], r["label"]) for r in read_jsonl(Path("out.jsonl"))}
    assert got == {
        "s3://lists/img/coffee.jpg": ({"shelf": "kitchen"}, "espresso"),
        "s3://lists/img/camera.jpg": ({"shelf": "studio"}, got["s3://lists/img/camera.jpg"][1]),
    }
    assert list(sources.expand_items(["@s3://lists/m.jsonl"])) == [
        ("s3://lists/img/coffee.jpg", {"n": 1})
    ]
    # A text list's prefix line (ending in /) is listed.
    assert list(sources.expand(["@s3://lists/m.txt"])) == [
        "s3://lists/img/camera.jpg",
        "s3://lists/img/coffee.jpg",
    ]
    res = ics("classify", "@s3://lists/none.csv")
    assert res.exit_code == ExitCode.USAGE
    assert "cannot read list file s3://lists/none.csv: no such object" in res.output


def test_metadata_survives_a_crash_while_listing_and_the_resume(
    store_url: str,
    ics_home: Path,
    csv_manifest: Path,
    photos: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ICS_STORE", store_url)
    store = Store(store_url)
    try:
        execution, _ = store.create_execution(
            params={"sources": [f"@{csv_manifest}"], "threshold": 0.5, "output": "out.jsonl"},
            model=ModelRef("efficientnet-lite0", "1"),
            threshold=0.5,
        )
        # A process that died while listing: only the first row registered.
        dead = subprocess.Popen(["true"])
        dead.wait(timeout=30)
        store.claim(execution.id, f"{os.uname().nodename}:{dead.pid}")
        first = next(sources.expand_items([f"@{csv_manifest}"]))
        store.add_items(execution.id, [first])

        res = ics("executions", "resume", execution.id, "--json")
        assert res.exit_code == ExitCode.FAILED, res.output  # gone.jpg
        notes = {r.uri: (r.metadata or {}).get("note") for r in store.results(execution.id)}
        assert notes == {
            str(photos / "coffee.jpg"): "morning, cup",
            str(photos / "rocket.jpg"): "launch",
            str(photos / "gone.jpg"): "deleted",
        }
        assert {r["metadata"]["note"] for r in read_jsonl(Path("out.jsonl"))} == {
            "morning, cup",
            "launch",
            "deleted",
        }
    finally:
        store.close()


def test_a_bad_row_after_the_first_ends_the_execution_failed_with_its_line(
    ics_home: Path, tmp_path: Path, photos: Path
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri,x\n{photos / 'coffee.jpg'},1\n{photos / 'moon.jpg'},2,3\n")
    res = ics("classify", f"@{manifest}")
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "line 3: more fields than the header has columns" in res.output
    executions = json.loads(ics("executions", "list", "--json").output)
    assert [e["status"] for e in executions] == ["FAILED"]
    assert "line 3" in executions[0]["error"]["message"]


def test_a_remote_uri_that_is_not_utf8_is_one_item_percent_encoded(
    tmp_path: Path, ics_home: Path
) -> None:
    listing = tmp_path / "m.txt"
    listing.write_bytes(b"s3://photos/caf\xe9.jpg\ns3://photos/ok.jpg\n")
    items = list(sources.expand_items([f"@{listing}"]))
    assert items == [("s3://photos/caf%E9.jpg", None), ("s3://photos/ok.jpg", None)]
    store = Store(f"sqlite:///{tmp_path / 'ics.db'}")
    try:
        execution, _ = store.create_execution(
            params={}, model=ModelRef(name="m", version="1"), threshold=0.5
        )
        assert store.add_items(execution.id, iter(items)) == 2  # UTF-8 text in the store
        assert [i.uri for i in store.pending_items(execution.id)] == [u for u, _ in items]
    finally:
        store.close()


def test_patterns_with_a_slash_match_a_manifest_items_key(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "uri,n\ns3://photos/2024/a.jpg,1\ns3://photos/2023/b.jpg,2\ns3://photos/2024/x/c.jpg,3\n"
    )
    select = sources.Selection(include=["2024/*.jpg"])
    assert list(sources.expand([f"@{manifest}"], select)) == ["s3://photos/2024/a.jpg"]
    select = sources.Selection(exclude=["2024/**"])
    assert list(sources.expand([f"@{manifest}"], select)) == ["s3://photos/2023/b.jpg"]


def test_a_manifest_at_an_http_url_is_a_clear_usage_error() -> None:
    with pytest.raises(UsageError) as caught:
        list(sources.expand(["@https://example.org/list.txt"]))
    assert str(caught.value) == (
        "cannot read list file https://example.org/list.txt: list files are read from local "
        "disk or object storage (s3://BUCKET/KEY); download it first"
    )
