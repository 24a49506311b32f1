# Sourced by the sbatch templates right after `srun ... &`: wait for the tasks, and pass the
# scheduler's signals on. SIGTERM (scancel, requeue) reaches the tasks from SLURM itself; SIGUSR1,
# sent to this batch shell two minutes before the time limit by `--signal=B:USR1@120`, is turned
# into SIGTERM for the tasks (each ends its step, marks its MLflow run KILLED and exits 143) and the
# job is requeued: it continues from its newest checkpoint, in the same run directory and MLflow run.
TASKS=$!
REQUEUE=0
trap 'echo "medmoco: time limit near (USR1): stopping the tasks, then requeueing"; REQUEUE=1; kill -TERM "$TASKS" 2>/dev/null || true' USR1
trap 'echo "medmoco: SIGTERM: stopping the tasks"; kill -TERM "$TASKS" 2>/dev/null || true' TERM
STATUS=0
wait "$TASKS" || STATUS=$?
while kill -0 "$TASKS" 2>/dev/null; do  # a trap ended `wait` early: wait for the tasks themselves
    STATUS=0
    wait "$TASKS" || STATUS=$?
done
if [[ "$REQUEUE" == 1 ]]; then
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$STATUS"
