#!/usr/bin/env bash
# One node's agent, as srun starts it on each node of the allocation (deploy/slurm/marathon.sbatch).
# It registers the node's GPUs in etcd under the job's name and runs a worker per GPU; the
# agents plan the job's generations together. Logs are JSON lines, one per event, for the
# cluster's log collector; Prometheus finds every process through each agent's /targets.
set -euo pipefail
: "${ETCD_ENDPOINTS:?set ETCD_ENDPOINTS to the etcd cluster's client URLs}"
: "${MARATHON_CONFIG:?set MARATHON_CONFIG to the job's configuration file}"
marathon="${MARATHON_BIN:-marathon}"
node="$(hostname -s)"
# The address the other nodes reach this node's workers on: the first one the host names.
host="${MARATHON_HOST:-$(hostname -I | awk '{print $1}')}"
exec "$marathon" agent \
  --etcd "$ETCD_ENDPOINTS" \
  --job "marathon-${SLURM_JOB_ID:?run under Slurm, or set SLURM_JOB_ID}" \
  --node "${MARATHON_NODE:-$node}" \
  --host "$host" \
  --slots "${MARATHON_SLOTS:-auto}" \
  --wait-slots "${MARATHON_WAIT_SLOTS:-0}" \
  --config "$MARATHON_CONFIG" \
  --metrics-addr "${MARATHON_METRICS_ADDR:-0.0.0.0:9400}" \
  --log-format json
