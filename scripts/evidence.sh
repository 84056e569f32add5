#!/usr/bin/env bash
# The sweep behind docs/RESULTS.md, from the shipped recipes. Resumable: a run with eval/results.json is skipped,
# an interrupted one continues from its newest checkpoint. Prints each run's time and the total.
#
#   bash scripts/evidence.sh [glue|budget|alpaca|report|all]...    (default: all)
#
# GLUE_DIR (default ../shared/data/glue) holds the tasks in the official layout; TASKS (default: all five) picks
# GLUE tasks; lanes can share a machine and a part, each run taken by one lane, e.g. on 2 cores
#   OMP_NUM_THREADS=1 TASKS="sst2 mrpc rte" bash scripts/evidence.sh glue budget &
#   OMP_NUM_THREADS=1 TASKS="cola stsb" bash scripts/evidence.sh glue alpaca budget
#
# RUNS (default runs/evidence) receives the run directories; the reports go to docs/results/<part>/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sparsetune ] || bash scripts/setup.sh
. .venv/bin/activate
GLUE=${GLUE_DIR:-../shared/data/glue}
RUNS=${RUNS:-runs/evidence}
TASKS=${TASKS:-sst2 mrpc rte cola stsb}
mkdir -p "$RUNS/logs"
started=$(date +%s)

# run NAME RECIPE [key=value ...]: train and evaluate unless already complete or taken by another lane
run() {
  local name=$1 recipe=$2; shift 2
  if [ -f "$RUNS/$name/eval/results.json" ]; then echo "skip  $name (complete)"; return; fi
  local lock="$RUNS/logs/$name.lock"
  if ! mkdir "$lock" 2>/dev/null; then
    if kill -0 "$(cat "$lock/pid" 2>/dev/null)" 2>/dev/null; then echo "skip  $name (another lane runs it)"; return; fi
  fi
  echo $$ > "$lock/pid"
  local t0; t0=$(date +%s)
  if sparsetune train "recipes/$recipe.yaml" "output_dir=$RUNS/$name" "$@" --resume > "$RUNS/logs/$name.log" 2>&1; then
    echo "done  $name in $(( $(date +%s) - t0 )) s: $(tail -2 "$RUNS/logs/$name.log" | head -1)"
  else
    echo "FAIL  $name after $(( $(date +%s) - t0 )) s (log: $RUNS/logs/$name.log)"
  fi
  rm -r "$lock"
}

# Same optimizer steps of 16 examples for every method on a task, sized for a 2-core CPU:
# SST-2 300, MRPC 230 (one epoch), RTE 156 (one epoch), CoLA 268, STS-B 180.
GLUE_TASKS="sst2:SST-2:300 mrpc:MRPC:230 rte:RTE:156 cola:CoLA:268 stsb:STS-B:180"
GLUE_TRAIN=(train.batch_size=16 train.save_every=50)
# LoRA at SIFT's trainable count: SIFT 0.8% of MiniLM's attention weights and biases is 28,392 entries;
# LoRA r=3 on query and value (the LoRA paper's targets) is 27,648.
LORA_MATCHED=(r=3 alpha=6 "target=[attention.self.query,attention.self.value]")  # for lora and for IST's base

glue() {
  for spec in $GLUE_TASKS; do
    IFS=: read -r task dir steps <<< "$spec"
    [[ " $TASKS " == *" $task "* ]] || continue
    local common=("task.data_dir=$GLUE/$dir" "train.max_steps=$steps" "train.eval_every=$steps" "${GLUE_TRAIN[@]}")
    run "$task-full"    "glue/$task-full"    "${common[@]}"
    run "$task-lora"    "glue/$task-lora"    "${common[@]}" "${LORA_MATCHED[@]/#/method.}"
    run "$task-sift"    "glue/$task-sift"    "${common[@]}"
    run "$task-random"  "glue/$task-sift"    "${common[@]}" method.score=random
    run "$task-ist"     "glue/$task-ist"     "${common[@]}" "${LORA_MATCHED[@]/#/method.base.}"
    run "$task-zeroing" "glue/$task-zeroing" "${common[@]}"
  done
}

# The SIFT paper's budget curve on MRPC: trainable count against F1 for SIFT, random-sparse and LoRA.
budget() {
  local common=("task.data_dir=$GLUE/MRPC" "train.max_steps=230" "train.eval_every=230" "${GLUE_TRAIN[@]}")
  for count in 1000 10000 100000 1000000; do  # method.grad: auto takes the dense gradient at 1e6 (28% of a tensor)
    run "mrpc-sift-n$count"   glue/mrpc-sift "${common[@]}" "method.budget=$count"
    run "mrpc-random-n$count" glue/mrpc-sift "${common[@]}" "method.budget=$count" method.score=random
  done
  for r in 1 4 16 64; do  # 18,432 to 1,179,648 adapter parameters on the four attention projections
    run "mrpc-lora-r$r" glue/mrpc-lora "${common[@]}" "method.r=$r" "method.alpha=$((2 * r))"
  done
}

# Instruction tuning, SmolLM2-135M on the Alpaca demo set: held-out loss after the same 20 steps of 4 examples.
alpaca() {
  for method in lora sift ist; do
    run "alpaca-$method" "instruct/alpaca-$method" train.max_steps=20 train.grad_accum=1 train.save_every=5 \
      task.generations=2
  done
}

existing() { for d in "$@"; do if [ -d "$d" ]; then echo "$d"; fi; done; }

report() {  # runs not started yet are left out; started ones show their state
  # shellcheck disable=SC2046
  sparsetune report $(existing "$RUNS"/{sst2,mrpc,rte,cola,stsb}-{full,lora,sift,random,ist,zeroing}) -o docs/results/glue
  # shellcheck disable=SC2046
  sparsetune report $(existing "$RUNS"/mrpc-{sift-n,random-n}{1000,10000,100000,1000000} "$RUNS"/mrpc-lora-r{1,4,16,64}) \
    -o docs/results/budget
  # shellcheck disable=SC2046
  sparsetune report $(existing "$RUNS"/alpaca-{lora,sift,ist}) -o docs/results/alpaca
}

for part in "${@:-all}"; do
  case $part in
    glue) glue ;;
    budget) budget ;;
    alpaca) alpaca ;;
    report) report ;;
    all) glue; budget; alpaca; report ;;
    *) echo "usage: $0 [glue|budget|alpaca|report|all]..." >&2; exit 2 ;;
  esac
done
echo "total: $(( $(date +%s) - started )) s"
