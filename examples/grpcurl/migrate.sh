#!/usr/bin/env bash
# A REINIT-aware precopy migration of one VFIO device to another over the
# vfio.v1 gRPC API, with grpcurl and jq only: the steps of
# examples/node/migrate.js (and of QEMU 11.1), one grpcurl call per system call.
#
#   examples/grpcurl/migrate.sh [--driver HOST:PORT] [--scenario HOST:PORT] [--json] SRC DST
#
# grpcurl reads the proto files (no reflection); every call names this
# process with `x-vfio-client: grpcurl-PID`.  Without a Session stream the
# driver keeps our fds until we close them: the EXIT trap closes every one
# (and, after a failure, puts the source back to RUNNING and resets the
# destination).  README.md beside this file.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: migrate.sh [--driver HOST:PORT] [--scenario HOST:PORT] [--json] SOURCE DESTINATION

Migrate the VFIO device SOURCE to DESTINATION (PCI names) with precopy, the
switchover-ack re-armed on every VFIO_PRECOPY_INFO_REINIT, stop-copy, and a
comparison of the firmware digests.  --driver defaults to $VFIO_DRIVER, else
127.0.0.1:50052; --scenario to $VFIO_SCENARIO, else the driver's address.
TLS: VFIO_TLS_CA, VFIO_TLS_CERT, VFIO_TLS_KEY (none: plaintext).
Exit status: 0 migrated with equal digests, 1 failed, 2 usage.
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DRIVER=${VFIO_DRIVER:-127.0.0.1:50052}
SCENARIO=${VFIO_SCENARIO:-}
JSON=0
MAX_DIRTY=${MAX_DIRTY:-1048576} # switch over once dirty_bytes is at most this
MAX_ROUNDS=${MAX_ROUNDS:-100}   # ... or after this many rounds; no ack after twice as many fails
BUFFER_CAP=1048576              # QEMU's VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE
REINIT=1                        # PrecopyInfoFlag.PRECOPY_INFO_FLAG_REINIT (vfio.proto)

ARGS=()
while (($#)); do
    case $1 in
        --driver) DRIVER=${2:?--driver needs HOST:PORT}; shift 2 ;;
        --scenario) SCENARIO=${2:?--scenario needs HOST:PORT}; shift 2 ;;
        --json) JSON=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "migrate.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
if ((${#ARGS[@]} != 2)); then usage >&2; exit 2; fi
SRC_NAME=${ARGS[0]} DST_NAME=${ARGS[1]}
if [[ $SRC_NAME == "$DST_NAME" ]]; then
    echo "migrate.sh: SOURCE and DESTINATION are the same device" >&2; exit 2
fi
SCENARIO=${SCENARIO:-$DRIVER}
for tool in grpcurl jq; do
    command -v "$tool" >/dev/null || { echo "migrate.sh: $tool is not on PATH (README.md)" >&2; exit 2; }
done

GRPCURL=(grpcurl -import-path "$ROOT/proto" -import-path "$ROOT/third_party/googleapis"
    -proto vfio/v1/vfio.proto -proto fwemu/api/v1/scenario.proto -proto google/rpc/error_details.proto
    -H "x-vfio-client: grpcurl-$$" -emit-defaults -format-error -max-msg-sz 67108864)
if [[ -n ${VFIO_TLS_CA:-}${VFIO_TLS_CERT:-}${VFIO_TLS_KEY:-} ]]; then
    [[ -n ${VFIO_TLS_CA:-} ]] && GRPCURL+=(-cacert "$VFIO_TLS_CA")
    [[ -n ${VFIO_TLS_CERT:-} ]] && GRPCURL+=(-cert "$VFIO_TLS_CERT")
    [[ -n ${VFIO_TLS_KEY:-} ]] && GRPCURL+=(-key "$VFIO_TLS_KEY")
else
    GRPCURL+=(-plaintext)
fi

TMP=$(mktemp -d)
OPEN_FDS=()     # every fd we opened and have not closed, in order
TOUCHED=0       # a state change was asked for
DONE=0
RESULT=failed ERRNO_NAME="" ERRNO="" ERROR=""
REINITS=0 ROUNDS=0 PRECOPY_BYTES=0 STOP_COPY_BYTES=0 SRC_DIGEST="" DST_DIGEST=""
SRC_FD="" DST_FD="" SRC_DATA="" DST_DATA=""

log() { echo "migrate.sh: $*" >&2; }

# call SERVICE/METHOD JSON: the answer in $OUT.  A failed call returns 1 with
# the errno of its google.rpc.ErrorInfo in $ERRNO_NAME/$ERRNO, and $ERROR.
call() {
    local target=$DRIVER
    [[ $1 == fwemu.* ]] && target=$SCENARIO
    if "${GRPCURL[@]}" -d "$2" "$target" "$1" >"$TMP/out" 2>"$TMP/err"; then
        OUT=$(<"$TMP/out")
        return 0
    fi
    failed "${1##*/}" "$TMP/err"
    return 1
}

# failed WHAT FILE: decode grpcurl's -format-error JSON status in FILE.
failed() {
    local status
    if status=$(jq -ec . "$2" 2>/dev/null); then
        ERRNO_NAME=$(jq -r '[.details[]? | select(."@type" | endswith("google.rpc.ErrorInfo")) | .reason][0] // ""' <<<"$status")
        ERRNO=$(jq -r '[.details[]? | select(."@type" | endswith("google.rpc.ErrorInfo")) | .metadata.errno][0] // ""' <<<"$status")
        ERROR="$1: ${ERRNO_NAME:-code $(jq -r .code <<<"$status")}${ERRNO:+ (errno $ERRNO)}: $(jq -r .message <<<"$status")"
    else
        ERRNO_NAME="" ERRNO="" ERROR="$1: $(tr '\n' ' ' <"$2")"
    fi
}

die() {
    ERROR=${1:-$ERROR}
    exit 1
}

vfio() { call "vfio.v1.Vfio/$1" "$2"; }

# The typed DeviceFeature: feature FD OP FEATURE [VALUE-JSON].
feature() { vfio DeviceFeature "{\"fd\": $1, \"typed\": {\"$2\": true, \"$3\": ${4:-{\}}}}"; }

forget_fd() {
    local keep=() fd
    for fd in "${OPEN_FDS[@]}"; do [[ $fd == "$1" ]] || keep+=("$fd"); done
    OPEN_FDS=("${keep[@]}")
}

close_fd() {
    [[ -n $1 ]] || return 0
    forget_fd "$1"
    vfio CloseFd "{\"fd\": $1}" || [[ $ERRNO_NAME == EBADF ]] || log "CloseFd($1): $ERROR"
}

# get_state FD: the device's state in $STATE (DEVICE_MIG_STATE_*).
get_state() {
    feature "$1" get migDeviceState || return 1
    STATE=$(jq -r .typed.migDeviceState.deviceState <<<"$OUT")
}

# set_fd FD STATE: SET MIG_DEVICE_STATE; $NEW_FD is the data fd it opened, or "".
set_fd() {
    feature "$1" set migDeviceState "{\"deviceState\": \"DEVICE_MIG_STATE_$2\"}" || return 1
    NEW_FD=$(jq -r '.typed.migDeviceState.dataFd' <<<"$OUT")
    if ((NEW_FD >= 0)); then OPEN_FDS+=("$NEW_FD"); else NEW_FD=""; fi
}

# set_state SIDE STATE RECOVERY (QEMU's vfio_migration_set_state): STATE,
# else RECOVERY, else close SIDE's data fd and reset the device.  Fails the
# migration unless STATE was reached.
set_state() {
    local side=$1 state=$2 recovery=$3 fd why
    TOUCHED=1
    if [[ $side == source ]]; then fd=$SRC_FD; else fd=$DST_FD; fi
    if set_fd "$fd" "$state"; then
        log "$side: -> $state${NEW_FD:+ (data fd $NEW_FD)}"
        return 0
    fi
    why="$side: -> $state failed: $ERROR"
    local name=$ERRNO_NAME no=$ERRNO
    if [[ -n $recovery ]]; then
        if set_fd "$fd" "$recovery"; then
            ERRNO_NAME=$name ERRNO=$no
            die "$why; recovered to $recovery"
        fi
        why+="; recovery $recovery failed: $ERROR"
    fi
    if [[ $side == source ]]; then close_fd "$SRC_DATA"; SRC_DATA=""; else close_fd "$DST_DATA"; DST_DATA=""; fi
    vfio DeviceReset "{\"fd\": $fd}" || log "$side: reset failed: $ERROR"
    ERRNO_NAME=$name ERRNO=$no
    die "$why; device reset"
}

# transfer PRECOPY: read the source's data fd (ReadStream) until it ends (OK
# at the end of the data; in precopy ENOMSG, nothing more for now), then write
# it all to the destination's in one Write stream.  $MOVED bytes, $EMPTY=1
# after ENOMSG.
transfer() {
    local precopy=$1
    EMPTY=0 MOVED=0
    if ! "${GRPCURL[@]}" -d "{\"fd\": $SRC_DATA, \"chunkSize\": $CHUNK}" "$DRIVER" vfio.v1.Vfio/ReadStream \
        >"$TMP/chunks" 2>"$TMP/err"; then
        failed ReadStream "$TMP/err"
        if [[ $precopy == 1 && $ERRNO_NAME == ENOMSG ]]; then EMPTY=1; else die; fi
    fi
    # base64 chunks -> one WriteRequest per chunk; bytes from the base64 lengths
    jq -c --argjson fd "$DST_DATA" 'select(.data != "") | {fd: $fd, data: .data}' "$TMP/chunks" >"$TMP/writes"
    [[ -s $TMP/writes ]] || return 0
    MOVED=$(jq -s '[.[].data | (length / 4 * 3) - (if endswith("==") then 2 elif endswith("=") then 1 else 0 end)] | add' "$TMP/writes")
    if ! "${GRPCURL[@]}" -d @ "$DRIVER" vfio.v1.Vfio/Write <"$TMP/writes" >"$TMP/out" 2>"$TMP/err"; then
        failed Write "$TMP/err"
        die
    fi
    local written
    written=$(jq -r .written "$TMP/out")
    ((written == MOVED)) || die "Write took $written of $MOVED bytes"
}

precopy_info() {
    vfio PrecopyInfo "{\"fd\": $SRC_DATA, \"argsz\": 24, \"flags\": 0}" || die
    INFO_FLAGS=$(jq -r .flags <<<"$OUT")
    INFO_INITIAL=$(jq -r '.initialBytes | tonumber' <<<"$OUT")
    INFO_DIRTY=$(jq -r '.dirtyBytes | tonumber' <<<"$OUT")
}

# take WHEN: the last PRECOPY_INFO into the cached counters; 0 if it was a
# REINIT (new initial data: the switchover-ack is needed again).
take() {
    if ((V2 && (INFO_FLAGS & REINIT))); then
        REINITS=$((REINITS + 1))
        INITIAL=$INFO_INITIAL DIRTY=0 INIT_SENT=0 ACK_PENDING=1
        log "REINIT ($1): initial_bytes $INFO_INITIAL; switchover-ack re-armed"
        return 0
    fi
    INITIAL=$INFO_INITIAL DIRTY=$INFO_DIRTY
    return 1
}

abort() {
    log "aborting: $ERROR"
    close_fd "$SRC_DATA"; SRC_DATA=""
    close_fd "$DST_DATA"; DST_DATA=""
    if [[ -n $SRC_FD ]]; then
        get_state "$SRC_FD" || STATE=ERROR
        if [[ $STATE != DEVICE_MIG_STATE_RUNNING ]]; then
            if set_fd "$SRC_FD" RUNNING; then
                log "abort: source -> RUNNING"
            elif vfio DeviceReset "{\"fd\": $SRC_FD}"; then
                log "abort: source reset"
            else
                log "abort: source reset failed: $ERROR"
            fi
        fi
    fi
    if [[ -n $DST_FD ]]; then
        get_state "$DST_FD" || STATE=ERROR
        if [[ $STATE != DEVICE_MIG_STATE_RUNNING ]]; then
            if vfio DeviceReset "{\"fd\": $DST_FD}"; then
                log "abort: destination reset"
            else
                log "abort: destination reset failed: $ERROR"
            fi
        fi
    fi
}

finish() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if ((rc != 0 && TOUCHED && !DONE)); then
        local name=$ERRNO_NAME no=$ERRNO err=$ERROR
        abort
        ERRNO_NAME=$name ERRNO=$no ERROR=$err
    fi
    local i
    for ((i = ${#OPEN_FDS[@]} - 1; i >= 0; i--)); do # data fds (opened last) first
        vfio CloseFd "{\"fd\": ${OPEN_FDS[i]}}" || log "CloseFd(${OPEN_FDS[i]}): $ERROR"
    done
    rm -rf "$TMP"
    ((DONE)) && RESULT=completed
    if ((JSON)); then
        jq -n --arg result "$RESULT" --arg source "$SRC_NAME" --arg destination "$DST_NAME" \
            --arg client "grpcurl-$$" --argjson rounds "$ROUNDS" --argjson reinits "$REINITS" \
            --argjson precopy_bytes "$PRECOPY_BYTES" --argjson stop_copy_bytes "$STOP_COPY_BYTES" \
            --arg source_digest "$SRC_DIGEST" --arg destination_digest "$DST_DIGEST" \
            --arg errno "$ERRNO" --arg errno_name "$ERRNO_NAME" --arg error "$ERROR" \
            '$ARGS.named + {errno: ($errno | if . == "" then null else tonumber end),
              digests_equal: ($source_digest != "" and $source_digest == $destination_digest)}'
    elif ((DONE)); then
        echo "migrated $SRC_NAME -> $DST_NAME: $PRECOPY_BYTES bytes in precopy ($ROUNDS rounds)," \
            "$STOP_COPY_BYTES in stop-copy, $REINITS REINIT"
        echo "  source digest      $SRC_DIGEST"
        echo "  destination digest $DST_DIGEST"
    else
        echo "migrate.sh: $RESULT${ERRNO_NAME:+ [$ERRNO_NAME${ERRNO:+ $ERRNO}]}: $ERROR" >&2
    fi
    if ((rc == 0 && !DONE)); then rc=1; fi
    exit "$rc"
}
trap finish EXIT
trap 'ERROR=interrupted; exit 130' INT TERM

# --- open, discover, opt in ---------------------------------------------------------------
vfio ListDevices '{}' || die
DEVICES=$OUT
vhca_of() { jq -r --arg n "$1" 'first(.devices[] | select(.name == $n) | .vhcaId) // ""' <<<"$DEVICES"; }
vfio OpenDevice "{\"name\": \"$SRC_NAME\"}" || die
SRC_FD=$(jq .fd <<<"$OUT") && OPEN_FDS+=("$SRC_FD")
vfio OpenDevice "{\"name\": \"$DST_NAME\"}" || die
DST_FD=$(jq .fd <<<"$OUT") && OPEN_FDS+=("$DST_FD")
SRC_VHCA=$(vhca_of "$SRC_NAME") DST_VHCA=$(vhca_of "$DST_NAME")

RESULT=refused
feature "$SRC_FD" get migration || die "not migratable: $ERROR"
FLAGS=$(jq -c .typed.migration <<<"$OUT")
feature "$DST_FD" get migration || die "not migratable: $ERROR"
if [[ $(jq .stopCopy <<<"$FLAGS") != true || $(jq .typed.migration.stopCopy <<<"$OUT") != true ]]; then
    die "not migratable: no VFIO_MIGRATION_STOP_COPY"
fi
P2P=$(jq -r '.p2p' <<<"$FLAGS") PRE_COPY=$(jq -r '.preCopy' <<<"$FLAGS")
log "source migration flags $(jq -r .flags <<<"$FLAGS") (p2p $P2P, pre_copy $PRE_COPY)"
[[ -n $SRC_VHCA && -n $DST_VHCA ]] || die "cannot verify: ListDevices does not list both devices"
for vhca in "$SRC_VHCA" "$DST_VHCA"; do
    call fwemu.api.v1.Scenario/GetDigest "{\"vhcaId\": $vhca}" || die "cannot verify: $ERROR"
done
RESULT=failed

V2=0
if [[ $PRE_COPY == true ]]; then
    if feature "$SRC_FD" set migPrecopyInfoV2; then V2=1; else log "MIG_PRECOPY_INFOv2 opt-in failed ($ERROR): v1"; fi
fi
feature "$SRC_FD" get migDataSize || die
SIZE=$(jq -r '.typed.migDataSize.stopCopyLength | tonumber' <<<"$OUT")
CHUNK=$((SIZE < 1 ? 1 : SIZE > BUFFER_CAP ? BUFFER_CAP : SIZE))
get_state "$SRC_FD" || die

# --- setup: destination RESUMING, source PRE_COPY ----------------------------------------
set_state destination RESUMING ""
DST_DATA=$NEW_FD
PRECOPY=0
if [[ $PRE_COPY == true && $STATE == DEVICE_MIG_STATE_RUNNING ]]; then
    PRECOPY=1
    set_state source PRE_COPY RUNNING
    SRC_DATA=$NEW_FD

    # --- precopy rounds ---------------------------------------------------------------
    ACK_PENDING=1 INIT_SENT=0 INITIAL=0 DIRTY=0
    precopy_info
    take "first PRECOPY_INFO" || true
    while :; do
        ROUNDS=$((ROUNDS + 1))
        ACKED_BEFORE=$((!ACK_PENDING)) # an ack given this round counts from the next
        transfer 1
        PRECOPY_BYTES=$((PRECOPY_BYTES + MOVED))
        FROM_INITIAL=$((MOVED < INITIAL ? MOVED : INITIAL))
        INITIAL=$((INITIAL - FROM_INITIAL))
        DIRTY=$((DIRTY - (MOVED - FROM_INITIAL))) && ((DIRTY >= 0)) || DIRTY=0
        ((EMPTY)) && INITIAL=0 DIRTY=0
        if ((INITIAL == 0 && !INIT_SENT)); then
            INIT_SENT=1 ACK_PENDING=0 # all of it written: the destination approves
        fi
        precopy_info
        if ! take "round $ROUNDS"; then
            if ((ACKED_BEFORE && !ACK_PENDING && INITIAL == 0 && (DIRTY <= MAX_DIRTY || ROUNDS >= MAX_ROUNDS))); then
                precopy_info # the switchover decision's last check: a REINIT must not be missed
                if ! take "after the switchover decision" && ((INFO_INITIAL == 0)); then
                    log "switchover after $ROUNDS rounds (dirty $INFO_DIRTY bytes)"
                    break
                fi
            fi
        fi
        ((ROUNDS < 2 * MAX_ROUNDS)) || die "no switchover-ack after $ROUNDS precopy rounds"
        sleep 0.02
    done
fi

# --- switchover ---------------------------------------------------------------------------
if [[ $P2P == true ]]; then
    if ((PRECOPY)); then set_state source PRE_COPY_P2P RUNNING; else set_state source RUNNING_P2P RUNNING; fi
fi
((PRECOPY)) || set_state source STOP RUNNING
set_state source STOP_COPY STOP
[[ -n $NEW_FD ]] && SRC_DATA=$NEW_FD
[[ -n $SRC_DATA ]] || die "STOP_COPY has no data fd"
transfer 0
STOP_COPY_BYTES=$MOVED
log "stop-copy: $MOVED bytes"
close_fd "$DST_DATA"; DST_DATA=""
set_state destination STOP ""
call fwemu.api.v1.Scenario/GetDigest "{\"vhcaId\": $SRC_VHCA}" || die
SRC_DIGEST=$(jq -r .digest <<<"$OUT")
call fwemu.api.v1.Scenario/GetDigest "{\"vhcaId\": $DST_VHCA}" || die
DST_DIGEST=$(jq -r .digest <<<"$OUT")
[[ -n $SRC_DIGEST && $SRC_DIGEST == "$DST_DIGEST" ]] ||
    die "verification failed: destination digest $DST_DIGEST != source digest $SRC_DIGEST"
[[ $P2P == true ]] && set_state destination RUNNING_P2P ""
set_state destination RUNNING ""
set_state source STOP ""
close_fd "$SRC_DATA"; SRC_DATA=""
DONE=1
