#!/usr/bin/env bash
# Round 14's bare-machine call (no SGLang bundle): the steps named on the command line, in order, results under
# /tmp/out (bench/gpu_poll.sh brings them back). Run detached from the repository root:
#   (setsid nohup bash bench/results/gpu_round14/job.sh home tune hp tail > /tmp/run.log 2>&1 < /dev/null &)
set -u
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
O=/tmp/out
mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
python3 -c "import scipy, matplotlib, triton, torch; print('torch', torch.__version__, 'triton', triton.__version__)"
HP_CAL=${HP_CAL:-bench/results/head_parallel/move_calibration_round13_h100.json}
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    home) python3 bench/home_calls.py --shapes ${HOME_SHAPES:-llama8b,llama70b} ${HOME_ARGS:-} --out $O/home > $O/home_run.log 2>&1 ;;
    tune) python3 bench/tune_kernels.py --shapes llama8b,smollm2 --out $O/tuned > $O/tune_run.log 2>&1 ;;
    hp) python3 bench/head_parallel.py --shapes ${HP_SHAPES:-llama8b,llama70b} --ctx ${HP_CTX:-65536,131072} --tp 4,8 --plans ${HP_PLANS:-profiled} \
          --reps 20 --compare-calibration "" --calibration $HP_CAL --time-budget-s ${HP_BUDGET:-200} \
          --out $O/hp${HP_TAG:-} > $O/hp${HP_TAG:-}_run.log 2>&1 ;;
    tail) python3 bench/tail.py --out $O/tail > $O/tail_run.log 2>&1 ;;
    *) echo "unknown step $step" ;;
  esac
  echo "step $step rc=$? $(( $(date +%s) - t0 )) s"
done
echo "job done"
