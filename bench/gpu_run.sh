#!/usr/bin/env bash
# One device call for issue #12's GPU part: a baseline tree and this one on the same job and machine, a profile with
# the GPU's idle gaps, then Liger, a dataloader with workers and regional compilation, each stopped in time.
#
#   bash bench/gpu_run.sh BASELINE_TREE DATA_DIR OUT_DIR [PART]
#
# PART: `compare` (the baseline, this tree, Liger: ~300 s), `more` (the profile, then workers and compiled: ~210 s,
# after building the job's assets on a fresh machine) or `all` (the default: both, ~510 s). Two calls on the warm
# machine cost little more than one, and a call that is lost (session 30's stopped answering and returned nothing)
# then takes only its own part with it.
#
# BASELINE_TREE: a copy of llmfinetune/ and bench/ from the commit to compare with (`git archive REV llmfinetune bench
# | tar -x -C DIR`); DATA_DIR: AdvertiseGen's train.json and validation.json. On this workplace's device machines
# (no registry) the packages travel as wheels, bench/README.md "Session 30" lists them.
set -u
BASE_TREE=$1 DATA=$2 OUT_DIR=$3 PART=${4:-all} WORK=/tmp/gb START=$(date +%s)
case $PART in all|compare) SHIFT=0 ;; more) SHIFT=300 ;; *) echo "PART: compare, more or all" >&2; exit 2 ;; esac
# Each step's deadline in seconds from the start of a whole run; a `more` call starts at its 300th second.
until_s() { echo $(( $1 - SHIFT - ($(date +%s) - START) )); }
at() { echo "$(( $(date +%s) - START ))s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers, datasets, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__)"
if [ "$PART" != more ]; then
echo "== [$(at)] baseline ($BASE_TREE)"
timeout "$(until_s 170)" python3 "$BASE_TREE/bench/gpu_sft.py" --data "$DATA" --workdir $WORK --steps 30 --skip-check \
    --only "full varlen 8x4096" --contender-timeout 110
echo "== [$(at)] this tree"
timeout "$(until_s 300)" python3 bench/gpu_sft.py --data "$DATA" --workdir $WORK --steps 30 --skip-check \
    --only "full varlen 8x4096,full liger 8x4096" --contender-timeout 100
fi
if [ "$PART" != compare ]; then
if [ ! -f $WORK/full_varlen_8x4096.json ]; then  # a fresh machine: assets and the job file, its run stopped at once
    timeout 150 python3 bench/gpu_sft.py --data "$DATA" --workdir $WORK --steps 30 --skip-check \
        --only "full varlen 8x4096" --contender-timeout 1 >/dev/null 2>&1
    [ "$PART" = more ] && START=$(date +%s)  # the deadlines below count from here
fi
echo "== [$(at)] profile, this tree"
timeout "$(until_s 380)" python3 bench/step_ops.py --cuda --steps 20:24 --top 32 -- \
    run-ft --ft=$WORK/full_varlen_8x4096.json 2>&1 | grep -v "^{'\|it/s\]\|s/it\]"
echo "== [$(at)] workers, compiled"
timeout "$(until_s 505)" python3 bench/gpu_sft.py --data "$DATA" --workdir $WORK --steps 30 --skip-check \
    --only "full workers 8x4096,full compiled 8x4096" --contender-timeout "$(until_s 500)"
fi
echo "== [$(at)] done ($PART)"
tar czf "$OUT_DIR/logs.tgz" -C $WORK logs 2>/dev/null
