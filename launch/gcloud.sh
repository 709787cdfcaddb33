#!/usr/bin/env bash
# Create, set up, run on, and delete Cloud TPU VM slices; every worker runs the same command.
#
#   launch/gcloud.sh create NAME --zone=us-east5-a --type=v5p-64 [--version=v2-alpha-tpuv5]
#                               [--spot] [--queued] [--num-slices=N]
#   launch/gcloud.sh setup  NAME --zone=us-east5-a --repo=GIT_URL [--ref=main] [--num-slices=N]
#   launch/gcloud.sh run    NAME --zone=us-east5-a [--num-slices=N] -- python -m muse_jax.main \
#       --config=configs/sde_256.py --workdir=gs://BUCKET/sde_256 ...
#   launch/gcloud.sh logs   NAME --zone=us-east5-a [--num-slices=N]   # worker 0's log
#   launch/gcloud.sh stop   NAME --zone=us-east5-a [--num-slices=N]   # kill the run everywhere
#   launch/gcloud.sh delete NAME --zone=us-east5-a [--queued] [--num-slices=N]
#   Any action with --dry-run prints the commands it would run, one per line, and runs none.
#
# --queued creates the slice through a queued resource (`gcloud compute tpus
# queued-resources`), waits until it is ACTIVE, and deletes it with the resource.
# --num-slices=N > 1 (multi-slice; always queued) creates N slices NAME-0 ..
# NAME-(N-1) that talk over the data-centre network (DCN); `run` adds
# --config.mesh.dcn_data=N (data parallelism across slices) unless the command
# sets a --config.mesh.dcn_* size itself. Pass the same --num-slices to every action.
#
# `run` starts the command under nohup on every worker of every slice at once, so
# jax.distributed finds its peers (TPU VMs need no coordinator address), and logs
# to ~/muse_jax_run.log on each worker. The workdir should be a gs:// path: every
# worker must see the same checkpoints. Re-running `run` with the same workdir
# resumes from the latest checkpoint; a run preempted by SIGTERM (maintenance,
# spot) saves a checkpoint and exits with code 75: `run` it again to continue.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
fail() { echo "launch/gcloud.sh: $*" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1 name=$2; shift 2
zone="" type="" version="" repo="" ref="main" spot=false queued=false num_slices=1 dry_run=false
cmd=()
while [ $# -gt 0 ]; do
  case "$1" in
    --zone=*) zone=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --spot) spot=true ;;
    --queued) queued=true ;;
    --num-slices=*) num_slices=${1#*=} ;;
    --dry-run) dry_run=true ;;
    --) shift; cmd=("$@"); break ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
  shift
done
[ -n "$zone" ] || fail "--zone is required"
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || fail "--num-slices must be a positive integer, got '$num_slices'"
[ "$num_slices" -gt 1 ] && queued=true   # multi-slice exists only as a queued resource

# The TPU VMs: NAME, or NAME-0 .. NAME-(N-1) for N slices (the queued resource's node prefix).
nodes=("$name")
if [ "$num_slices" -gt 1 ]; then
  nodes=()
  for ((i = 0; i < num_slices; i++)); do nodes+=("$name-$i"); done
fi

# Every gcloud call goes through here: printed (shell-quoted) under --dry-run, else run.
run_cmd() {
  if $dry_run; then
    local word words=()
    for word in "$@"; do
      if [[ "$word" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then words+=("$word"); else words+=("${word@Q}"); fi
    done
    echo "${words[*]}"
  else
    "$@"
  fi
}

# The same command on all workers of all slices, concurrently; fails if any slice fails.
on_all_workers() {
  local pids=() node status=0
  for node in "${nodes[@]}"; do
    if $dry_run; then
      run_cmd gcloud compute tpus tpu-vm ssh "$node" --zone="$zone" --worker=all --command="$1"
    else
      run_cmd gcloud compute tpus tpu-vm ssh "$node" --zone="$zone" --worker=all --command="$1" &
      pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return "$status"
}

wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$name" --zone="$zone"
                  --format="value(state.state)")
  if $dry_run; then
    run_cmd "${describe[@]}"   # polled every 30 s until ACTIVE
    return
  fi
  local state
  while true; do
    state=$("${describe[@]}")
    case "$state" in
      ACTIVE) echo "queued resource $name is ACTIVE"; return ;;
      FAILED|SUSPENDED) fail "queued resource $name is $state (see: ${describe[*]:0:6} --zone=$zone)" ;;
      *) echo "queued resource $name is ${state:-not listed yet}; waiting" >&2; sleep 30 ;;
    esac
  done
}

case "$action" in
  create)
    [ -n "$type" ] || fail "create needs --type (e.g. v5p-64, v5litepod-16, v6e-8)"
    if [ -z "$version" ]; then
      case "$type" in
        v5p-*) version=v2-alpha-tpuv5 ;;
        v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
        v6e-*) version=v2-alpha-tpuv6e ;;
        *) version=tpu-ubuntu2204-base ;;
      esac
    fi
    extra=()
    $spot && extra+=(--spot)
    if $queued; then
      if [ "$num_slices" -gt 1 ]; then
        extra+=(--node-count="$num_slices" --node-prefix="$name")
      else
        extra+=(--node-id="$name")
      fi
      run_cmd gcloud compute tpus queued-resources create "$name" --zone="$zone" \
        --accelerator-type="$type" --runtime-version="$version" "${extra[@]}"
      wait_until_active
    else
      run_cmd gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$type" \
        --version="$version" "${extra[@]}"
    fi ;;
  setup)
    [ -n "$repo" ] || fail "setup needs --repo (the git URL of your muse_jax clone)"
    clone="rm -rf ~/muse_jax && git clone --depth 1 --branch '$ref' '$repo' ~/muse_jax"
    install="python3 -m venv ~/venv && . ~/venv/bin/activate && pip install -q -U pip"
    on_all_workers "set -e; $clone && cd ~/muse_jax && $install && pip install -q -e '.[tpu]'" ;;
  run)
    [ ${#cmd[@]} -gt 0 ] || fail "run needs a command after --"
    if [ "$num_slices" -gt 1 ] && [[ " ${cmd[*]}" != *" --config.mesh.dcn_"* ]]; then
      cmd+=("--config.mesh.dcn_data=$num_slices")
    fi
    quoted=$(printf '%q ' "${cmd[@]}")
    on_all_workers "cd ~/muse_jax && . ~/venv/bin/activate && nohup $quoted> ~/muse_jax_run.log 2>&1 &" ;;
  logs)
    run_cmd gcloud compute tpus tpu-vm ssh "${nodes[0]}" --zone="$zone" --worker=0 \
      --command="tail -n 100 -f ~/muse_jax_run.log" ;;
  stop)
    on_all_workers "pkill -f '[m]use_jax' || true" ;;   # [m]: do not match this shell
  delete)
    if $queued; then
      run_cmd gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
    else
      run_cmd gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    fi ;;
  *) usage ;;
esac
