#!/usr/bin/env bash
# Run training on every worker of a Cloud TPU VM pod slice (the same command on all workers;
# JAX finds its peers through the TPU metadata, so no coordinator flags are needed).
#
#   launch/tpu_pod.sh -t TPU_NAME -z ZONE [-P PROJECT] [-r REMOTE_DIR] [-s] [-c LOG_DIR] \
#       -- --config=configs/reasonembed_qwen3_8b.py --workdir=gs://BUCKET/runs/x [--config.x=y ...]
#
#   -s  set up first: copy this checkout to every worker and install it with jax[tpu]
#   -r  folder on the workers, relative to the home folder (default reasonembed-jax)
#   -c  afterwards, copy each worker's log to LOG_DIR/worker_N.log
# Every worker writes ~/reasonembed_train.log; worker output is also streamed here.
# Exit status: 0 finished, 2 a bad setting or input, 75 preempted (SIGTERM, e.g. a maintenance
# event or a Spot/preemptible reclaim: the checkpoint is saved; run the same command again, or let
# a retry loop / queued-resource job do it, to resume from the workdir), 1 a bug.
set -euo pipefail

tpu="" zone="" project="" remote_dir="reasonembed-jax" setup=0 collect=""
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "t:z:P:r:sc:h" opt; do
  case "$opt" in
    t) tpu="$OPTARG" ;;
    z) zone="$OPTARG" ;;
    P) project="$OPTARG" ;;
    r) remote_dir="$OPTARG" ;;
    s) setup=1 ;;
    c) collect="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
if [ -z "$tpu" ] || [ -z "$zone" ] || [ "$#" -eq 0 ]; then
  usage >&2
  exit 2
fi
gcloud_args=(--zone "$zone")
[ -n "$project" ] && gcloud_args+=(--project "$project")

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all --command "$1"
}

if [ "$setup" = 1 ]; then
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  archive="$(mktemp -t reasonembed-XXXXXX.tar.gz)"
  git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$tpu:/tmp/reasonembed.tar.gz" "${gcloud_args[@]}" \
    --worker=all
  on_all_workers "mkdir -p $remote_dir && tar -xzf /tmp/reasonembed.tar.gz -C $remote_dir && \
    cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
    .venv/bin/pip install -q 'jax[tpu]' -e ."
  rm -f "$archive"
fi

train_args="$(printf '%q ' "$@")"
status=0
on_all_workers "set -o pipefail; cd $remote_dir && REASONEMBED_AUTO_DISTRIBUTED=1 \
  .venv/bin/python -m reasonembed_jax.train $train_args 2>&1 | tee ~/reasonembed_train.log" \
  || status=$?
if [ "$status" -eq 75 ]; then
  echo "preempted (exit 75): the checkpoint is saved; rerun this command to resume" >&2
fi

if [ -n "$collect" ]; then
  mkdir -p "$collect"
  workers="$(gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_args[@]}" \
    --format='value(networkEndpoints[].ipAddress)' | sed 's/[;,]/\n/g' | grep -c .)"
  for ((i = 0; i < workers; i++)); do
    gcloud compute tpus tpu-vm scp "$tpu:~/reasonembed_train.log" "$collect/worker_$i.log" \
      "${gcloud_args[@]}" --worker="$i" || echo "could not fetch the log of worker $i" >&2
  done
fi
exit "$status"
