#!/usr/bin/env bash
# Start N training processes on this machine as one multi-process JAX job.
#
#   launch/local.sh [-n PROCESSES] [-d CPU_DEVICES_PER_PROCESS] [-g] [-p PORT] [-l LOG_DIR] \
#       -- --config=configs/NAME.py --workdir=DIR [--config.x=y ...]
#
#   -n  number of processes (default 2)
#   -d  simulate this many CPU devices per process (testing multi-host on a laptop)
#   -g  give process i only GPU i (CUDA_VISIBLE_DEVICES), one process per GPU
#   -p  coordinator port on 127.0.0.1 (default 12355)
#   -l  folder for per-process logs (default: LOG_DIR env or ./launch_logs)
# Process 0's output is also shown here. If any process fails, the others are stopped and the
# launcher exits with that status (75: preempted by SIGTERM after saving; rerun to resume).
set -euo pipefail

processes=2
cpu_devices=""
one_gpu_each=0
port=12355
log_dir="${LOG_DIR:-launch_logs}"
python="${PYTHON:-python}"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "n:d:gp:l:h" opt; do
  case "$opt" in
    n) processes="$OPTARG" ;;
    d) cpu_devices="$OPTARG" ;;
    g) one_gpu_each=1 ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
if [ "$#" -eq 0 ]; then
  echo "launch/local.sh: give the training arguments after --" >&2
  usage >&2
  exit 2
fi

mkdir -p "$log_dir"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < processes; i++)); do
  env_args=(REASONEMBED_COORDINATOR="127.0.0.1:${port}" REASONEMBED_NUM_PROCESSES="$processes"
            REASONEMBED_PROCESS_ID="$i")
  if [ -n "$cpu_devices" ]; then
    env_args+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${cpu_devices}")
  fi
  if [ "$one_gpu_each" = 1 ]; then
    env_args+=(CUDA_VISIBLE_DEVICES="$i")
  fi
  log="$log_dir/process_${i}.log"
  if [ "$i" -eq 0 ]; then
    env "${env_args[@]}" "$python" -m reasonembed_jax.train "$@" > >(tee "$log") 2>&1 &
  else
    env "${env_args[@]}" "$python" -m reasonembed_jax.train "$@" > "$log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
for i in "${!pids[@]}"; do
  code=0
  wait "${pids[$i]}" || code=$?
  if [ "$code" -ne 0 ]; then
    echo "launch/local.sh: process $i failed with status $code (log: $log_dir/process_${i}.log)" >&2
    [ "$status" -eq 0 ] && status=$code
    cleanup
  fi
done
exit "$status"
