#!/usr/bin/env bash
# Regenerates every table under docs/benchmarks/ (CPU; about an hour on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
q="python benchmarks/quality.py"
ratios="0.2 0.3 0.4 0.5"
runs() { for r in $ratios; do for m in "$@"; do printf '%s ' "${m/R/$r}"; done; done; }
CO='{"cospadi": {"iters": 20}}'

# issue: foundation — pruning at 50% and 2:4 on both testbeds
for bed in bundled minilm; do
  $q --testbed $bed --name pruning --runs magnitude:s0.5 wanda:s0.5 sparsegpt:s0.5 magnitude:2:4 wanda:2:4 sparsegpt:2:4
done
# issue: factorization — every method at the same stored ratio
for bed in bundled minilm; do
  $q --testbed $bed --name factorization --override "$CO" \
     --runs $(runs svd:rR asvd:rR svd-llm:rR cospadi:rR wanda:rR sparsegpt:rR)
done
# grouped CoSpaDi (one dictionary per projection shared by 2 blocks)
for bed in bundled minilm; do
  $q --testbed $bed --name grouped --override '{"cospadi": {"iters": 20, "group_size": 2}}' --runs $(runs cospadi:rR)
done
# issue: allocation — uniform vs knapsack per method, and mixed
for bed in bundled minilm; do
  $q --testbed $bed --name allocation --override "$CO" \
     --runs $(runs rocket:rR rocket:rR@knapsack cospadi:rR cospadi:rR@knapsack svd-llm:rR svd-llm:rR@knapsack \
                   rocket+svd-llm+wanda:rR@knapsack)
done
python benchmarks/storage.py
