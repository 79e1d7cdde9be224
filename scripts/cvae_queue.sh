#!/bin/bash
# Run queue of docs/experiments/contrastvae.md: one worker per call, two at a time on a 2-core machine.
#
#   mkdir -p /work/runs/queue && cp scripts/cvae_jobs.txt /work/runs/queue/jobs.txt
#   nohup scripts/cvae_queue.sh 1 > /work/runs/queue/worker1.out 2>&1 &
#   nohup scripts/cvae_queue.sh 2 > /work/runs/queue/worker2.out 2>&1 &
#
# Each worker pops the first line "NAME MAXMIN MODEL DATAFILE [TREE DIR] [FLAGS...]" of jobs.txt
# (under flock) and runs `fastrecloss train MODEL` with `nice -n 10 --threads 1 --no-progress
# --out RUNS/NAME --max-minutes MAXMIN FLAGS` from the frozen worktree DIR (default $TREE, else
# /work/h16-runs), adding --resume when RUNS/NAME/checkpoint.pt exists and skipping a run whose
# results.json says finished or early_stopped. Beside the run it writes invocation-K.json (commit,
# flags, wall seconds) and results.part-K.json; invocations.log in the queue folder lists every
# start and end. `touch QUEUE/STOP` ends the workers after their current run.
Q=${QUEUE:-/work/runs/queue}
RUNS=${RUNS:-/work/runs}
ID=${1:?worker id}
while true; do
  [ -e "$Q/STOP" ] && exit 0
  line=$(flock "$Q/lock" bash -c "head -n1 '$Q/jobs.txt'; sed -i 1d '$Q/jobs.txt'")
  if [ -z "$line" ]; then sleep 30; continue; fi
  case $line in \#*) continue ;; esac
  set -- $line
  name=$1; mm=$2; model=$3; data=$4; shift 4
  tree=${TREE:-/work/h16-runs}
  if [ "${1:-}" = "TREE" ]; then tree=$2; shift 2; fi
  out=$RUNS/$name
  if [ -f "$out/results.json" ] && grep -q '"status": "\(finished\|early_stopped\)"' "$out/results.json"; then
    echo "$(date -u +%FT%TZ) worker$ID skip $name (done)" >> "$Q/invocations.log"; continue
  fi
  resume=""; [ -f "$out/checkpoint.pt" ] && resume="--resume"
  mkdir -p "$out"
  k=$(ls "$out"/invocation-*.json 2>/dev/null | wc -l)
  echo "$(date -u +%FT%TZ) worker$ID start $name part$k $model $data --max-minutes $mm $resume $* (tree $tree)" \
    >> "$Q/invocations.log"
  t0=$(date +%s.%N)
  (cd "$tree" && nice -n 10 .venv/bin/python -m fastrecloss train "$model" --data "../shared/data/amazon/$data" \
     --threads 1 --no-progress --out "$out" --max-minutes "$mm" $resume "$@") >> "$out/log.txt" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  commit=$(git -C "$tree" rev-parse HEAD)
  python3 - "$out" "$k" "$t0" "$t1" "$rc" "$commit" "$mm" "$resume" "$tree" "$model" "$data" "$*" <<'PY'
import json, sys
out, k, t0, t1, rc, commit, mm, resume, tree, model, data, flags = sys.argv[1:]
json.dump({"part": int(k), "start_unix": float(t0), "end_unix": float(t1), "wall_seconds": float(t1) - float(t0),
           "rc": int(rc), "commit": commit, "max_minutes": float(mm), "resume": bool(resume), "tree": tree,
           "model": model, "data": data, "flags": flags.split()}, open(f"{out}/invocation-{k}.json", "w"), indent=1)
PY
  [ -f "$out/results.json" ] && cp "$out/results.json" "$out/results.part-$k.json"
  echo "$(date -u +%FT%TZ) worker$ID end $name part$k rc=$rc" >> "$Q/invocations.log"
done
