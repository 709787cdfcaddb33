#!/usr/bin/env bash
# Create, run on, and delete a Cloud TPU VM slice; every worker runs the same command.
#
#   launch/gcloud.sh create NAME --zone=us-east5-a --type=v5p-64 [--version=v2-alpha-tpuv5] [--spot]
#   launch/gcloud.sh setup  NAME --zone=us-east5-a --repo=GIT_URL [--ref=main]
#   launch/gcloud.sh run    NAME --zone=us-east5-a -- python -m muse_jax.main \
#       --config=configs/sde_256.py --workdir=gs://BUCKET/sde_256 ...
#   launch/gcloud.sh logs   NAME --zone=us-east5-a        # worker 0's log
#   launch/gcloud.sh stop   NAME --zone=us-east5-a        # kill the run on all workers
#   launch/gcloud.sh delete NAME --zone=us-east5-a
#
# `run` starts the command under nohup on all workers at once, so jax.distributed
# finds its peers (TPU VMs need no coordinator address), and logs to
# ~/muse_jax_run.log on each worker. The workdir should be a gs:// path: every
# worker must see the same checkpoints. Re-running `run` with the same workdir
# resumes from the latest checkpoint; a run preempted by SIGTERM (maintenance,
# spot) saves a checkpoint and exits with code 75: `run` it again to continue.
# (Not exercised in CI: it needs gcloud and a TPU quota; `bash -n` and the usage
# text are all that run here.)
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 2 ] || usage
action=$1 name=$2; shift 2
zone="" type="" version="" repo="" ref="main" spot=""
cmd=()
while [ $# -gt 0 ]; do
  case "$1" in
    --zone=*) zone=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --spot) spot="--spot" ;;
    --) shift; cmd=("$@"); break ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
  shift
done
[ -n "$zone" ] || { echo "--zone is required" >&2; exit 2; }

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

case "$action" in
  create)
    [ -n "$type" ] || { echo "create needs --type (e.g. v5p-64, v5litepod-16, v6e-8)" >&2; exit 2; }
    if [ -z "$version" ]; then
      case "$type" in
        v5p-*) version=v2-alpha-tpuv5 ;;
        v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
        v6e-*) version=v2-alpha-tpuv6e ;;
        *) version=tpu-ubuntu2204-base ;;
      esac
    fi
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$type" \
      --version="$version" $spot ;;
  setup)
    [ -n "$repo" ] || { echo "setup needs --repo (the git URL of your muse_jax clone)" >&2; exit 2; }
    on_all_workers "set -e; rm -rf ~/muse_jax; git clone --depth 1 --branch '$ref' '$repo' ~/muse_jax \
      && cd ~/muse_jax && python3 -m venv ~/venv && . ~/venv/bin/activate \
      && pip install -q -U pip && pip install -q -e '.[tpu]'" ;;
  run)
    [ ${#cmd[@]} -gt 0 ] || { echo "run needs a command after --" >&2; exit 2; }
    quoted=$(printf '%q ' "${cmd[@]}")
    on_all_workers "cd ~/muse_jax && . ~/venv/bin/activate && nohup $quoted > ~/muse_jax_run.log 2>&1 &" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=0 --command="tail -n 100 -f ~/muse_jax_run.log" ;;
  stop)
    on_all_workers "pkill -f '[m]use_jax' || true" ;;   # [m]: do not match this shell
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet ;;
  *) usage ;;
esac
