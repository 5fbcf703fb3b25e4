#!/usr/bin/env bash
# deploy/smoke.sh: the image built and run for real, with Debian's podman.
#
#     bash deploy/smoke.sh        (from anywhere, on Debian bookworm: as root, or
#                                  it runs itself with sudo where that needs no password)
#
# From a clean Debian bookworm machine, as root: it installs what it needs
# from Debian's packages (podman, runc, netavark, aardvark-dns, iptables,
# mmdebstrap, docker-compose), makes a stand-in for python:3.11-slim-bookworm
# (an mmdebstrap bookworm rootfs with Debian's python3.11, venv, pip,
# python-is-python3 and ca-certificates, `podman import`ed), builds
# deploy/Dockerfile on it (`podman build --format docker --build-arg
# BASE_IMAGE=...`: the OCI format would drop the HEALTHCHECK) and a stand-in
# Prometheus image (the same base and Debian's prometheus), then checks:
#
#   1. the image: HEALTHCHECK kept, no pip or setuptools in the venv, the
#      scenario files in examples/, nothing of the build's CA bundle or pip
#      configuration left in it;
#   2. each service's health check (the image's HEALTHCHECK, `podman
#      healthcheck run`) as UID 10001, plainly and with the Kubernetes security
#      settings (read-only root, all capabilities dropped, no-new-privileges);
#   3. a demo across two service containers (fwemu, and vfio-driver with
#      --memory remote: the data over gRPC) from a third: equal digests;
#   4. deploy/compose.yaml (mutual TLS; without Grafana) under Debian's
#      docker-compose talking to podman's Docker API: up in health order, the
#      `migrate` job reports a REINIT and equal digests, Prometheus scrapes
#      both services (`up` is 1);
#   5. SIGTERM stops every service with exit status 0.
#
# It prints `N passed, N failed` and exits nonzero on any failure. Everything
# runs in a podman store of its own (a temporary directory, with its own
# containers.conf and storage.conf), which it removes on exit whatever
# happened: every image, container, network and volume it made goes with it,
# and no one else's podman state is touched. Where the machine cannot run
# containers at all it says so and exits 0 (skipped), or 1 under CI (CI set).
#
# This machine's kind needs: default ulimits (no CAP_SYS_RESOURCE: the limits
# podman itself runs with, not its own higher defaults), runc (hybrid cgroups),
# `podman healthcheck run` in a loop (no systemd for health timers), and the
# host's CA bundle mounted over the base's in the build steps (a
# TLS-intercepting proxy for pip), never baked into the image (check 1).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PREFIX="vfio-smoke-$$"
BASE_IMAGE="localhost/vfio-smoke/python:3.11-slim-bookworm"
IMAGE="localhost/vfio-mlx5-emu:latest"
SECURE=(--user 10001:10001 --read-only --cap-drop ALL --security-opt no-new-privileges)
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY="${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
PACKAGES=(podman runc netavark aardvark-dns iptables mmdebstrap docker-compose python3 python3-yaml)
# Debian's python3 (python3-yaml above), not whichever PATH finds first: .ci/run
# puts virtual environments of its own ahead of it.
PY=/usr/bin/python3

PASSED=0
FAILED=0
WORK=""
SERVICE_PID=""
TICKER_PID=""
START=$SECONDS

say() { printf 'smoke: %s\n' "$*" >&2; }
pass() {
    PASSED=$((PASSED + 1))
    printf 'ok   %s\n' "$1"
}
fail() {
    FAILED=$((FAILED + 1))
    printf 'FAIL %s\n' "$1"
    shift
    local line
    for line in "$@"; do printf '       %s\n' "$line"; done
}
# finish: the count; its status is the script's (the EXIT trap cleans up).
finish() {
    printf '%s passed, %s failed (%s s)\n' "$PASSED" "$FAILED" "$((SECONDS - START))"
    [ "$FAILED" -eq 0 ]
}
# check NAME COMMAND...: pass if the command succeeds, else fail with its output.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$name"
    else
        fail "$name" "$(printf '%s\n' "$out" | tail -n 15)"
    fi
}
# The machine cannot run containers: skip, or fail under CI.
cannot_run() {
    say "this machine cannot run containers: $*"
    if [ -n "${CI:-}" ]; then
        say "under CI (CI is set) that is a failure"
        exit 1
    fi
    say "skipped (with CI set this would fail)"
    exit 0
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [ -n "$TICKER_PID" ] && kill "$TICKER_PID" 2>/dev/null && wait "$TICKER_PID" 2>/dev/null
    if [ -n "$SERVICE_PID" ]; then
        kill "$SERVICE_PID" 2>/dev/null
        wait "$SERVICE_PID" 2>/dev/null
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ -f "$WORK/storage.conf" ]; then
            podman rm --all --force --time 0 >/dev/null 2>&1
            podman pod rm --all --force >/dev/null 2>&1
            podman volume rm --all --force >/dev/null 2>&1
            podman network ls --format '{{.Name}}' 2>/dev/null | grep -vx podman |
                xargs -r podman network rm --force >/dev/null 2>&1
            podman rmi --all --force >/dev/null 2>&1
        fi
        # Whatever podman left mounted in its store.
        awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
            xargs -r -n 1 umount -l 2>/dev/null
        rm -rf "$WORK"
    fi
    say "cleaned up ($((SECONDS - START)) s in all)"
    exit "$rc"
}

# --- the machine --------------------------------------------------------------------------

[ "$(uname -s)" = Linux ] || cannot_run "not Linux"
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n --preserve-env=CI,DEBIAN_MIRROR,DEBIAN_SECURITY bash "$ROOT/deploy/smoke.sh" "$@"
fi
[ "$(id -u)" -eq 0 ] || cannot_run "it needs root, or sudo without a password (podman as root, mmdebstrap, apt-get)"
command -v apt-get >/dev/null 2>&1 || cannot_run "no apt-get: not a Debian machine"

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]} (Debian packages)"
    t=$SECONDS
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null; }; then
        cannot_run "apt-get could not install ${missing[*]}"
    fi
    say "installed in $((SECONDS - t)) s"
fi

WORK=$(mktemp -d /var/tmp/vfio-smoke.XXXXXX) || exit 1
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$WORK/storage" "$WORK/run" "$WORK/networks" "$WORK/tmp"
export CONTAINERS_CONF="$WORK/containers.conf" CONTAINERS_STORAGE_CONF="$WORK/storage.conf"
unset DOCKER_HOST CONTAINER_HOST

# containers.conf: runc (crun fails on hybrid cgroups), cgroupfs and a file
# for events (no systemd), networks in the store; ulimits below.
containers_conf() {
    cat >"$CONTAINERS_CONF" <<EOF
[containers]
$1
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$WORK/tmp"
[network]
network_config_dir = "$WORK/networks"
EOF
}
storage_conf() {
    cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "$1"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
}
containers_conf ""
storage_conf overlay
if ! podman info >/dev/null 2>&1; then
    say "podman's overlay storage does not work here, trying vfs (slower)"
    storage_conf vfs
    out=$(podman info 2>&1) || cannot_run "podman does not work: $(printf '%s' "$out" | tail -n 3)"
fi
say "podman $(podman version --format '{{.Client.Version}}'), storage $(podman info --format '{{.Store.GraphDriverName}}'), runtime runc"

# Default ulimits: podman gives containers its own defaults (nofile 1048576
# and more), which it cannot grant without CAP_SYS_RESOURCE; give them the
# limits podman itself runs with (it sets its own at start), read from a
# short-lived podman process.
podman system service --time=0 "unix://$WORK/probe.sock" >/dev/null 2>&1 &
probe=$!
for _ in $(seq 50); do [ -S "$WORK/probe.sock" ] && break; sleep 0.1; done
nofile=$(awk '/^Max open files/ { print $5 }' "/proc/$probe/limits" 2>/dev/null)
nproc=$(awk '/^Max processes/ { print $4 }' "/proc/$probe/limits" 2>/dev/null)
kill "$probe" 2>/dev/null
wait "$probe" 2>/dev/null
ulimits=()
[[ "$nofile" =~ ^[0-9]+$ ]] && ulimits+=("\"nofile=$nofile:$nofile\"")
[[ "$nproc" =~ ^[0-9]+$ ]] && ulimits+=("\"nproc=$nproc:$nproc\"")
containers_conf "default_ulimits = [$(IFS=,; echo "${ulimits[*]}")]"

# --- the stand-in base and the images -----------------------------------------------------

# As Debian's own container images: apt keeps no package caches.
cat >"$WORK/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
say "making the stand-in base $BASE_IMAGE (mmdebstrap, bookworm)"
t=$SECONDS
# shellcheck disable=SC2016 # the hook's $1 (the rootfs) is mmdebstrap's to expand
if ! mmdebstrap --quiet --variant=minbase \
    --include=python3.11,python3.11-venv,python3-pip,python-is-python3,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="copy-in $WORK/docker-clean /etc/apt/apt.conf.d" \
    --customize-hook='rm -f "$1"/var/cache/apt/*.bin' \
    bookworm "$WORK/base.tar" \
    "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
    "deb $DEBIAN_SECURITY bookworm-security main" >"$WORK/mmdebstrap.log" 2>&1; then
    tail -n 20 "$WORK/mmdebstrap.log" >&2
    cannot_run "mmdebstrap could not make the base (above)"
fi
podman import --quiet --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' \
    "$WORK/base.tar" "$BASE_IMAGE" >/dev/null || cannot_run "podman import failed"
rm -f "$WORK/base.tar"
say "base made in $((SECONDS - t)) s"

# Can this machine run a container at all?
if ! out=$(podman run --rm --network none "$BASE_IMAGE" true 2>&1); then
    cannot_run "podman run fails: $(printf '%s' "$out" | tail -n 3)"
fi

# The build reaches PyPI through this machine's proxy: the host's CA bundle is
# mounted over the base's for the build steps only (Debian's pip reads that
# file); no pip configuration of the machine (tests/deploy/test_dockerfile.py
# replays the build without one too).
CA_BUNDLE="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
BUILD=(podman build --format docker --network host --build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -f "$CA_BUNDLE" ] && BUILD+=(--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")

say "building $IMAGE from deploy/Dockerfile"
t=$SECONDS
if ! "${BUILD[@]}" -f deploy/Dockerfile -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1; then
    fail "podman build --format docker -f deploy/Dockerfile" "$(tail -n 25 "$WORK/build.log")"
    printf '%s passed, %s failed\n' "$PASSED" "$FAILED"
    exit 1
fi
pass "podman build --format docker -f deploy/Dockerfile ($((SECONDS - t)) s)"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" |
    awk -F'\t' '$1 != "0 B" { printf "smoke:   layer %9s  %.90s\n", $1, $2 }' >&2
say "image size $(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) in all"

# The Prometheus of compose.yaml, made from the same base and Debian's
# prometheus (wget for compose's health check), under compose.yaml's name.
PROMETHEUS_IMAGE=$("$PY" -c '
import sys, yaml
print(yaml.safe_load(open(sys.argv[1]))["services"]["prometheus"]["image"])' deploy/compose.yaml)
if [ -z "$PROMETHEUS_IMAGE" ]; then
    fail "compose.yaml names the Prometheus image" "no services.prometheus.image read (see above)"
    finish
    exit 1
fi
mkdir -p "$WORK/prometheus"
cat >"$WORK/prometheus/Containerfile" <<'EOF'
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus wget && rm -rf /var/lib/apt/lists/* && install -d -o nobody -g nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
t=$SECONDS
if "${BUILD[@]}" -t "$PROMETHEUS_IMAGE" "$WORK/prometheus" >"$WORK/prometheus.log" 2>&1; then
    say "stand-in $PROMETHEUS_IMAGE built in $((SECONDS - t)) s"
else
    fail "the stand-in Prometheus image" "$(tail -n 15 "$WORK/prometheus.log")"
fi

# --- 1. the image -------------------------------------------------------------------------

healthcheck=$(podman image inspect "$IMAGE" | "$PY" -c '
import json, sys
print(" ".join(json.load(sys.stdin)[0].get("Healthcheck", {}).get("Test", [])))')
if [[ "$healthcheck" == *grpc-health-check* ]]; then
    pass "the image keeps its HEALTHCHECK ($healthcheck)"
else
    fail "the image keeps its HEALTHCHECK" "found: '$healthcheck'"
fi
# One-shot runs of the image say --health-cmd none: with no systemd for its
# health timers, podman would print an error for every run.
check "the runtime venv has no pip or setuptools" \
    podman run --rm --network none --health-cmd none "$IMAGE" python -c '
import importlib.util, sys
found = [m for m in ("pip", "setuptools") if importlib.util.find_spec(m)]
sys.exit(f"in the venv {sys.prefix}: {found}" if found else 0)'
# shellcheck disable=SC2016 # for the container's shell
check "the scenario files are in the working directory (examples/)" \
    podman run --rm --network none --health-cmd none "$IMAGE" sh -c \
    'test "$(pwd)" = /home/vfio && test -f examples/reinit.yaml && ls examples/exam/*.yaml >/dev/null && fwemu serve --help >/dev/null'
# The image's CA bundle is its base's (the build mounted the host's, never
# copied it), and it holds no pip configuration.
ca_and_pip_config() {
    local base image
    base=$(podman run --rm --network none "$BASE_IMAGE" sha256sum /etc/ssl/certs/ca-certificates.crt) || return 1
    image=$(podman run --rm --network none --health-cmd none "$IMAGE" sha256sum /etc/ssl/certs/ca-certificates.crt) || return 1
    if [ "$base" != "$image" ]; then
        printf 'base: %s\nimage: %s\n' "$base" "$image"
        return 1
    fi
    podman run --rm --network none --health-cmd none "$IMAGE" sh -c '! test -e /etc/pip.conf && ! test -e /etc/xdg/pip'
}
check "the build's CA bundle and no pip configuration are baked into the image" ca_and_pip_config

# --- 2, 3. the services as containers -----------------------------------------------------

# wait_healthy CONTAINER SECONDS: `podman healthcheck run` until it passes.
wait_healthy() {
    local deadline=$((SECONDS + $2))
    while [ "$SECONDS" -lt "$deadline" ]; do
        podman healthcheck run "$1" >/dev/null 2>&1 && return 0
        [ "$(podman inspect --format '{{.State.Running}}' "$1" 2>/dev/null)" = true ] || break
        sleep 1
    done
    echo "$1 not healthy after $2 s; its log:"
    podman logs --tail 15 "$1" 2>&1
    return 1
}
# stopped_cleanly CONTAINER...: SIGTERM (the image's STOPSIGNAL), exit status 0.
stopped_cleanly() {
    local c code bad=0
    podman stop --time 30 "$@" >/dev/null 2>&1
    for c in "$@"; do
        code=$(podman inspect --format '{{.State.ExitCode}} {{.State.Status}}' "$c" 2>&1)
        if [ "$code" != "0 exited" ]; then
            echo "$c: $code"
            bad=1
        fi
    done
    return "$bad"
}
# As the user the image names, root read-only, no capabilities left.
confined() {
    local c=$1 out
    out=$(podman exec "$c" sh -c 'id -u; grep CapEff /proc/1/status; touch /opt/x 2>&1 || echo read-only') || return 1
    printf '%s\n' "$out"
    [[ "$out" == 10001*"CapEff:"*"0000000000000000"*read-only* ]]
}

# The README's one-container lines: `vfioctl demo` (everything in one
# process) and `fwemu serve --scenario examples/reinit.yaml` (its 8 VFs).
check "README: vfioctl demo in one container (confined), REINIT and equal digests" \
    podman run --rm --network none --health-cmd none "${SECURE[@]}" "$IMAGE" vfioctl demo
scenario_fwemu() {
    local c="$PREFIX-scenario" vfs rc=0
    podman run -d --quiet --name "$c" --network none "${SECURE[@]}" "$IMAGE" \
        fwemu serve --scenario examples/reinit.yaml --listen 0.0.0.0:50051 --insecure >/dev/null 2>&1 || return 1
    if wait_healthy "$c" 60; then
        vfs=$(podman exec "$c" vfioctl --json scenario --firmware 127.0.0.1:50051 vfs) || rc=1
        [ "$rc" -ne 0 ] || [ "$(printf '%s' "$vfs" | "$PY" -c 'import json, sys; print(len(json.load(sys.stdin)["vfs"]))')" = 8 ] || {
            echo "not 8 VFs: $vfs"
            rc=1
        }
    else
        rc=1
    fi
    stopped_cleanly "$c" || rc=1
    podman rm --force "$c" >/dev/null 2>&1
    return "$rc"
}
check "README: fwemu serve --scenario examples/reinit.yaml in a container serves its 8 VFs" scenario_fwemu

NET="$PREFIX-net"
podman network create "$NET" >/dev/null || fail "podman network create"
for mode in plain k8s; do
    opts=()
    [ "$mode" = k8s ] && opts=("${SECURE[@]}")
    fw="$PREFIX-$mode-fwemu" drv="$PREFIX-$mode-driver"
    # fwemu as the image's CMD has it; the driver with its firmware in the other container.
    podman run -d --quiet --name "$fw" --network "$NET" "${opts[@]}" "$IMAGE" >/dev/null 2>&1
    podman run -d --quiet --name "$drv" --network "$NET" "${opts[@]}" \
        --env HEALTH_ADDR=127.0.0.1:50052 "$IMAGE" \
        vfio-driver serve --listen 0.0.0.0:50052 --insecure --firmware "$fw:50051" \
        --firmware-wait 60 --memory remote --metrics-listen 0.0.0.0:9102 >/dev/null 2>&1
    label="as UID 10001"
    [ "$mode" = k8s ] && label="as UID 10001, read-only root, no capabilities, no-new-privileges"
    check "fwemu passes its health check ($label)" wait_healthy "$fw" 60
    check "vfio-driver passes its health check ($label)" wait_healthy "$drv" 60
    if [ "$mode" = k8s ]; then
        check "fwemu runs confined (UID, capabilities, read-only root)" confined "$fw"
        check "vfio-driver runs confined (UID, capabilities, read-only root)" confined "$drv"
        # The demo from a third container, as confined: the data over gRPC.
        if out=$(podman run --rm --network "$NET" "${SECURE[@]}" "$IMAGE" \
            vfioctl demo --json --driver "$drv:50052" --scenario "$fw:50051" 2>"$WORK/demo.err"); then
            rc=0
        else
            rc=$?
        fi
        if summary=$(printf '%s' "$out" | "$PY" -c '
import json, sys
r = json.load(sys.stdin)
rep = r["report"]
reinits = len(rep.get("reinits", []))
print("%s -> %s, status %s, %d REINIT, digests %s / %s" % (r["source"], r["destination"],
      rep["status"], reinits, r["source_digest"], r["destination_digest"]))
sys.exit(0 if r["equal"] and rep["status"] == "completed" else 1)' 2>&1) && [ "$rc" -eq 0 ]; then
            pass "demo across two service containers: equal digests ($summary)"
        else
            fail "demo across two service containers: equal digests" "exit $rc: $summary" \
                "$(printf '%s\n' "$out" | tail -n 15)" "$(tail -n 10 "$WORK/demo.err")"
        fi
    fi
    check "SIGTERM stops fwemu and vfio-driver with exit 0 ($mode)" stopped_cleanly "$drv" "$fw"
done

# --- 4, 5. the compose stack --------------------------------------------------------------

# docker-compose (Debian's, v1) talks to podman's Docker API; podman-compose
# 1.6 with podman 4.3 ignores `condition: service_healthy`. No systemd runs
# the health checks on their timers: a loop does, for the project's containers.
PROJECT="$PREFIX"
export DOCKER_HOST="unix://$WORK/podman.sock"
podman system service --time=0 "$DOCKER_HOST" >"$WORK/service.log" 2>&1 &
SERVICE_PID=$!
for _ in $(seq 100); do [ -S "$WORK/podman.sock" ] && break; sleep 0.1; done
(
    while sleep 1; do
        for c in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
            podman healthcheck run "$c" >/dev/null 2>&1
        done
    done
) &
TICKER_PID=$!

COMPOSE=(docker-compose --project-name "$PROJECT" --file deploy/compose.yaml)
# The stack's published ports, free ones: another run (or a stack someone
# left up) holds the defaults.
read -r FWEMU_PORT DRIVER_PORT PROMETHEUS_PORT GRAFANA_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export FWEMU_PORT DRIVER_PORT PROMETHEUS_PORT GRAFANA_PORT
# Everything but Grafana (no reachable registry ships it): `migrate` brings
# certs, fwemu and the driver in health order.
t=$SECONDS
if timeout 300 "${COMPOSE[@]}" up --detach --no-build migrate prometheus >"$WORK/compose.log" 2>&1; then
    pass "docker-compose up (podman's Docker API) in $((SECONDS - t)) s"
else
    fail "docker-compose up (podman's Docker API)" "$(tail -n 25 "$WORK/compose.log")"
fi

container() { "${COMPOSE[@]}" ps -q "$1" 2>/dev/null | head -n 1; }
# The start order against the health checks' own record: each service started
# after what it depends on completed (certs) or passed a health check.
ids=()
for s in certs fwemu driver migrate; do
    c=$(container "$s")
    [ -n "$c" ] && ids+=("$c")
done
if order=$([ "${#ids[@]}" -gt 0 ] && podman inspect "${ids[@]}" | "$PY" -c '
import datetime as dt, json, re, sys

def when(text):
    text = re.sub(r"(\.\d{6})\d*", r"\1", text.replace("Z", "+00:00"))
    text = re.sub(r" ([+-]\d\d:\d\d)( \w+)?$", r"\1", text.replace("T", " "))
    return dt.datetime.fromisoformat(text)

docs = json.load(sys.stdin)
by = {d["Config"]["Labels"]["com.docker.compose.service"]: d for d in docs}
def healthy(name):
    log = (by[name]["State"].get("Health") or by[name]["State"].get("Healthcheck") or {}).get("Log") or []
    ok = [when(e["End"]) for e in log if e["ExitCode"] == 0]
    return min(ok) if ok else None
start = {n: when(d["State"]["StartedAt"]) for n, d in by.items()}
problems = []
if set(by) != {"certs", "fwemu", "driver", "migrate"}:
    problems.append(f"containers: {sorted(by)}")
else:
    done = when(by["certs"]["State"]["FinishedAt"])
    if by["certs"]["State"]["ExitCode"] != 0 or done > start["fwemu"]:
        problems.append("fwemu started before certs completed")
    for first, then in (("fwemu", "driver"), ("driver", "migrate")):
        h = healthy(first)
        if h is None or h > start[then]:
            problems.append(f"{then} started at {start[then]}, {first} first healthy at {h}")
print("; ".join(problems) or "certs -> fwemu healthy -> driver healthy -> migrate")
sys.exit(1 if problems else 0)' 2>&1); then
    pass "health order: $order"
else
    fail "health order" "$order"
fi

# The demo job: REINIT and equal digests in its report, exit 0.
migrate=$(container migrate)
code=$([ -n "$migrate" ] && timeout 180 podman wait "$migrate" 2>/dev/null)
report=$([ -n "$migrate" ] && podman logs "$migrate" 2>&1)
reinits=$(printf '%s\n' "$report" | grep -E '^ *REINIT ' | grep -vc 'none seen')
if [ "$code" = 0 ] && [ "$reinits" -gt 0 ] && printf '%s\n' "$report" | grep -q 'verified *digests equal'; then
    pass "compose demo (migrate): $reinits REINIT, digests equal, exit 0"
else
    fail "compose demo (migrate): a REINIT, digests equal, exit 0" "exit ${code:-none}, $reinits REINIT:" \
        "$(printf '%s\n' "$report" | tail -n 20)"
fi

# Prometheus scrapes both services: `up` is 1 for each job.
targets=""
for _ in $(seq 60); do
    targets=$("$PY" -c '
import json, sys, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/v1/query?query=up"
result = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
up = {r["metric"]["job"]: r["value"][1] for r in result}
print(", ".join(f"{j} up={v}" for j, v in sorted(up.items())))
sys.exit(0 if up.get("fwemu") == "1" and up.get("vfio-driver") == "1" else 1)' "$PROMETHEUS_PORT" 2>&1) && break
    sleep 1
done
if [[ "$targets" == *"fwemu up=1"*"vfio-driver up=1"* ]]; then
    pass "Prometheus scrapes both services ($targets)"
else
    fail "Prometheus scrapes both services" "$targets"
fi

services=()
for s in fwemu driver prometheus; do
    c=$(container "$s")
    [ -n "$c" ] && services+=("$c")
done
kill "$TICKER_PID" 2>/dev/null
wait "$TICKER_PID" 2>/dev/null
TICKER_PID=""
if [ "${#services[@]}" -eq 3 ]; then
    check "SIGTERM stops the compose services (fwemu, driver, prometheus) with exit 0" \
        stopped_cleanly "${services[@]}"
else
    fail "SIGTERM stops the compose services" "running: ${#services[@]} of 3"
fi
timeout 120 "${COMPOSE[@]}" down --volumes --timeout 10 >>"$WORK/compose.log" 2>&1 ||
    fail "docker-compose down --volumes" "$(tail -n 10 "$WORK/compose.log")"

finish
