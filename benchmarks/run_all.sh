#!/usr/bin/env bash
# Regenerates every table under docs/benchmarks/ on CPU, one thread per process.
# Each testbed is one chain (bundled: about 1.5 h, MiniLM: about 4 h on one core, most of it CoSpaDi's
# sparse coding); run the chains in parallel on separate cores: `benchmarks/run_all.sh bundled &
# benchmarks/run_all.sh minilm &`. With no argument, both run one after the other, then the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R="0.2 0.3 0.4 0.5"
# CoSpaDi: 20 K-SVD iterations (the paper: 60), see docs/benchmarks/README.md. Every format stores values in the
# model dtype unless told otherwise; the bundled tables below were made when CoSpaDi's default was 14-bit
# coefficients (the paper's Eq. 11), so they pin storage bf16-14bit to reproduce them; MiniLM's (float32) were made
# with float32 values. Equal-storage comparisons: the storage_rule and w4_sparsity tables at the end of a chain.
# SmolLM2 (`chain smollm2`: needs /tmp/smollm2 from scripts/smollm2_to_hf.py, weights dequantized from Q4_1) is
# float32 like MiniLM; its chain is many hours on one core.
declare -A COSPADI=([bundled]='"iters": 20, "storage": "bf16-14bit"' [minilm]='"iters": 20, "storage": "dtype"'
                    [smollm2]='"iters": 20, "storage": "dtype"')
runs() { for r in $R; do for m in "$@"; do printf '%s ' "${m/R/$r}"; done; done; }

chain() {
  local q="python benchmarks/quality.py --testbed $1" docs=docs/benchmarks
  local CO="{\"cospadi\": {${COSPADI[$1]}}}"
  # foundation: pruning at 50 % and 2:4
  $q --name pruning --runs magnitude:s0.5 wanda:s0.5 sparsegpt:s0.5 magnitude:2:4 wanda:2:4 sparsegpt:2:4
  # factorization: every method at the same stored ratio
  $q --name factorization --override "$CO" --runs $(runs svd:rR asvd:rR svd-llm:rR wanda:rR sparsegpt:rR) \
     $(runs cospadi:rR)
  # grouped CoSpaDi: one dictionary per projection shared by 2 consecutive blocks
  $q --name grouped --override "{\"cospadi\": {${COSPADI[$1]}, \"group_size\": 2}}" --runs $(runs cospadi:rR)
  # ROCKET with CoSpaDi's 14-bit coefficient values: equal storage for the two sparse-dictionary methods
  [ "$1" = bundled ] && $q --name rocket_14bit --override '{"rocket": {"storage": "bf16-14bit"}}' \
     --runs $(runs rocket:rR rocket:rR@knapsack)
  # allocation: uniform vs knapsack per method, and mixed (knapsack tables are profiled once per invocation)
  $q --name allocation_runs --override "$CO" \
     --runs $(runs rocket:rR rocket:rR@knapsack svd-llm:rR svd-llm:rR@knapsack rocket+svd-llm+wanda:rR@knapsack) \
            $(runs cospadi:rR@knapsack) $(runs rocket+svd-llm+wanda+cospadi:rR@knapsack)
  # mixed menus scored end to end against their methods alone (pipeline.select_plan), with SparseGPT in the menu too
  $q --name mixed_sparsegpt_runs --runs $(runs rocket+svd-llm+sparsegpt:rR@knapsack)
  # the allocation table: every row copied from the two tables above (nothing is recomputed)
  $q --name allocation --override "$CO" --reuse $docs/quality_$1_factorization.json $docs/quality_$1_allocation_runs.json \
     --runs $(runs rocket:rR rocket:rR@knapsack cospadi:rR cospadi:rR@knapsack svd-llm:rR svd-llm:rR@knapsack \
                   rocket+svd-llm+wanda:rR@knapsack rocket+svd-llm+wanda+cospadi:rR@knapsack)
  # structured pruning (FLAP, ZipLM-style; adaptive and uniform widths) beside SVD-LLM and ROCKET at equal bytes
  $q --name structured --override "$CO" --reuse $docs/quality_$1_allocation.json \
     --runs $(runs flap:rR flap.structure=uniform:rR ziplm.structure=uniform:rR svd-llm:rR rocket:rR@knapsack) \
            $(runs ziplm.structure=adaptive:rR)
  # DSnoT on Wanda and SparseGPT masks (refine=dsnot: exact-error acceptance; dsnot-mean: the paper's test alone)
  $q --name dsnot --runs $(for k in s0.5 s0.6 s0.7 2:4; do for m in wanda sparsegpt; do
       printf '%s ' $m:$k $m.refine=dsnot:$k $m.refine=dsnot-mean:$k; done; done)
  # one storage rule: CoSpaDi and ROCKET with the same value storage (the model dtype, then int8) at equal bytes
  [ "$1" = bundled ] && $q --name storage_rule --override '{"cospadi": {"iters": 20}}' \
     --runs rocket:r0.3 rocket:r0.5 cospadi:r0.3 cospadi:r0.5 rocket/int8:r0.3 cospadi/int8:r0.3
  [ "$1" = minilm ] && $q --name storage_rule --runs rocket/bf16-14bit:r0.2 rocket/int8:r0.2 rocket/bf16-14bit:r0.3
  # sparsity + int4 (GQSA-lite) against 2:4 and 4-bit-only (GPTQ) at equal bytes
  [ "$1" = bundled ] && $q --name w4_sparsity --runs sparsegpt:2:4 gptq:r0.7 gqsa:r0.74 sparsegpt/int4g16:2:4 \
     sparsegpt/int4g16:r0.74 gqsa:s0.5 gqsa:r0.8 sparsegpt/int4g128:2:4 sparsegpt/int4g128:r0.832
  true
}

if [ $# -gt 0 ]; then chain "$1"; exit; fi
chain bundled
chain minilm
python benchmarks/storage.py
python benchmarks/factorization_speed.py
python benchmarks/peer_llmcompressor.py   # needs llm-compressor in /tmp/llmc: see ../shared/tools/README.md
OMP_WAIT_POLICY=PASSIVE python benchmarks/kernels.py --part all   # compressed-layer kernels vs dense (CPU)
