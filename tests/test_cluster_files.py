"""cluster/ and docs/CLUSTER.md: the Ray cluster-launcher YAML validates against the schema Ray ships, the KubeRay
RayJob and the serve manifest use only documented fields, images and paths agree with the Dockerfile, and every
`refbank` command they name parses with the CLI's own click commands (introspected, so new options count)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import typer.main
import yaml

from jobs.cli import app

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
# The CLI's usage errors (unknown option, bad value, missing argument): typer may vendor click, so the classes
# are taken from the one typer exports rather than from an `import click`.
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

# Field names of KubeRay's ray.io/v1 API reference (docs/reference/api.md of ray-project/kuberay).
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}


def load_yaml(name: str) -> list[dict]:
    """The documents of cluster/<name>."""
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def refbank_commands(text: str) -> list[list[str]]:
    """Every `refbank ...` command in a shell line: its argv, up to the next shell operator; a quoted argument that
    is a command itself (`ray exec ... "refbank serve ..."`) counts too."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], None
    for token in lexer:
        if token in SHELL_OPERATORS:
            current = None
        elif current is not None:
            current.append(token)
        elif token == "refbank":
            current = [token]
            commands.append(current)
        elif token.startswith("refbank "):
            commands += refbank_commands(token)
    return commands


def markdown_commands(path: Path) -> list[list[str]]:
    """The `refbank` commands of a Markdown file's fenced code blocks (backslash continuations joined)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", path.read_text(), flags=re.S | re.M)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [c for line in lines if not line.lstrip().startswith("#") for c in refbank_commands(line)]


def parse_cli(argv: list[str]) -> typer.Context:
    """Parse argv (starting at `refbank`) with the CLI's click command, exactly as the command line would."""
    group = typer.main.get_command(app)
    name, *args = argv[1:]
    if name not in group.commands:
        raise USAGE_ERROR(f"no command {name!r}; the CLI has {sorted(group.commands)}")
    return group.commands[name].make_context(f"refbank {name}", list(args))


def dockerfile() -> dict:
    """The Dockerfile's base image and the sources it copies."""
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, flags=re.M).group(1)
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY")]
    sources = [s for c in copies for s in c[:-1] if not s.startswith("--")]
    return {"text": text, "base": base, "sources": sources}


def ray_version_of(image: str) -> str:
    """'2.60.0' of 'rayproject/ray:2.60.0-py311(-gpu)'."""
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)(-gpu)?", image)
    assert match, f"{image} is not a rayproject/ray:<version>-py<XY>[-gpu] image"
    return match.group(1)


def containers(pod_template: dict) -> list[dict]:
    """The containers of a pod template."""
    return pod_template["spec"]["containers"]


def all_commands() -> dict[str, list[list[str]]]:
    """Every refbank command named by the cluster files and docs/CLUSTER.md, by where it was found."""
    launcher = load_yaml("launcher-aws.yaml")[0]
    job = load_yaml("rayjob-build.yaml")[0]
    serve = load_yaml("serve.yaml")[0]
    return {
        "launcher": [c for v in launcher["metadata"]["refbank"].values() for c in refbank_commands(v)],
        "rayjob": refbank_commands(job["spec"]["entrypoint"]),
        "serve": refbank_commands(shlex.join(containers(serve["spec"]["template"])[0]["command"])),
        "docs": markdown_commands(ROOT / "docs" / "CLUSTER.md"),
    }


def test_every_command_parses_with_the_cli() -> None:
    found = all_commands()
    names = {where: sorted({c[1] for c in cmds}) for where, cmds in found.items()}
    # each file names the jobs it is for, so a command lost in editing fails here rather than passing vacuously
    assert names["launcher"] == ["build", "index", "serve"]
    assert names["rayjob"] == ["build", "index"]
    assert names["serve"] == ["serve"]
    assert {"build", "index", "serve"} <= set(names["docs"])
    for where, commands in found.items():
        for argv in commands:
            try:
                parse_cli(argv)
            except USAGE_ERROR as exc:
                pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse: {exc.format_message()}")


@pytest.mark.parametrize("argv, error", [
    (["refbank", "build", "in/*.tar", "bank", "--no-such-option"], "NoSuchOption"),
    (["refbank", "build", "in/*.tar", "bank", "--mask-kind", "polygons"], "BadParameter"),
    (["refbank", "serve", "bank", "--port", "http"], "BadParameter"),
    (["refbank", "index"], "MissingParameter"),
    (["refbank", "bulid", "in/*.tar", "bank"], "UsageError"),
])
def test_the_check_rejects_what_the_cli_rejects(argv: list[str], error: str) -> None:
    with pytest.raises(USAGE_ERROR) as caught:
        parse_cli(argv)
    assert type(caught.value).__name__ == error


def test_commands_are_cut_at_shell_operators() -> None:
    assert refbank_commands("ray job submit -- refbank build 'a b' c --ray-address auto && refbank index c") == [
        ["refbank", "build", "a b", "c", "--ray-address", "auto"], ["refbank", "index", "c"]]
    assert refbank_commands('ray exec x.yaml "refbank serve b --port 1"; ls') == [["refbank", "serve", "b", "--port", "1"]]


def test_launcher_validates_against_rays_schema() -> None:
    config = load_yaml("launcher-aws.yaml")[0]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the check `ray up` runs (it also rejects unknown top-level fields)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert sum(t.get("max_workers", 0) for t in workers.values()) <= config["max_workers"]
    # one setup command installs the synced checkout
    (remote, local), = config["file_mounts"].items()
    assert (ROOT / local / "pyproject.toml").is_file()
    assert any(f"pip install --no-cache-dir {remote}" in c for c in config["setup_commands"])
    for name in config["rsync_filter"]:
        assert (ROOT / local / name).is_file()


def test_images_and_versions_agree_with_the_dockerfile() -> None:
    docker = dockerfile()
    ray_pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                   if d.startswith("ray"))
    version = ray_version_of(docker["base"])
    assert ray_pin.endswith(f"=={version}")
    launcher = load_yaml("launcher-aws.yaml")[0]["docker"]
    assert launcher["head_image"] == docker["base"]
    assert launcher["worker_image"] == docker["base"] + "-gpu"
    job = load_yaml("rayjob-build.yaml")[0]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version
    # one refbank image everywhere, the one the Dockerfile says to build
    pods = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
            *(g["template"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]),
            load_yaml("serve.yaml")[0]["spec"]["template"]]
    images = {c["image"] for pod in pods for c in containers(pod)}
    assert len(images) == 1 and f"-t {images.pop()} ." in docker["text"]
    # the image holds every package and file the project's build needs
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", project["project"]["readme"]} <= set(docker["sources"])
    assert all((ROOT / s).exists() for s in docker["sources"])


def test_rayjob_uses_documented_fields() -> None:
    job = load_yaml("rayjob-build.yaml")[0]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert set(spec) <= RAYJOB_SPEC and set(cluster) <= RAYCLUSTER_SPEC
    groups = [(cluster["headGroupSpec"], HEAD_GROUP)] + [(g, WORKER_GROUP) for g in cluster["workerGroupSpecs"]]
    for group, fields in groups:
        assert set(group) <= fields
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # map[string]string
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        assert {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])} <= volumes
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in containers(g["template"])]
    assert gpus and all(gpus)


def test_serve_manifest_probes_and_port_match_the_service() -> None:
    from query.service import probes

    deployment, service = load_yaml("serve.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    container, = containers(deployment["spec"]["template"])
    ctx = parse_cli(container["command"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ctx.params["port"] == ports["http"] and ctx.params["host"] == "0.0.0.0"
    routes = {r.path for r in probes.routes}
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"]["path"] in routes and probe["httpGet"]["port"] in ports
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"][0]["targetPort"] in ports
