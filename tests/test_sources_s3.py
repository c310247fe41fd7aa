"""S3 sources against a real S3-protocol server process (moto's server mode)."""

from __future__ import annotations

import http.server
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import pyarrow.parquet as pq
import pytest

import imagefiles as f
from awsserver import MOTO_SERVER, REGION, AwsServer, _free_port
from cli import ics, ics_process
from ics_service import sources
from ics_service.capture.writer import check_capture_folder
from ics_service.cli.config import shown
from ics_service.config import Settings, load_settings
from ics_service.engine import ExecutionRunner
from ics_service.errors import (
    ExitCode,
    ImageTooLarge,
    OutputError,
    SourceNotFound,
    SourceUnavailable,
    SourceUnreadable,
    UsageError,
)
from ics_service.models.runtime import OnnxRuntime
from ics_service.outputs import ResultsWriter
from ics_service.outputs.remote import check_writable
from ics_service.server.app import create_app
from ics_service.sources.remote import FsspecSource, list_objects
from ics_service.sources.web import HttpSource
from ics_service.store import Store
from ics_service.types import ExecutionStatus, ItemResult
from receivers import serve_http
from serving import client_of, finished


def s3_client() -> Any:
    return boto3.client("s3", region_name=REGION)


def bucket_with(name: str, objects: dict[str, bytes]) -> None:
    client = s3_client()
    client.create_bucket(Bucket=name)
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda kv: client.put_object(Bucket=name, Key=kv[0], Body=kv[1]), objects.items()
            )
        )


@pytest.fixture(autouse=True)
def default_sources() -> Iterator[None]:
    """Every test ends with the sources of the default settings, also one that fails."""
    yield
    sources.configure(Settings())


@pytest.fixture
def s3(aws: AwsServer) -> Iterator[FsspecSource]:
    """A fresh s3 source (its own client, pointed at the test's server by the environment)."""
    source = FsspecSource("s3")
    sources.register("s3", source)
    try:
        yield source
    finally:
        sources.unregister("s3")  # configure sets the default one up again


def test_listing_pages_through_more_than_a_thousand_keys_in_key_order(
    s3: FsspecSource,
) -> None:
    keys = {f"many/{i:05d}.jpg": b"x" for i in range(1203)}
    keys["many/notes.json"] = b"{}"  # a sidecar: not an image, not listed
    keys["many/sub/"] = b""  # a folder marker
    keys["many/sub/deep/raw"] = b"x"  # no extension: listed
    keys["other/0.jpg"] = b"x"
    bucket_with("big", keys)

    uris = list(sources.expand(["s3://big/many"]))
    expected = sorted(k for k in keys if k.endswith(".jpg") and k.startswith("many/"))
    expected = sorted([*expected, "many/sub/deep/raw"])
    assert uris == [f"s3://big/{k}" for k in expected]

    # The reusable listing: every object with its size, in key order, after a cursor.
    objs = list(list_objects(s3.fs, "big", "many/", start_after="many/01100.jpg"))
    assert [o.key for o in objs][:2] == ["many/01101.jpg", "many/01102.jpg"]
    assert [o.key for o in objs] == sorted(
        k for k in keys if k > "many/01100.jpg" and k.startswith("many/")
    )
    assert all(o.size == len(keys[o.key]) for o in objs)


def test_a_key_names_one_object_and_filters_choose_what_a_prefix_lists(
    s3: FsspecSource,
) -> None:
    bucket_with(
        "pics",
        {
            "a/1.jpg": b"x",
            "a/2.png": b"x",
            "a/2024/3.jpg": b"x",
            "a/2024/4.png": b"x",
            "a.jpg": b"x",
        },
    )
    assert list(sources.expand(["s3://pics/a.jpg"])) == ["s3://pics/a.jpg"]
    # A key that is missing is still an item: it fails alone, as SourceNotFound.
    assert list(sources.expand(["s3://pics/missing.jpg"])) == ["s3://pics/missing.jpg"]
    assert list(sources.expand(["s3://pics/a/"], sources.Selection(["*.png"]))) == [
        "s3://pics/a/2.png",
        "s3://pics/a/2024/4.png",
    ]
    assert list(sources.expand(["s3://pics/a"], sources.Selection(["2024/*"], ["*.png"]))) == [
        "s3://pics/a/2024/3.jpg"
    ]
    assert list(sources.expand(["s3://pics"], sources.Selection(exclude=["a/**"]))) == [
        "s3://pics/a.jpg"
    ]


def test_reading_checks_the_size_before_the_body_and_maps_a_missing_key(
    s3: FsspecSource,
) -> None:
    photo = f.jpeg()
    bucket_with("reads", {"p.jpg": photo})
    assert sources.read("s3://reads/p.jpg", 10_000_000) == photo
    with pytest.raises(ImageTooLarge, match=f"{len(photo):,} bytes, over max_bytes=100"):
        sources.read("s3://reads/p.jpg", 100)
    with pytest.raises(SourceNotFound, match="no such object: s3://reads/nope"):
        sources.read("s3://reads/nope.jpg", 10_000_000)
    with pytest.raises(SourceNotFound, match="bucket 'no-such-bucket' does not exist; check"):
        sources.read("s3://no-such-bucket/p.jpg", 10_000_000)


def test_a_missing_bucket_is_a_usage_error_naming_it(s3: FsspecSource) -> None:
    with pytest.raises(UsageError, match="bucket 'nowhere' does not exist"):
        list(sources.expand(["s3://nowhere/photos/"]))


def test_classify_reads_real_photos_from_s3_end_to_end(
    aws: AwsServer, ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    bucket_with("photos", {f"in/{p.name}": p.read_bytes() for p in sorted(photos.iterdir())})
    out = tmp_path / "out.jsonl"
    proc = ics_process(
        "classify", "s3://photos/in/", "--include", "c*.jpg", "-o", str(out), "--json"
    )
    assert proc.returncode == ExitCode.OK, proc.stderr  # low-confidence cats and coins: flagged
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_uri = {r["uri"]: r for r in records}
    assert sorted(by_uri) == [
        "s3://photos/in/camera.jpg",
        "s3://photos/in/chelsea.jpg",
        "s3://photos/in/clock.jpg",
        "s3://photos/in/coffee.jpg",
        "s3://photos/in/coins.jpg",
    ]
    coffee = by_uri["s3://photos/in/coffee.jpg"]
    assert coffee["status"] == "SUCCEEDED" and coffee["label"] == "espresso"
    assert coffee["image"]["sha256"]
    assert json.loads(proc.stdout)["counts"]["total"] == 5


def test_classify_names_a_missing_bucket_in_one_line(aws: AwsServer, ics_home: Path) -> None:
    res = ics("classify", "s3://absent-bucket/x/")
    assert res.exit_code == ExitCode.USAGE
    assert "bucket 'absent-bucket' does not exist" in res.output
    assert "Traceback" not in res.output


def test_a_missing_key_fails_alone(aws: AwsServer, ics_home: Path, photos: Path) -> None:
    bucket_with("keys", {"coffee.jpg": (photos / "coffee.jpg").read_bytes()})
    res = ics("classify", "s3://keys/coffee.jpg", "s3://keys/gone.jpg", "-o", "out.jsonl")
    assert res.exit_code == ExitCode.FAILED
    records = {r["uri"]: r for r in map(json.loads, Path("out.jsonl").read_text().splitlines())}
    assert records["s3://keys/coffee.jpg"]["status"] == "SUCCEEDED"
    assert records["s3://keys/gone.jpg"]["error"]["type"] == "SourceNotFound"


@pytest.fixture
def locked_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto server that checks access keys (only keys made through its IAM are valid)."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1.0)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, "moto_server exited at start"
                assert time.monotonic() < deadline, "moto_server did not answer within 30 s"
                time.sleep(0.1)
        for var in list(os.environ):
            if var.startswith("AWS_"):
                monkeypatch.delenv(var)
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bad_credentials_are_a_clear_usage_error(locked_server: str, ics_home: Path) -> None:
    res = ics(
        "classify",
        "s3://guarded/in/",
        env={"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"},
    )
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "bucket 'guarded' refused the credentials (InvalidAccessKeyId)" in res.output
    assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in res.output
    assert "s3cr3t-value" not in res.output and "Traceback" not in res.output


def test_no_credentials_at_all_say_how_to_give_them(
    locked_server: str, ics_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    res = ics("classify", "s3://guarded/in/")
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "cannot list s3://guarded/in/: no credentials: set AWS_ACCESS_KEY_ID" in res.output


def test_storage_options_from_the_settings_file_reach_s3_and_stay_hidden(
    aws: AwsServer, ics_home: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket_with("conf", {"coffee.jpg": (photos / "coffee.jpg").read_bytes()})
    # Only the settings file knows where the server is and which keys to use.
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    Path("ics.toml").write_text(
        f'[storage.s3]\nendpoint_url = "{aws.url}"\nkey = "testing"\nsecret = "very-secret-value"\n'
    )
    res = ics("classify", "s3://conf/coffee.jpg", "-o", "out.jsonl")
    assert res.exit_code == ExitCode.OK, res.output
    assert json.loads(Path("out.jsonl").read_text())["label"] == "espresso"

    values = shown(load_settings().settings)
    assert values["storage"] == {"s3": {"endpoint_url": aws.url, "key": "***", "secret": "***"}}
    res = ics("config", "show", "--json")
    assert "very-secret-value" not in res.output and "***" in res.output


def test_any_fsspec_protocol_goes_through_the_same_source() -> None:
    """The plain fsspec path (gcs://, az://... when installed), on fsspec's memory store."""
    import fsspec

    fs = fsspec.filesystem("memory")
    photo = f.jpeg()
    for key in ("box/in/b.jpg", "box/in/a.jpg", "box/in/sub/c.png", "box/in/meta.json"):
        fs.pipe(key, photo)
    source = FsspecSource("memory")
    sources.register("memory", source)
    try:
        assert list(sources.expand(["memory://box/in/"])) == [
            "memory://box/in/a.jpg",
            "memory://box/in/b.jpg",
            "memory://box/in/sub/c.png",
        ]
        assert sources.read("memory://box/in/a.jpg", 10_000_000) == photo
        with pytest.raises(ImageTooLarge):
            sources.read("memory://box/in/a.jpg", 10)
        with pytest.raises(SourceNotFound):
            sources.read("memory://box/in/none.jpg", 10_000_000)
        with pytest.raises(UsageError, match="bucket 'nobox' does not exist"):
            list(sources.expand(["memory://nobox/x/"]))
    finally:
        sources.unregister("memory")
        fs.rm("box", recursive=True)


class _FlakyS3(http.server.BaseHTTPRequestHandler):
    """Just enough S3 for one object: its first GETs fail with `error` (503 SlowDown, as a
    throttled S3 answers, or a 500); a listing is always empty."""

    photo = b""
    failures = 0
    gets = 0
    error = (503, b"SlowDown", b"Please reduce your request rate.")

    def do_GET(self) -> None:
        if "list-type=2" in self.path:
            empty = b"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>"
            self._send(200, empty)
            return
        cls = type(self)
        cls.gets += 1
        if cls.gets <= cls.failures:
            status, code, message = cls.error
            body = b"<Error><Code>%s</Code><Message>%s</Message></Error>" % (code, message)
            self._send(status, body)
            return
        self._send(200, cls.photo, "image/jpeg")

    def _send(self, status: int, body: bytes, kind: str = "application/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def flaky_s3() -> Iterator[str]:
    with serve_http(_FlakyS3) as url:
        yield url


def test_throttling_is_transient_and_the_retry_policy_reads_it_in_the_end(
    flaky_s3: str, ics_home: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _FlakyS3.photo = (photos / "coffee.jpg").read_bytes()
    _FlakyS3.failures, _FlakyS3.gets = 1000, 0
    # No retries inside botocore; s3fs retries SlowDown itself a few times, then gives up.
    storage = {
        "s3": {
            "endpoint_url": flaky_s3,
            "key": "k",
            "secret": "s",
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        }
    }
    monkeypatch.setenv("ICS_STORAGE", json.dumps(storage))
    monkeypatch.setenv("ICS_RETRY", '{"SerializeImageData": {"interval_seconds": 0.01}}')
    source = FsspecSource("s3", storage["s3"])
    with pytest.raises(SourceUnavailable, match="reduce your request rate") as caught:
        source.read("s3://flaky/coffee.jpg", 10_000_000)
    assert caught.value.retryable

    assert _FlakyS3.gets > 1

    # A 5xx that s3fs passes on at once: ICS's SerializeImageData policy retries it.
    _FlakyS3.error = (500, b"InternalError", b"We encountered an internal error.")
    _FlakyS3.failures, _FlakyS3.gets = 2, 0
    res = ics("classify", "s3://flaky/coffee.jpg", "-o", "out.jsonl")
    assert res.exit_code == ExitCode.OK, res.output
    record = json.loads(Path("out.jsonl").read_text())
    assert record["status"] == "SUCCEEDED" and record["label"] == "espresso"
    assert record["attempts"] == 3


def test_results_are_written_to_s3_and_an_unwritable_destination_stops_before_work(
    aws: AwsServer, ics_home: Path, photos: Path
) -> None:
    bucket_with("out", {"in/coffee.jpg": (photos / "coffee.jpg").read_bytes()})
    bucket_with("in-only", {"camera.jpg": (photos / "camera.jpg").read_bytes()})
    for name, fmt in (("run.jsonl", "jsonl"), ("run.csv", "csv"), ("run.parquet", "parquet")):
        res = ics("classify", "s3://out/in/", "-o", f"s3://out/results/{name}")
        assert res.exit_code == ExitCode.OK, res.output
        body = s3_client().get_object(Bucket="out", Key=f"results/{name}")["Body"].read()
        if fmt == "parquet":
            rows = pq.read_table(io.BytesIO(body)).to_pylist()
            assert [(r["uri"], r["label"]) for r in rows] == [
                ("s3://out/in/coffee.jpg", "espresso")
            ]
            continue
        text = body.decode()
        if fmt == "jsonl":
            record = json.loads(text)
            assert record["uri"] == "s3://out/in/coffee.jpg" and record["label"] == "espresso"
        else:
            assert text.startswith("execution_id,item_id,uri,") and "espresso" in text
    # Nothing but the results (the write check cleaned up after itself).
    keys = [o["Key"] for o in s3_client().list_objects_v2(Bucket="out")["Contents"]]
    assert sorted(keys) == [
        "in/coffee.jpg",
        "results/run.csv",
        "results/run.jsonl",
        "results/run.parquet",
    ]

    res = ics("classify", "s3://in-only/", "-o", "s3://no-such-bucket/r.jsonl")
    assert res.exit_code == ExitCode.USAGE
    assert "bucket 'no-such-bucket' does not exist" in res.output
    # Checked before any work: no execution was started.
    assert len(json.loads(ics("executions", "list", "--json").output)) == 3
    res = ics("classify", "s3://in-only/", "-o", "s3://out/results/")
    assert res.exit_code == ExitCode.USAGE and "names no object" in res.output


@pytest.mark.anyio
async def test_the_api_reads_an_allowed_s3_uri_with_the_storage_settings(
    aws: AwsServer,
    ics_home: Path,
    runtime: OnnxRuntime,
    photos: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = b"uri,shelf\ns3://api/ok/coffee.jpg,kitchen\n"
    bucket_with(
        "api", {"ok/coffee.jpg": (photos / "coffee.jpg").read_bytes(), "ok/m.csv": manifest}
    )
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the storage setting knows the server
    settings = Settings(
        home=ics_home,
        allowed_sources=["s3://api/ok/"],
        storage={"s3": {"endpoint_url": aws.url}},
    )
    async with client_of(create_app(settings, runtime=runtime)) as client:
        r = await client.post("/v1/classify", json={"uri": "s3://api/ok/coffee.jpg"})
        assert r.status_code == 200, r.text
        assert (r.json()["label"], r.json()["metadata"]) == ("espresso", None)
        r = await client.post("/v1/classify", json={"uri": "s3://api/ok/none.jpg"})
        assert r.status_code == 404 and "no such object" in r.text
        r = await client.post("/v1/classify", json={"uri": "s3://api/other.jpg"})
        assert r.status_code == 403
        # A batch from a manifest on S3: the API's records carry each row's metadata.
        r = await client.post("/v1/executions", json={"sources": ["@s3://api/ok/m.csv"]})
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        doc = await finished(client, execution_id, deadline_s=60)
        assert doc["status"] == "SUCCEEDED", doc
        r = await client.get(f"/v1/executions/{execution_id}/results")
        records = r.json()["results"]
        assert [(x["uri"], x["metadata"]) for x in records] == [
            ("s3://api/ok/coffee.jpg", {"shelf": "kitchen"})
        ]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_configuring_again_with_the_same_settings_keeps_the_sources(aws: AwsServer) -> None:
    sources.configure(Settings())
    s3, web = sources.source_for("s3://b/k"), sources.source_for("https://h/x.jpg")
    sources.configure(Settings())  # e.g. each batch of `ics serve` makes a runner
    assert sources.source_for("s3://b/k") is s3 and sources.source_for("https://h/") is web
    sources.configure(Settings(storage={"s3": {"endpoint_url": aws.url}}))
    changed = sources.source_for("s3://b/k")
    assert changed is not s3
    assert isinstance(changed, FsspecSource) and changed.options == {"endpoint_url": aws.url}
    sources.configure(Settings())


def test_a_key_that_cannot_be_listed_is_still_an_item_and_its_read_names_the_bucket(
    locked_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    source = FsspecSource("s3")
    # The folder check (ListObjectsV2 on key/) is refused: the key is an item all the same.
    assert list(source.list("s3://guarded/in/p.jpg")) == ["s3://guarded/in/p.jpg"]
    with pytest.raises(SourceUnreadable) as caught:
        source.read("s3://guarded/in/p.jpg", 10_000_000)
    message = str(caught.value)
    assert "bucket 'guarded' refused the credentials (InvalidAccessKeyId)" in message
    assert "check AWS_ACCESS_KEY_ID" in message and "s3cr3t-value" not in message


def _check_destination(output: str, bucket: str, home: Path) -> None:
    if output == "results":
        check_writable(f"s3://{bucket}/out/run.jsonl")
    else:
        check_capture_folder(Settings(home=home, capture=f"s3://{bucket}/cap"))


@pytest.mark.parametrize("output", ["results", "capture"])
def test_results_and_capture_destinations_are_probed_alike(
    aws: AwsServer, ics_home: Path, output: str
) -> None:
    """One probe and one reading of its error (storage.check_writable) for both outputs."""
    bucket_with("probed", {})
    _check_destination(output, "probed", ics_home)  # writable: nothing raised
    assert "Contents" not in s3_client().list_objects_v2(Bucket="probed")  # no probe left
    with pytest.raises(UsageError, match="bucket 'nowhere' does not exist; check its name"):
        _check_destination(output, "nowhere", ics_home)


@pytest.mark.parametrize("output", ["results", "capture"])
def test_refused_credentials_are_named_alike_for_results_and_capture(
    locked_server: str, ics_home: Path, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    sources.configure(Settings(home=ics_home))  # a fresh client, with these credentials
    with pytest.raises(UsageError) as caught:
        _check_destination(output, "guarded", ics_home)
    assert "bucket 'guarded' refused the credentials (InvalidAccessKeyId)" in str(caught.value)
    assert "s3cr3t-value" not in str(caught.value)


class _ClosedSink:
    """A sink after the results file: it must be closed even when the upload fails."""

    def __init__(self) -> None:
        self.results = 0
        self.closed = False

    def write(self, results: Sequence[ItemResult]) -> None:
        self.results += len(results)

    def close(self) -> None:
        self.closed = True


def test_a_failed_upload_keeps_the_results_file_and_the_execution_its_status(
    aws: AwsServer, ics_home: Path, runtime: OnnxRuntime, photos: Path
) -> None:
    settings = load_settings(None, {"threshold": 0.0}).settings
    store = Store(settings.store_url)
    try:
        runner = ExecutionRunner(settings, store, runtime)
        execution, _ = runner.start([str(photos / "coffee.jpg"), str(photos / "rocket.jpg")])
        writer = ResultsWriter("s3://vanished-bucket/run.jsonl")  # e.g. deleted mid-run
        after = _ClosedSink()
        with pytest.raises(OutputError) as caught:
            runner.run(execution, sinks=[writer, after])
        message = str(caught.value)
        assert "cannot write results to s3://vanished-bucket/run.jsonl" in message
        assert "bucket 'vanished-bucket' does not exist" in message
        assert f"the results are kept in {writer.path}" in message
        records = [json.loads(line) for line in Path(writer.path).read_text().splitlines()]
        assert sorted(r["uri"].rsplit("/", 1)[-1] for r in records) == ["coffee.jpg", "rocket.jpg"]
        assert all(r["status"] == "SUCCEEDED" for r in records)
        assert after.closed and after.results == 2
        # Every item has its result: the execution's status is its items', not FAILED.
        assert store.get_execution(execution.id).status is ExecutionStatus.SUCCEEDED
    finally:
        store.close()
        Path(writer.path).unlink(missing_ok=True)


def test_configure_keeps_a_registered_source_and_closes_the_ones_it_replaces() -> None:
    mine = HttpSource(timeout_s=1)
    sources.register("https", mine)
    try:
        sources.configure(Settings(http_timeout_s=7))
        assert sources.source_for("https://h/x.jpg") is mine
        made = sources.source_for("http://h/x.jpg")
        assert isinstance(made, HttpSource) and made.timeout_s == 7
        fetcher = made.fetcher
        sources.configure(Settings(http_timeout_s=8))
        assert fetcher.closed and sources.source_for("http://h/x.jpg") is not made
    finally:
        sources.unregister("https")
