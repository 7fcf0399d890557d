# Shell helpers available in every guest as /etc/guest/lib.sh (busybox sh).
# Usage in a guest script:  . /etc/guest/lib.sh

NVMET=/sys/kernel/config/nvmet

# wait_for SECONDS COMMAND...: retry COMMAND every 0.1 s until it succeeds.
wait_for() {
  _t=$1; shift
  _n=$((_t * 10))
  while ! "$@" >/dev/null 2>&1; do
    _n=$((_n - 1))
    [ "$_n" -gt 0 ] || { echo "wait_for: timed out after ${_t}s: $*" >&2; return 1; }
    sleep 0.1
  done
}

# nvme_ctrl_for_nqn NQN: print the nvme controller (e.g. nvme0) connected to NQN.
nvme_ctrl_for_nqn() {
  for c in /sys/class/nvme/nvme*; do
    [ -e "$c/subsysnqn" ] || continue
    if [ "$(cat "$c/subsysnqn")" = "$1" ]; then basename "$c"; return 0; fi
  done
  return 1
}

# nvme_dev_for_uuid UUID: print /dev/nvmeXnY whose namespace uuid is UUID.
# (With native multipath, /sys/block also lists the hidden per-path devices
# nvmeXcYnZ, which have the same uuid but no /dev node: skip those.)
nvme_dev_for_uuid() {
  for b in /sys/block/nvme*; do
    [ -e "$b/uuid" ] && [ -b "/dev/$(basename "$b")" ] || continue
    if [ "$(cat "$b/uuid")" = "$1" ]; then echo "/dev/$(basename "$b")"; return 0; fi
  done
  return 1
}

# nvmet_export_file NQN FILE NSUUID HOSTNQN [TRADDR] [TRSVCID]: a file-backed
# kernel target namespace on a TCP port, only HOSTNQN allowed. Port id 1.
nvmet_export_file() {
  _sub=$NVMET/subsystems/$1
  mkdir "$_sub"
  echo 0 > "$_sub/attr_allow_any_host"
  mkdir -p "$NVMET/hosts/$4"
  ln -s "$NVMET/hosts/$4" "$_sub/allowed_hosts/$4"
  mkdir "$_sub/namespaces/1"
  echo "$2" > "$_sub/namespaces/1/device_path"
  echo "$3" > "$_sub/namespaces/1/device_uuid"
  echo 1 > "$_sub/namespaces/1/buffered_io"   # tmpfs has no O_DIRECT on 6.1
  echo 1 > "$_sub/namespaces/1/enable"
  mkdir -p "$NVMET/ports/1"
  echo tcp > "$NVMET/ports/1/addr_trtype"
  echo ipv4 > "$NVMET/ports/1/addr_adrfam"
  echo "${5:-127.0.0.1}" > "$NVMET/ports/1/addr_traddr"
  echo "${6:-4420}" > "$NVMET/ports/1/addr_trsvcid"
  ln -s "$_sub" "$NVMET/ports/1/subsystems/$1"
}

# nvmet_objects: list what exists in the kernel target (for assertions).
nvmet_objects() {
  find "$NVMET/subsystems" "$NVMET/hosts" "$NVMET/ports" -mindepth 1 -maxdepth 1 2>/dev/null
  find "$NVMET/ports" -path '*/subsystems/*' 2>/dev/null
}

# data_dir DIR [SIZE]: mount a fresh ext4 (on a loop device over a sparse file
# in RAM) at DIR for lvol backing files. The guest's root is tmpfs, which on
# Linux 6.1 lacks O_DIRECT and FALLOC_FL_ZERO_RANGE, so a file-backed nvmet
# namespace there fails WRITE ZEROES (mkfs and ext4 lazy init issue them).
data_dir() {
  mkdir -p "$1" /var/tmp/img
  _img=/var/tmp/img/$(echo "$1" | tr / _).img
  truncate -s "${2:-8G}" "$_img"
  mkfs.ext4 -q -E nodiscard,lazy_itable_init=1 "$_img"
  mount -o loop "$_img" "$1"
}

# target_start [SIM ARGS...]: the SPDK target of a driver script
# (tests/e2e/guest/target_driver.py): the simulator's kernel data plane on
# /run/spdk.sock, or nothing when the host's real spdk_tgt is forwarded
# ($GUEST_SPDK_RPC). target_stop: stop the simulator, print its log; fails if
# it exited non-zero.
target_start() {
  [ -z "$GUEST_SPDK_RPC" ] || return 0
  mountpoint -q /tmp/sim || data_dir /tmp/sim || return 1
  csi-spdk sim --rpc-socket /run/spdk.sock --data-dir /tmp/sim --nvmet "$@" \
    > /tmp/sim.log 2>&1 &
  echo $! > /run/sim.pid
  wait_for 60 test -S /run/spdk.sock || { cat /tmp/sim.log; return 1; }
}
target_stop() {
  [ -e /run/sim.pid ] || return 0
  _pid=$(cat /run/sim.pid); rm -f /run/sim.pid
  kill -TERM "$_pid"; _e=0; wait "$_pid" || _e=$?
  echo "--- sim log ---"; cat /tmp/sim.log
  [ "$_e" = 0 ] || { echo "sim exit code $_e"; return 1; }
}

# --- the CSI stack in the guest -------------------------------------------------
# csi_stack_start [NODE_ID]: SPDK + agent + controller + node plugin, sockets in
# $CSI_RUN (controller.sock, node.sock, agent.sock); the controller reaches SPDK
# through the agent, as in a deployment. SPDK is `csi-spdk sim --nvmet` in the
# guest, or, when $GUEST_SPDK_RPC is set (harness GuestOptions.host_rpc), the
# host's real spdk_tgt: its listener stays on the host's 127.0.0.1
# ($GUEST_TARGET_LISTEN) and the node dials the host at 10.0.2.2.
CSI_RUN=/run/csi
csi_stack_start() {
  NODE_ID=${1:-guest-node}
  mkdir -p "$CSI_RUN" /var/lib/csi-spdk
  if [ -n "$GUEST_SPDK_RPC" ]; then
    SPDK_RPC=$GUEST_SPDK_RPC; _listen=${GUEST_TARGET_LISTEN:-127.0.0.1}; _dial=10.0.2.2
    # key files must be written where the host's spdk_tgt reads them: only an
    # agent on the host ($GUEST_AGENT, GuestOptions.host_agent) can; without
    # one the stack runs without auth
    _auth=none
    [ -z "$GUEST_AGENT" ] || _auth=dhchap
  else
    SPDK_RPC=$CSI_RUN/spdk.sock; _listen=127.0.0.1; _dial=127.0.0.1; _auth=dhchap
    mountpoint -q /tmp/sim || data_dir /tmp/sim || return 1
    csi-spdk sim --rpc-socket "$SPDK_RPC" --data-dir /tmp/sim --nvmet \
      > "$CSI_RUN/sim.log" 2>&1 &
    echo $! > "$CSI_RUN/sim.pid"
    wait_for 60 test -S "$SPDK_RPC" || { cat "$CSI_RUN/sim.log"; return 1; }
  fi
  _lvs=$(python3 -c 'import json, sys; from csi_spdk.dev import ensure_lvstore
print(json.dumps(ensure_lvstore(sys.argv[1])[0]))' "$SPDK_RPC") || return 1
  if [ -n "$GUEST_AGENT" ]; then   # the host's agent, bridged to a local socket
    socat "UNIX-LISTEN:$CSI_RUN/agent.sock,fork" "TCP:$GUEST_AGENT" \
      > "$CSI_RUN/agent-fwd.log" 2>&1 &
    echo $! > "$CSI_RUN/agentfwd.pid"
  else
    csi-spdk agent --listen "unix://$CSI_RUN/agent.sock" --spdk-rpc "$SPDK_RPC" \
      --state-dir /var/lib/csi-spdk-agent ${CSI_LOG_LEVEL:+--log-level $CSI_LOG_LEVEL} \
      > "$CSI_RUN/agent.log" 2>&1 &
    echo $! > "$CSI_RUN/agent.pid"
  fi
  # auth: dhchap (the default) without Kubernetes: one generated key pair for
  # every volume ($CSI_RUN/auth-keys.json, the node-stage secrets the drivers
  # pass) and csi-sanity's --csi.secrets file ($CSI_RUN/csi-sanity-secrets.yaml).
  python3 -c 'import sys; from pathlib import Path; from csi_spdk.dev import write_dev_secrets
write_dev_secrets(Path(sys.argv[1]))' "$CSI_RUN" || return 1
  _port=${CSI_NVMF_PORT:-4420}; _tls_port=${CSI_NVMF_TLS_PORT:-$((_port + 1))}
  cat > "$CSI_RUN/controller.json" <<JSON
{"targets": [{"name": "guest", "agent": {"address": "unix://$CSI_RUN/agent.sock"},
  "nvmf": {"listenAddress": "$_listen", "port": $_port, "tlsPort": $_tls_port,
           "dialAddress": "$_dial"},
  "lvstores": $_lvs, "node": "$NODE_ID"}],
 "nodes": ["$NODE_ID"],
 "auth": {"staticSecretsFile": "$CSI_RUN/auth-keys.json", "keyDir": "$CSI_RUN/keys",
          "defaultMode": "$_auth"},
 "encryption": {"keyDir": "$CSI_RUN/volume-keys"}}
JSON
  csi-spdk controller --endpoint "unix://$CSI_RUN/controller.sock" \
    --config "$CSI_RUN/controller.json" ${CSI_LOG_LEVEL:+--log-level $CSI_LOG_LEVEL} \
    > "$CSI_RUN/controller.log" 2>&1 &
  echo $! > "$CSI_RUN/controller.pid"
  csi-spdk node --endpoint "unix://$CSI_RUN/node.sock" --node-id "$NODE_ID" \
    --state-dir /var/lib/csi-spdk ${CSI_LOG_LEVEL:+--log-level $CSI_LOG_LEVEL} \
    > "$CSI_RUN/node.log" 2>&1 &
  echo $! > "$CSI_RUN/node.pid"
  _n=900   # 90 s: Python under TCG starts slowly
  until [ -S "$CSI_RUN/controller.sock" ] && [ -S "$CSI_RUN/node.sock" ] \
      && [ -S "$CSI_RUN/agent.sock" ]; do
    for _c in sim agent controller node; do
      [ -e "$CSI_RUN/$_c.pid" ] || continue
      if ! _alive "$(cat "$CSI_RUN/$_c.pid")"; then
        echo "csi_stack_start: $_c exited" >&2; csi_stack_logs; return 1
      fi
    done
    _n=$((_n - 1))
    [ "$_n" -gt 0 ] || { echo "csi_stack_start: timed out" >&2; csi_stack_logs; return 1; }
    sleep 0.1
  done
}

# _alive PID: running (not gone, not a zombie nobody waited for yet).
_alive() {
  _st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$_st" ] && [ "$_st" != Z ]
}

# csi_stack_stop: SIGTERM node, controller, agent, sim (in that order); fails
# if any of them exits non-zero or is still running $CSI_STOP_GRACE (90) s later
# (then its thread stacks and log go to stderr, and it is killed).
csi_stack_stop() {
  _rc=0
  for _c in node controller agent sim; do
    [ -e "$CSI_RUN/$_c.pid" ] || continue
    _pid=$(cat "$CSI_RUN/$_c.pid")
    kill -TERM "$_pid" 2>/dev/null
    _n=${CSI_STOP_GRACE:-90}   # bounded: a process that ignores SIGTERM fails the test now
    while _alive "$_pid" && [ "$_n" -gt 0 ]; do sleep 1; _n=$((_n - 1)); done
    if _alive "$_pid"; then
      echo "csi_stack_stop: $_c (pid $_pid) still running ${CSI_STOP_GRACE:-90} s after SIGTERM; its threads (SIGUSR1) and log:" >&2
      kill -USR1 "$_pid" 2>/dev/null; sleep 3
      tail -n 120 "$CSI_RUN/$_c.log" >&2
      for _t in /proc/"$_pid"/task/*; do   # threads in the kernel (D state: a stuck syscall)
        echo "task ${_t##*/}: $(cut -d' ' -f3 "$_t/stat" 2>/dev/null)" >&2
        cat "$_t/stack" >&2 2>/dev/null
      done
      kill -KILL "$_pid" 2>/dev/null
      _rc=1
      _n=20
      while _alive "$_pid" && [ "$_n" -gt 0 ]; do sleep 1; _n=$((_n - 1)); done
      if _alive "$_pid"; then   # unkillable: do not wait on it forever
        echo "csi_stack_stop: $_c (pid $_pid) survives SIGKILL (stuck in the kernel)" >&2
        rm -f "$CSI_RUN/$_c.pid"
        continue
      fi
    fi
    wait "$_pid"; _e=$?
    [ "$_e" = 0 ] || { echo "csi_stack_stop: $_c exited $_e" >&2; _rc=1; }
    rm -f "$CSI_RUN/$_c.pid"
  done
  if [ -e "$CSI_RUN/agentfwd.pid" ]; then   # the bridge to the host's agent
    kill -TERM "$(cat "$CSI_RUN/agentfwd.pid")" 2>/dev/null
    wait "$(cat "$CSI_RUN/agentfwd.pid")" 2>/dev/null || true
    rm -f "$CSI_RUN/agentfwd.pid"
  fi
  csi_stack_no_keys_in_logs || _rc=1
  return $_rc
}

# csi_stack_no_keys_in_logs: no key of $CSI_RUN/auth-keys.json (base64 part)
# and no volume encryption key the stack kept ($CSI_RUN/volume-keys, or
# recorded in $CSI_RUN/encryption-keys.seen by a test before it deleted the
# volume) appears in any component's log or in /tmp/*.log (csi-sanity's output).
csi_stack_no_keys_in_logs() {
  [ -e "$CSI_RUN/auth-keys.json" ] || return 0
  python3 - "$CSI_RUN/auth-keys.json" "$CSI_RUN"/*.log /tmp/*.log <<'PY'
import glob, json, os, sys
keys = [v.split(":")[2] for v in json.load(open(sys.argv[1])).values()]
run = os.path.dirname(sys.argv[1])
for f in glob.glob(os.path.join(run, "volume-keys", "*.json")):
    m = json.load(open(f))["encryptionKey"]
    keys += [m, m[:64], m[64:]]
if os.path.exists(os.path.join(run, "encryption-keys.seen")):
    for m in open(os.path.join(run, "encryption-keys.seen")).read().split():
        keys += [m, m[:64], m[64:]]
logs = [p for p in sys.argv[2:] if os.path.isfile(p)]
bad = sorted({p for p in logs for k in keys if k in open(p, errors="replace").read()})
if bad:
    sys.exit(f"csi_stack: key material found in {bad}")
print(f"csi_stack: no key material in {len(logs)} log files")
PY
}

# csi_stack_logs [LINES]: the tail of every component's log.
csi_stack_logs() {
  for _c in sim agent controller node; do
    [ -e "$CSI_RUN/$_c.log" ] || continue
    echo "--- $_c log (last ${1:-60} lines) ---"; tail -n "${1:-60}" "$CSI_RUN/$_c.log"
  done
}
