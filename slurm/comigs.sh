#!/bin/bash
# sbatch slurm/comigs.sh configs/<name>.yaml [key=value ...]
#
# One experiment on one or more nodes: one task per node starts torchrun, the nodes meet in a
# c10d rendezvous on the first node of the allocation, and the users are spread evenly over the
# ranks (n_users / nodes ranks per node, one user each; with more users than GPUs, one rank per
# GPU and several users on each rank). Submit from the checkout's
# root: the log goes to logs/<job name>-<job id>.out, the run to the config's out_dir, else to
# runs/slurm-<job id>_<method>_s<seed> (stable across requeues).
#
# Change the defaults below, or override them on the command line, e.g. 2 nodes x 4 GPUs:
#   sbatch --nodes=2 slurm/comigs.sh configs/<name>.yaml n_users=8
#
# Environment knobs: COMIGS_RANKS_PER_NODE (processes per node; default: n_users / nodes, or GPUs
# per node when there are more users than GPUs; COMIGS_USERS_PER_NODE is the older name),
# COMIGS_RDZV_PORT (default: derived from the job id), COMIGS_RESUME (the resume override,
# default resume=auto; empty turns it off), PYTHON (default: python).
#
#SBATCH --job-name=comigs
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
# --signal: 3 minutes before the time limit Slurm sends USR1 to this script, which requeues the
# job; --requeue: the job may also be requeued by Slurm itself (preemption with
# PreemptMode=REQUEUE, node failure); --open-mode=append keeps the log of earlier attempts.

set -uo pipefail
PYTHON=${PYTHON:-python}
say() { echo "[comigs-slurm] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/comigs.sh runs under Slurm: sbatch slurm/comigs.sh configs/<name>.yaml [key=value ...]" >&2
    exit 2
fi
# near the time limit (set first, so that the signal never finds the default action, which
# would end the job): requeue; the next start resumes from the checkpoints under OUT_DIR
REQUEUED=0
requeue() {
    if [ "$REQUEUED" = 0 ]; then
        REQUEUED=1
        say "USR1 at $(date '+%F %T'): time limit near, requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || say "scontrol requeue failed; the job ends at its time limit"
    fi
}
trap requeue USR1

JOB_ID=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
JOB_ID=${JOB_ID:-$SLURM_JOB_ID}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

# the first argument is the config file unless it is an override
ARGS=()
if [ $# -gt 0 ] && [[ "$1" != *=* ]] && [[ "$1" != -* ]]; then
    ARGS=(--config "$1"); shift
fi
ARGS+=("$@")

# validate and plan on this (the first) node: a bad config ends the job here, with the message
PLAN_OPTS=(--job-id "$JOB_ID" --nodes "$NNODES" --gpus-per-node "${SLURM_GPUS_ON_NODE:-0}"
           --cpus-per-task "${SLURM_CPUS_PER_TASK:-0}")
RANKS_PER_NODE=${COMIGS_RANKS_PER_NODE:-${COMIGS_USERS_PER_NODE:-}}
[ -n "$RANKS_PER_NODE" ] && PLAN_OPTS+=(--ranks-per-node "$RANKS_PER_NODE")
[ -n "${COMIGS_RESUME+set}" ] && PLAN_OPTS+=(--resume "$COMIGS_RESUME")
PLAN=$("$PYTHON" -m launch.plan "${PLAN_OPTS[@]}" -- "${ARGS[@]}") || exit 2
eval "$PLAN"
[ "$THREADS" != 0 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}

HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
PORT=${COMIGS_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
say "job $JOB_ID start $(( ${SLURM_RESTART_COUNT:-0} + 1 )) at $(date '+%F %T') on $SLURM_JOB_NODELIST"
say "$METHOD: $N_USERS users on $WORLD_SIZE ranks = $NNODES node(s) x $USERS_PER_NODE, rendezvous $HEAD:$PORT, threads per rank: $THREADS"
say "out_dir: $OUT_DIR"
say "$RESUME_NOTE"

# one task per node; each starts torchrun for its node's users. Give the step the job's CPUs
# explicitly (srun does not inherit --cpus-per-task since Slurm 22.05).
STEP_OPTS=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && STEP_OPTS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun "${STEP_OPTS[@]}" bash -c \
    'echo "[comigs-slurm] node $SLURMD_NODENAME (node rank $SLURM_NODEID): torchrun for $1 ranks"; shift; exec "$@"' \
    comigs "$USERS_PER_NODE" \
    "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$USERS_PER_NODE" \
    --rdzv_id="comigs-$JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --max_restarts=0 \
    -m comigs_dist.main "${MAIN_ARGS[@]}" &
STEP=$!
# `wait` returns early when a signal arrives; keep waiting until the step itself ends
while :; do
    wait "$STEP"; RC=$?
    kill -0 "$STEP" 2>/dev/null || break
done
say "job $JOB_ID step ended with exit code $RC at $(date '+%F %T')"
[ "$RC" = 0 ] && [ -f "$OUT_DIR/results.json" ] && say "results: $OUT_DIR/results.json"
exit "$RC"
