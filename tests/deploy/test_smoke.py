"""deploy/smoke.sh, the real build and run of the image (podman, Debian's
docker-compose), checked here as far as that goes without containers: the
script parses (bash -n, and shellcheck where it is installed), builds the way
the image needs (the Docker format that keeps the HEALTHCHECK, the base as
the Dockerfile's BASE_IMAGE argument, the host's CA bundle mounted, never
copied), runs the checks issue 17 asks for, cleans up on exit, and .ci/run
runs it after the tests. What the script checks for real is its own run (in
.ci/run)."""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml

from tests.support.dockerfile import DOCKERFILE, ROOT
from tests.support.tools import passes

SMOKE = ROOT / "deploy" / "smoke.sh"
SCRIPT = SMOKE.read_text()
CI_RUN = ROOT / ".ci" / "run"


def test_the_script_parses_and_shellcheck_finds_nothing() -> None:
    """bash -n always; shellcheck (Debian's package) where it is installed."""
    passes(["bash", "-n", str(SMOKE)])
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        passes([shellcheck, "--severity=info", str(SMOKE)])
    # Not a rubber stamp: bash -n refuses a broken script.
    broken = subprocess.run(["bash", "-n"], input="if true; then\n", text=True, capture_output=True)
    assert broken.returncode != 0


def test_it_builds_in_the_docker_format_on_the_dockerfiles_base_argument() -> None:
    """podman's default OCI format drops the HEALTHCHECK without a word; the
    stand-in base goes in as the Dockerfile's own ARG."""
    (arg,) = re.findall(r"^ARG (\w+)=", DOCKERFILE.read_text(), re.MULTILINE)[:1]
    assert arg == "BASE_IMAGE"
    build = re.search(r"^BUILD=\((.*)\)$", SCRIPT, re.MULTILINE)
    assert build is not None
    assert "podman build --format docker" in build[1]
    assert f'--build-arg "{arg}=$BASE_IMAGE"' in build[1]
    assert '"${BUILD[@]}" -f deploy/Dockerfile' in SCRIPT


def test_the_ca_bundle_is_mounted_for_the_build_and_checked_absent_from_the_image() -> None:
    """The proxy's CA reaches pip through a build-time mount over the base's
    bundle, never a COPY; the script compares the image's bundle with the
    base's and looks for a pip configuration in it."""
    assert re.search(
        r'BUILD\+=\(--volume "\$CA_BUNDLE:/etc/ssl/certs/ca-certificates\.crt:ro"\)', SCRIPT
    )
    assert "ca-certificates.crt" not in DOCKERFILE.read_text()
    assert '[ "$base" != "$image" ]' in SCRIPT
    assert "! test -e /etc/pip.conf" in SCRIPT


def test_the_stand_in_base_has_what_the_dockerfile_calls() -> None:
    """Debian's python3.11 with venv and pip, `python` on PATH
    (python-is-python3) and the CA certificates, from bookworm."""
    include = re.search(r"--include=(\S+)", SCRIPT)
    assert include is not None
    assert set(include[1].split(",")) >= {
        "python3.11",
        "python3.11-venv",
        "python3-pip",
        "python-is-python3",
        "ca-certificates",
    }
    assert re.search(r"mmdebstrap .*--variant=minbase", SCRIPT)
    assert "bookworm" in SCRIPT and "podman import" in SCRIPT


def test_it_runs_every_check_of_the_issue() -> None:
    """Health checks as UID 10001 (plainly and with Kubernetes' settings), the
    two-container demo, compose in health order with a REINIT and equal
    digests, Prometheus' targets up, SIGTERM to exit 0; a tally at the end."""
    secure = re.search(r"^SECURE=\((.*)\)$", SCRIPT, re.MULTILINE)
    assert secure is not None
    assert secure[1].split() == [
        "--user",
        "10001:10001",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    for needle in (
        "podman healthcheck run",
        "vfioctl demo --json",
        "--memory remote",
        "docker-compose --project-name",
        "up --detach --no-build migrate prometheus",
        "health order",
        "REINIT",
        "digests equal",
        "/api/v1/query?query=up",
        "podman stop --time",
        "printf '%s passed, %s failed",
    ):
        assert needle in SCRIPT, needle


def test_the_security_settings_are_the_kubernetes_pods() -> None:
    """What SECURE stands for is what deploy/k8s/base's containers set."""
    base = ROOT / "deploy" / "k8s" / "base"
    contexts = []
    for path in sorted(base.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                contexts.append((spec.get("securityContext", {}), c.get("securityContext", {})))
    assert contexts
    for pod, container in contexts:
        assert pod.get("runAsUser") == 10001 and pod.get("runAsGroup") == 10001
        assert container["readOnlyRootFilesystem"] is True
        assert container["allowPrivilegeEscalation"] is False
        assert container["capabilities"] == {"drop": ["ALL"]}


def test_it_cleans_up_on_exit_and_keeps_to_a_store_of_its_own() -> None:
    """A trap on EXIT removes the temporary store (every image, container,
    network and volume in it); podman's configuration points there, so the
    script never touches anyone else's containers."""
    assert re.search(r"^trap cleanup EXIT$", SCRIPT, re.MULTILINE)
    assert 'export CONTAINERS_CONF="$WORK/containers.conf" CONTAINERS_STORAGE_CONF=' in SCRIPT
    assert 'graphroot = "$WORK/storage"' in SCRIPT
    assert 'network_config_dir = "$WORK/networks"' in SCRIPT
    assert 'rm -rf "$WORK"' in SCRIPT


def test_without_containers_it_skips_or_fails_under_ci() -> None:
    body = re.search(r"^cannot_run\(\) \{\n(.*?)^\}", SCRIPT, re.MULTILINE | re.DOTALL)
    assert body is not None
    assert 'if [ -n "${CI:-}" ]' in body[1] and "exit 1" in body[1] and "exit 0" in body[1]


def test_ci_runs_it_after_the_test_suite() -> None:
    lines = [line for line in CI_RUN.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-1] == "bash deploy/smoke.sh"
    assert any("VFIO_TEST_TLS=1" in line for line in lines[:-1])
