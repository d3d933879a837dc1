#!/usr/bin/env bash
# On a lent device machine: run one long job that outlives a single `run` call (10 minutes at most each), and
# report on it from each call. The first call starts the job in a new process session (it runs on while the
# machine is held); every call then waits up to WAIT seconds for it to end, prints the end of its log and copies
# what it has written under /tmp/bg/NAME/out to $OUT. Calls must follow each other within the machine's idle
# release (30 s), or the machine and the job are gone.
#   scripts/gpu-bg.sh NAME WAIT -- COMMAND...
# e.g. scripts/gpu-bg.sh aoti 570 -- bash -c 'scripts/gpu-aoti.sh package && scripts/gpu-aoti.sh bench'
# COMMAND sees OUT=/tmp/bg/NAME/out.
set -uo pipefail
name=$1 wait_s=$2
shift 2
[[ ${1:-} == -- ]] && shift
dir=/tmp/bg/$name
mkdir -p "$dir/out"
if [[ ! -f $dir/started ]]; then
  date -u +%FT%TZ > "$dir/started"
  OUT=$dir/out setsid nohup bash -c '"$@"; echo $? > '"$dir/rc" bg "$@" > "$dir/log" 2>&1 < /dev/null &
  echo "gpu-bg: $name started: $*"
fi
end=$((SECONDS + wait_s))
while [[ ! -f $dir/rc ]] && ((SECONDS < end)); do sleep 5; done
tail -n 60 "$dir/log"
if [[ -f $dir/rc ]]; then echo "gpu-bg: $name ended, exit $(cat "$dir/rc")"; else echo "gpu-bg: $name still running"; fi
cp "$dir/log" "${OUT:-/tmp/out}/$name.log" 2>/dev/null
cp "$dir"/out/* "${OUT:-/tmp/out}/" 2>/dev/null
exit 0
