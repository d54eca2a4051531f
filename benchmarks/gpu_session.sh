#!/usr/bin/env bash
# The full-scale run on one GPU in about 9 minutes (see benchmarks/gpu_session.py for the stages):
#   OUT=results/gpu_session bash benchmarks/gpu_session.sh
# Each stage runs under its own time limit; a stage cut short keeps what it wrote (the
# certification TSV resumes). Full MNIST is read from data/MNIST/raw, or unpacked from the .gz
# copies in .gpu_data/MNIST/raw when the machine has no package index to fetch it from.
set -u
OUT=${OUT:-results/gpu_session}
mkdir -p "$OUT" data/MNIST/raw
export PYTHONUNBUFFERED=1 PYTHONPATH=.
log=$OUT/log.txt
for f in .gpu_data/MNIST/raw/*.gz; do
  [ -f "$f" ] && gunzip -c "$f" > "data/MNIST/raw/$(basename "$f" .gz)"
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
quiet='LeafSpec|litlogger|UserWarning|warnings.warn|check_worker_number|GPU available|TPU available|LOCAL_RANK'
stage() {
  limit=$1; shift
  echo "== $* (limit ${limit}s) $(date +%T)" | tee -a "$log"
  timeout --signal=INT --kill-after=15 "$limit" python3 benchmarks/gpu_session.py "$@" --out "$OUT" 2>&1 \
    | grep -vE "$quiet" | tee -a "$log"
}
stage 70 train-noise --epochs 30 --seconds 45
stage 200 certify
echo "== certify benchmark $(date +%T)" | tee -a "$log"
timeout --signal=INT --kill-after=10 70 python3 benchmarks/certify.py --device cuda --budget-s 55 \
  --json "$OUT/bench.json" 2>&1 | grep -vE "$quiet" | tee -a "$log"
stage 100 train-robust --epochs 30 --seconds 75
stage 60 attack
stage 40 smoothed-attack
echo "== done $(date +%T)" | tee -a "$log"
cd "$OUT" && tar czf extra.tgz tb ./*.pt ./*.png 2>/dev/null; rm -rf tb ./*.pt ./*.png
ls -la
