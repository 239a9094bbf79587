#!/usr/bin/env bash
# The checks that need a GPU, as one prepared script for a session lent a device (the issue "Many
# users per rank" and the CUDA / NCCL / bf16 paths). From the checkout's root, with the device tool:
#
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
#
# It installs nothing: the device image's python3 holds torch (2.11 when last read, with CUDA),
# transformers and tiktoken; comigs_dist is imported from the checkout (PYTHONPATH). Each step has
# its own time limit (180 + 3 x 100 s in all), so one that hangs cannot take the others' time; the
# exit status is the agreement check's. What it prints, and the
# per-run results.json files, come back under $OUT (at most 8 files: see the device README).
#
#   1. packed against sequential users on one rank (benchmarks/packed_users.py on the GPU): the
#      issue's targets packed_over_sequential_* <= 0.75 and the memory per added user <= 1.5;
#   2. 8 users on one rank over NCCL with bf16 autocast, packed and one by one: both finish and
#      their per-user test perplexities agree to bf16 rounding (relative 2e-2);
#   3. the same 8-user run split over 2 ranks cannot share one GPU under NCCL, so it runs as 8
#      users on 1 rank against 4 users on each of 2 ranks over gloo on the GPU.
#
# DEVICE=cpu runs the same steps on this CPU with tiny settings (a smoke check of the script).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
if [ "$DEVICE" = cuda ]; then
    BACKEND=nccl; SIZE=(train.rounds=3 train.local_steps=5); BENCH=(--rounds 5)
else
    BACKEND=gloo; SIZE=(train.rounds=2 train.local_steps=2 train.batch_size=2 train.seq_len=32); BENCH=(--quick)
fi
COMMON=(n_users=8 model.device="$DEVICE" "${SIZE[@]}" log.progress=false log.tensorboard=false)

step() { echo; echo "== $*"; }
run_main() {  # run_main NAME NPROC ARGS...: one run, its results.json copied to $OUT/NAME.json
    local name=$1 nproc=$2; shift 2
    timeout 100 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m comigs_dist.main \
        "${COMMON[@]}" "$@" out_dir="$WORK/$name" > "$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc"
    [ $rc -eq 0 ] && cp "$WORK/$name/results.json" "$OUT/$name.json" || tail -20 "$WORK/$name.log"
}

{
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

    step "1. packed against sequential users on one rank ($DEVICE)"
    timeout 180 "$PY" benchmarks/packed_users.py --device "$DEVICE" "${BENCH[@]}"

    step "2. 8 users on one rank over $BACKEND: packed and one by one"
    run_main packed 1 comm.backend="$BACKEND" train.pack_users=on
    run_main sequential 1 comm.backend="$BACKEND" train.pack_users=off

    step "3. 8 users on 2 ranks of one $DEVICE (gloo: NCCL cannot put two ranks on one GPU)"
    run_main two-ranks 2 comm.backend=gloo train.pack_users=on

    step "agreement of the per-user test perplexities (relative difference, tolerance 2e-2)"
    "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
missing = [n for n in ("packed", "sequential", "two-ranks") if n not in runs]
if missing:
    print("agreement: FAILED, no results from", ", ".join(missing))
    sys.exit(1)
ok = True
base = [u["test_ppl"] for u in runs["packed"]["users"]]
for name, r in runs.items():
    ppl = [u["test_ppl"] for u in r["users"]]
    worst = max(abs(a - b) / b for a, b in zip(ppl, base))
    ok &= worst <= 2e-2
    print(f"{name}: mean test ppl {r['mean_test_ppl']:.4f}, worst relative difference to packed {worst:.2e}")
print("agreement:", "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
} 2>&1 | tee "$OUT/log"
status=${PIPESTATUS[0]}  # the agreement check's, the block's last command
rm -rf "$WORK"
exit "$status"
