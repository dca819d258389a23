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
# float32 like MiniLM; one protocol for all its rows: 32 calibration windows x 256 tokens, 32 evaluation windows of
# 256 tokens (stdlib). Its whole chain is many hours on one core; `benchmarks/run_all.sh smollm2-round` is the
# subset measured this round (docs/benchmarks/README.md says which rows).
declare -A COSPADI=([bundled]='"iters": 20, "storage": "bf16-14bit"' [minilm]='"iters": 20, "storage": "dtype"'
                    [smollm2]='"iters": 20, "storage": "dtype"')
declare -A PROTOCOL=([smollm2]="--nsamples 32 --seqlen 256 --windows 32")
# sparsity + int4 against 2:4 and 4-bit only at equal bytes on a float32 model: gptq int4/g128 removes ~0.87,
# W4S50 (gqsa 50 % of 1x16 blocks) ~0.916, sparsegpt 2:4 + int4/g16 ~0.867
W4_FP32="sparsegpt:2:4 gptq:r0.85 sparsegpt/int4g16:2:4 gqsa:r0.87 sparsegpt/int4g16:r0.87 gqsa:s0.5
         sparsegpt/int4g128:2:4 sparsegpt/int4g128:r0.916"
# SmolLM2's 576 inputs are not a multiple of 128: gptq and sparsegpt quantize per 64 inputs there
W4_SMOLLM2="sparsegpt:2:4 gptq/int4g64:r0.85 sparsegpt/int4g16:2:4 gqsa:r0.87 sparsegpt/int4g16:r0.87 gqsa:s0.5
            sparsegpt/int4g64:2:4 sparsegpt/int4g64:r0.916"
runs() { for r in $R; do for m in "$@"; do printf '%s ' "${m/R/$r}"; done; done; }

chain() {
  local q="python benchmarks/quality.py --testbed $1 ${PROTOCOL[$1]:-}" docs=docs/benchmarks
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
  # issue 14's menu: structured pruning (a whole-model candidate), pruning, low rank, sparse dictionary, int8 GPTQ
  $q --name mixed_toolbox_runs --runs $(R="0.3 0.5" runs flap+rocket+svd-llm+sparsegpt+gptq/int8g64:rR@knapsack) \
     gptq/int8g64:r0.3
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
  [ "$1" = minilm ] && $q --name w4_sparsity --reuse $docs/quality_$1_pruning.json --runs $W4_FP32
  [ "$1" = smollm2 ] && $q --name w4_sparsity --reuse $docs/quality_$1_pruning.json --runs $W4_SMOLLM2
  # CoSpaDi's dictionary storage (dict_storage) at equal bytes: float32 / bf16 / int8 D, pruning rows for scale
  # CoSpaDi with today's defaults (coder auto -> HTP, MOD) beside the factorization table's exact OMP + K-SVD rows
  [ "$1" = minilm ] && $q --name cospadi_defaults --override "$CO" --runs $(runs cospadi:rR)
  [ "$1" = minilm ] && $q --name dict_storage --override "$CO" --reuse $docs/quality_minilm_factorization.json \
     --runs cospadi:r0.3 cospadi.dict_storage=bf16:r0.3 cospadi.dict_storage=int8:r0.3 sparsegpt:r0.3 wanda:r0.3 \
     cospadi.dict_storage=int8:r0.5 cospadi:r0.5
  true
}

# The SmolLM2 rows measured this round (a subset of `chain smollm2`, same protocol), and the peer comparison.
smollm2_round() {
  local q="python benchmarks/quality.py --testbed smollm2 ${PROTOCOL[smollm2]}" docs=docs/benchmarks R="0.3 0.5"
  $q --name pruning --runs magnitude:s0.5 wanda:s0.5 sparsegpt:s0.5 magnitude:2:4 wanda:2:4 sparsegpt:2:4
  $q --name dsnot --reuse $docs/quality_smollm2_pruning.json --runs $(for k in s0.5 2:4 s0.6 s0.7; do
       for m in wanda sparsegpt; do printf '%s ' $m:$k $m.refine=dsnot:$k; done; done)
  $q --name w4_sparsity --reuse $docs/quality_smollm2_pruning.json --runs sparsegpt:2:4 gptq/int4g64:r0.85 gqsa:s0.5 \
     sparsegpt/int4g16:2:4 sparsegpt/int4g16:r0.87 sparsegpt/int4g64:2:4 sparsegpt/int4g64:r0.916
  $q --name factorization --runs svd:r0.2 $(runs sparsegpt:rR wanda:rR svd-llm:rR) asvd:r0.3 magnitude:r0.3
  $q --name knapsack_runs --runs svd-llm:r0.3@knapsack svd-llm:r0.5@knapsack
  # sparse dictionaries (rocket:r0.3@knapsack first of its kind here: its seconds are the whole run; the other
  # knapsack rows reuse its option tables)
  $q --name sparse_dict --override "{\"cospadi\": {${COSPADI[smollm2]}}}" \
     --runs rocket:r0.3 rocket:r0.3@knapsack cospadi:r0.3 rocket:r0.2 rocket:r0.4 rocket:r0.5 rocket:r0.2@knapsack \
     rocket:r0.4@knapsack rocket:r0.5@knapsack cospadi:r0.2 cospadi:r0.4
  # FLAP uniform at 0.3 / 0.5 first: the mixed menu's entries alone copy them from this table
  $q --name structured --runs flap.structure=uniform:r0.3 flap.structure=uniform:r0.5
  # issue 14's menu at 0.3 and 0.5 beside its entries alone (all but int8 GPTQ and ROCKET 0.5 copied from above)
  $q --name mixed_toolbox_runs --reuse $docs/quality_smollm2_structured.json $docs/quality_smollm2_sparse_dict.json \
     $docs/quality_smollm2_factorization.json --runs sparsegpt:r0.3 svd-llm:r0.3 rocket:r0.3 flap.structure=uniform:r0.3 \
     gptq/int8g64:r0.3 flap+rocket+svd-llm+sparsegpt+gptq/int8g64:r0.3@knapsack \
     sparsegpt:r0.5 svd-llm:r0.5 rocket:r0.5 flap.structure=uniform:r0.5 flap+rocket+svd-llm+sparsegpt+gptq/int8g64:r0.5@knapsack
  # issue 10's menu (ROCKET + SVD-LLM + SparseGPT) at 0.3 and 0.5 beside its entries alone (copied)
  $q --name mixed_sparsegpt_runs --reuse $docs/quality_smollm2_mixed_toolbox_runs.json \
     $docs/quality_smollm2_sparse_dict.json $docs/quality_smollm2_factorization.json --runs sparsegpt:r0.3 svd-llm:r0.3 \
     rocket:r0.3 rocket+svd-llm+sparsegpt:r0.3@knapsack sparsegpt:r0.5 svd-llm:r0.5 rocket:r0.5 \
     rocket+svd-llm+sparsegpt:r0.5@knapsack
  # structured pruning beside SVD-LLM, ROCKET and SparseGPT at equal bytes (FLAP 0.2 / 0.4, FLAP adaptive, ZipLM and
  # SVD-LLM 0.2 / 0.4 computed, the rest copied)
  $q --name structured --reuse $docs/quality_smollm2_mixed_toolbox_runs.json $docs/quality_smollm2_structured.json \
     $docs/quality_smollm2_sparse_dict.json $docs/quality_smollm2_factorization.json --runs $(for r in 0.2 0.3 0.4 0.5; do
       printf '%s ' flap:r$r flap.structure=uniform:r$r
       printf '%s ' ziplm.structure=uniform:r$r svd-llm:r$r rocket:r$r; [ $r = 0.3 ] && printf '%s ' rocket:r0.3@knapsack
       case $r in 0.3|0.5) printf '%s ' sparsegpt:r$r;; esac; done)
  # session 10: CoSpaDi's coders side by side (today's HTP + MOD rows copied, 0.5 computed; exact OMP + K-SVD
  # computed, about 40 min a ratio on one core), issue 10's menu at every ratio, every factorization at 0.2-0.5
  local X=cospadi.coder=omp.dict_update=ksvd
  $q --name cospadi_coders --override "{\"cospadi\": {${COSPADI[smollm2]}}}" --reuse $docs/quality_smollm2_sparse_dict.json \
     --runs cospadi:r0.2 cospadi:r0.3 cospadi:r0.4 cospadi:r0.5 $X:r0.3 $X:r0.5 $X:r0.4 $X:r0.2
  $q --name mixed_sparsegpt_runs --reuse $docs/quality_smollm2_structured.json $docs/quality_smollm2_sparse_dict.json \
     $docs/quality_smollm2_factorization.json --runs $(R="0.2 0.3 0.4 0.5" runs sparsegpt:rR svd-llm:rR rocket:rR \
     rocket+svd-llm+sparsegpt:rR@knapsack)
  $q --name factorization --reuse $docs/quality_smollm2_structured.json $docs/quality_smollm2_mixed_sparsegpt_runs.json \
     --runs $(R="0.2 0.3 0.4 0.5" runs svd:rR asvd:rR svd-llm:rR wanda:rR sparsegpt:rR magnitude:rR)
  python benchmarks/peer_llmcompressor.py --model /tmp/smollm2 --nsamples 32 --windows 32 --runs sparsegpt:0:0 \
     wanda:0:0 --no-peer-as-is --repeats 1 --work /tmp/cmp/smol --name peer_llmcompressor_smollm2
}

if [ "${1:-}" = smollm2-round ]; then smollm2_round; exit; fi
if [ $# -gt 0 ]; then chain "$1"; exit; fi
chain bundled
chain minilm
python benchmarks/storage.py
python benchmarks/factorization_speed.py
python benchmarks/peer_llmcompressor.py   # needs llm-compressor in /tmp/llmc: see ../shared/tools/README.md
python benchmarks/kernel_speed.py --part all   # compressed-layer kernels vs dense (CPU; OpenMP's default wait policy, as users run)
