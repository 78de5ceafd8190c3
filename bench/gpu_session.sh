#!/usr/bin/env bash
# One script that checks and times the GPU path on the lent GPU machine, a step per call:
#   bash bench/gpu_session.sh check      # versions, GPU tests, kernel bandwidth benchmark
#   bash bench/gpu_session.sh pipeline   # ETL + training, GPU vs 16-core CPU, same data, same run
#   bash bench/gpu_session.sh scoring    # 20M-row batch scoring, flow vs naive loop, GPU
#   bash bench/gpu_session.sh scoring_cpu_check  # the 20M-row GPU flow's scores against the CPU model
#   bash bench/gpu_session.sh input_codecs  # the scoring bench on inputs written zstd, then snappy
#   bash bench/gpu_session.sh run        # the whole training pipeline (gpupipe run) on GPU
#   bash bench/gpu_session.sh multigpu   # 1 vs 2 GPUs: xgboost.dask training and batch scoring
#   bash bench/gpu_session.sh profile    # per-step GPU scoring profile (after `scoring`)
#   bash bench/gpu_session.sh profile_batched  # whole files in batches: per-step cost by batch size
#   bash bench/gpu_session.sh batch      # GPU tests + batch-mode scoring profile
#   bash bench/gpu_session.sh profile_etl  # GPU ETL steps, one frame vs dask, + cProfile
#   bash bench/gpu_session.sh write      # predictions write cost by table layout and options
#   bash bench/gpu_session.sh mlp        # MLP fit: CUDA-graph steps vs eager vs the CPU
#   bash bench/gpu_session.sh processes  # scoring processes sharing one GPU, no dask or Prefect
#   bash bench/gpu_session.sh train_stage  # cProfile of the MLP and XGBoost stages beyond the fit
#   bash bench/gpu_session.sh timeline   # CUDA activity of one scoring process (torch.profiler)
#   bash bench/gpu_session.sh variants   # one scoring process per setting (codecs, predictor)
#   bash bench/gpu_session.sh tree       # tree kernel: GPU tests, then against XGBoost's predictor
#   bash bench/gpu_session.sh streams    # I/O threads' own CUDA streams vs the default stream (A/B)
#   OLD_TREE=dir bash bench/gpu_session.sh ab_code  # worker pipeline: this code vs another commit's
#   AB_A=k=v AB_B=k=v bash bench/gpu_session.sh scoring_ab  # the flow bench, settings in A B B A order
#   AB_A='k=v k=v' AB_B=... ROUNDS=n bash bench/gpu_session.sh flow_ab  # job settings, one cluster
#   bash bench/gpu_session.sh readers    # worker pipeline: batches read 1 vs 2 at once (A/B)
#   bash bench/gpu_session.sh transform_steps  # where the transform's time goes (host, synced)
#   OLD_TREE=dir bash bench/gpu_session.sh transform_kernels  # string lookup and drift kernels
#   OLD_TREE=dir bash bench/gpu_session.sh etl_ab  # GPU ETL: this code vs another's, steps, cProfile
#   bash bench/gpu_session.sh etl_rounds  # ETL alone, GPU vs 16-core CPU, ROUNDS rounds, one cluster
#   bash bench/gpu_session.sh etl_write_streams  # feature write: now vs own-stream threads (no gain)
# Expects the staged wheels installed into /tmp/site (../shared/tools/gpu-wheels). Every step
# writes its logs and JSON under $OUT and goes on past a failing part, so one call says it all.
set -uo pipefail
step=${1:?step}
out=${OUT:-/tmp/gpupipe-out}
mkdir -p "$out"
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
# NVLink multicast stays off on shared multi-GPU hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PREFECT_HOME=/tmp/prefect-home PREFECT_LOGGING_LEVEL=WARNING
rows=${ROWS:-20000000}
py=python3
warn=(-W "ignore::DeprecationWarning" -W "ignore::FutureWarning" -W "ignore::UserWarning")

part() {  # part NAME CMD...: run one part, log it, never stop the step
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  date +%T
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n 25 "$out/$name.log"
}

profile_summary() {  # profile_summary PREFIX: rows/s of each $out/PREFIX_*.json (traced runs: GPU
  # busy and the reading and scoring steps), then all of them in one tar: a device call returns
  # at most 8 files
  local prefix=$1
  $py - "$out"/"$prefix"_*.json <<'SUMMARY'
import json, sys
for path in sys.argv[1:]:
    d = json.load(open(path))
    line = f"{path.rsplit('/', 1)[-1]}: {d['timed']['rows_per_s'] / 1e6:.1f}M rows/s"
    if "traced" in d:
        t = d["traced"]
        line += f"; traced {t['seconds']:.3f} s, GPU busy {t['gpu']['any_busy_s']:.3f} s; "
        line += ", ".join(f"{k} {v['seconds']:.3f}" for k, v in t["steps"].items()
                          if k.split(" / ")[-1] in ("read_many", "is_key", "score_batch"))
    print(line)
SUMMARY
  tar -czf "$out/${prefix}_${rows}.tar.gz" -C "$out" $(cd "$out" && ls "$prefix"_*.json "$prefix"_*.log)
}

case $step in
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    part versions $py -c "
import cudf, dask, dask_cudf, dask_cuda, xgboost, cupy, torch, triton, pandas, pyarrow, numba
import prefect, mlflow, onnxruntime
for m in (cudf, dask, dask_cuda, xgboost, cupy, torch, triton, pandas, pyarrow, numba, prefect, mlflow, onnxruntime):
    print(m.__name__, m.__version__)
print('gpus', cupy.cuda.runtime.getDeviceCount())"
    part debug_etl $py bench/debug_gpu_etl.py
    part gpu_tests $py -m pytest -q -p no:cacheprovider "${warn[@]}" -m gpu tests
    part cpu_tests $py -m pytest -q -p no:cacheprovider "${warn[@]}" tests/unit
    part bench_kernels $py bench/bench_kernels.py --out "$out/bench_kernels.json"
    ;;
  pipeline)
    rm -rf /tmp/gpupipe-bench/gpu/etl /tmp/gpupipe-bench/cpu/etl  # time the ETL, not its reuse
    part bench_pipeline $py bench/bench_pipeline.py --rows "$rows" --devices gpu,cpu \
      --cpu-workers "${CPU_WORKERS:-16}" --trees 200 --depth 8 --mlp-epochs 1 \
      --warmup-rows "${WARMUP_ROWS:-3000000}" --out "$out/bench_pipeline.json"
    ;;
  profile)
    part profile_gpu_scoring $py bench/profile_gpu_scoring.py --work /tmp/gpupipe-bench-scoring \
      --files "${PROFILE_FILES:-8}" --out "$out/profile_gpu_scoring.json"
    ;;
  profile_batched)  # files per batch: per-step cost, pipelined rate; default / spill / RMM pool
    part profile_batched $py bench/profile_gpu_batched.py --rows "$rows" --out "$out/profile_batched.json"
    part profile_batched_spill $py bench/profile_gpu_batched.py --rows "$rows" --spill \
      --batches 1,8 --pipelined 8 --out "$out/profile_batched_spill.json"
    part profile_batched_pool $py bench/profile_gpu_batched.py --rows "$rows" --rmm-pool 40GB \
      --batches 1,8 --pipelined 8 --out "$out/profile_batched_pool.json"
    ;;
  batch)  # batch-mode scoring: GPU tests, then per-step cost and score_partitions per batch size
    part gpu_tests $py -m pytest -q -p no:cacheprovider "${warn[@]}" -m gpu tests
    part profile_batched_async $py bench/profile_gpu_batched.py --rows "$rows" --rmm-async \
      --batches 1,8,20 --pipelined 8,20 --out "$out/profile_batched_async.json"
    ;;
  profile_etl)  # one cuDF frame vs dask-cuDF partitions, stage timings side by side
    part profile_gpu_etl $py bench/profile_gpu_etl_steps.py --rows "$rows" --frames auto,dask \
      --plain-runs 2 --runs 1 --out "$out/profile_gpu_etl.json"
    part profile_gpu_etl_cprofile env CUDA_LAUNCH_BLOCKING=1 $py bench/profile_gpu_etl_steps.py \
      --rows "$rows" --plain-runs 0 --runs 0 --cprofile --out "$out/profile_gpu_etl_cprofile.json"
    ;;
  write)  # predictions write cost by table layout and parquet options, then by file I/O settings
    part profile_gpu_write $py bench/profile_gpu_write.py --rows "$rows" --out "$out/profile_gpu_write.json"
    part profile_gpu_write_shm $py bench/profile_gpu_write.py --rows "$rows" --quick \
      --work /dev/shm/gpupipe-bench-write --out "$out/profile_gpu_write_shm.json"
    for setting in LIBCUDF_CUFILE_POLICY=OFF KVIKIO_NTHREADS=8 KVIKIO_NTHREADS=16; do
      part "profile_gpu_write_${setting}" env "$setting" $py bench/profile_gpu_write.py \
        --rows "$rows" --quick --out "$out/profile_gpu_write_${setting}.json"
    done
    ;;
  etl_write)  # the ETL's feature write: options, one call vs per split, threads, bounds
    part profile_gpu_etl_write $py bench/profile_gpu_etl_write.py --rows "$rows" \
      --out "$out/profile_gpu_etl_write.json"
    ;;
  etl_write_streams)  # the ETL's feature write as now vs files written on threads with their
    # own CUDA streams (3, 6, 10), and the device-to-host copy bound, same table, one process
    part profile_gpu_etl_write_streams $py bench/profile_gpu_etl_write.py --rows "$rows" \
      --only "as the ETL writes,own streams,splits in 3 threads,bound: copy to host" \
      --out "$out/profile_gpu_etl_write_streams.json"
    ;;
  pinned)  # libcudf's host buffers in pinned memory: writes with and without, side by side
    pinned_env=(LIBCUDF_PINNED_POOL_SIZE=4294967296 LIBCUDF_ALLOCATE_HOST_AS_PINNED_THRESHOLD=4294967296)
    part write_pageable $py bench/profile_gpu_etl_write.py --rows "$rows" --quick \
      --out "$out/etl_write_pageable.json"
    part write_pinned env "${pinned_env[@]}" $py bench/profile_gpu_etl_write.py --rows "$rows" \
      --quick --out "$out/etl_write_pinned.json"
    part pred_write_pageable $py bench/profile_gpu_write.py --rows "$rows" --quick \
      --out "$out/pred_write_pageable.json"
    part pred_write_pinned env "${pinned_env[@]}" $py bench/profile_gpu_write.py --rows "$rows" \
      --quick --out "$out/pred_write_pinned.json"
    ;;
  mlp)  # MLP fit alone: CUDA-graph steps vs eager steps vs the CPU, 1 and 4 epochs
    for epochs in 1 4; do
      part "profile_mlp_fit_${epochs}ep" $py bench/profile_mlp_fit.py --rows "${MLP_ROWS:-2000000}" \
        --epochs "$epochs" --out "$out/profile_mlp_fit_${epochs}ep.json"
    done
    ;;
  processes)  # scoring processes sharing one GPU (score_partitions alone, no dask or Prefect)
    part profile_gpu_processes $py bench/profile_gpu_processes.py --rows "$rows" \
      --processes "${PROCESSES:-1,2,3,4}" --out "$out/profile_gpu_processes.json"
    ;;
  train_stage)  # cProfile of each training stage beyond its fit, on the scoring bench's 20M rows
    for model in mlp xgboost; do
      part "profile_train_stage_${model}" $py bench/profile_train_stage.py --device gpu \
        --model "$model" --data "${TRAIN_DATA:-/tmp/gpupipe-bench-scoring/unique-20x1000000-s0}" \
        --out "$out/profile_train_stage_${model}.json"
    done
    ;;
  timeline)  # GPU busy vs wall for the worker pipeline: default streams, per-thread, /dev/shm
    which nsys ncu 2>&1 | head -3
    part timeline $py bench/profile_gpu_timeline.py --rows "$rows" --out "$out/timeline.json"
    part timeline_ptds env CUDF_PER_THREAD_STREAM=1 CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 \
      $py bench/profile_gpu_timeline.py --rows "$rows" --out "$out/timeline_ptds.json"
    part timeline_shm $py bench/profile_gpu_timeline.py --rows "$rows" --no-trace \
      --output-root /dev/shm/gpupipe-timeline --out "$out/timeline_shm.json"
    ;;
  variants)  # the worker pipeline alone, one process per setting, same data (VARIANTS="name:ENV=V ...")
    part prepare timeout 900 $py bench/profile_gpu_timeline.py --rows "$rows" --files "${FILES:-20}" \
      --prepare-only
    for v in ${VARIANTS:-base}; do  # name:WORD,WORD: ENV=V words go to env, the rest to the script
      name=${v%%:*}; settings=${v#*:}; [ "$settings" = "$v" ] && settings=""
      envs=(); args=()
      for w in ${settings//,/ }; do
        if [[ $w == [A-Z]*=* ]]; then envs+=("$w"); else args+=("$w"); fi
      done
      part "variant_$name" timeout 300 env "${envs[@]}" $py bench/profile_gpu_timeline.py \
        --rows "$rows" --files "${FILES:-20}" ${TIMELINE_ARGS:---no-trace} "${args[@]}" \
        --out "$out/variant_$name.json"
    done
    ;;
  tree)  # the tree-inference kernel and what uses it: GPU tests, then kernel vs XGBoost
    part tree_tests $py -m pytest -q -p no:cacheprovider "${warn[@]}" -m gpu \
      tests/unit/test_tree_predict.py tests/unit/test_bin_counts_kernel.py \
      tests/unit/test_scoring.py tests/unit/test_gpu_path.py
    part bench_tree_predict $py bench/bench_tree_predict.py --rows "$rows" \
      --out "$out/bench_tree_predict.json"
    ;;
  streams)  # worker pipeline with cuDF I/O on the I/O threads' streams vs the default stream,
    # alternating, same data; then one traced run of each (GPU busy time, kernels per stream)
    part prepare timeout 900 $py bench/profile_gpu_timeline.py --rows "$rows" --files "${FILES:-20}" \
      --prepare-only
    for run in 1 2 traced; do
      for v in streams legacy; do
        flags=()
        [ $v = legacy ] && flags+=(--no-gpu-streams)
        [ $run = traced ] || flags+=(--no-trace)
        part "streams_${v}_$run" timeout 300 $py bench/profile_gpu_timeline.py --rows "$rows" \
          --files "${FILES:-20}" "${flags[@]}" --out "$out/streams_${v}_$run.json"
      done
    done
    profile_summary streams
    ;;
  etl_rounds)  # the ETL alone, GPU then 16-core CPU per round, same files, one CPU cluster
    part etl_rounds timeout 590 $py bench/bench_pipeline.py --rows "$rows" --devices gpu,cpu \
      --cpu-workers 16 --etl-rounds "${ROUNDS:-3}" --out "$out/etl_rounds.json"
    grep -h "^ETL" "$out/etl_rounds.log"
    ;;
  etl_ab)  # the in-memory GPU ETL, this tree's code vs another's (OLD_TREE), in alternating
    # processes on the same files; then this tree's steps timed between device synchronisations
    # and a cProfile with CUDA_LAUNCH_BLOCKING=1 (each kernel paid by the call that launched it)
    old_tree=$(cd "${OLD_TREE:?set OLD_TREE to a directory with the other tasks/ and kernels/}" && pwd)
    mkdir -p "$old_tree/bench" && cp bench/profile_gpu_etl_steps.py "$old_tree/bench/"
    part etl_data $py -c "from pathlib import Path; from tasks.generate import generate_transactions as g
g($rows, Path('/tmp/gpupipe-bench/data-$rows'), seed=0); g(${WARMUP_ROWS:-3000000}, Path('/tmp/gpupipe-bench/data-${WARMUP_ROWS:-3000000}'), seed=0)"
    sync; sleep 5  # let the generated files' write-back settle before timing
    for round in 1 2; do
      for v in old new; do
        root=$PWD
        [ $v = old ] && root=$old_tree
        PYTHONPATH="/tmp/site:$root" part "etl_ab_${v}_$round" timeout 300 $py \
          "$root/bench/profile_gpu_etl_steps.py" --rows "$rows" --plain-runs 3 --runs 0 \
          --out "$out/etl_ab_${v}_$round.json"
      done
    done
    part etl_steps timeout 300 env CUDA_LAUNCH_BLOCKING=1 $py bench/profile_gpu_etl_steps.py \
      --rows "$rows" --plain-runs 0 --runs 1 --cprofile --out "$out/etl_steps_cprofile.json"
    grep -h "^plain\|^steps" "$out"/etl_ab_*.log
    ;;
  ab_code)  # the worker pipeline, this tree's code vs another's (OLD_TREE: a directory holding
    # that commit's tasks/ and kernels/), alternating, same data and same profiling script
    old_tree=${OLD_TREE:?set OLD_TREE to a directory with the other tasks/ and kernels/}
    part prepare timeout 900 $py bench/profile_gpu_timeline.py --rows "$rows" --files "${FILES:-20}" \
      --prepare-only
    for run in 1 2 traced; do
      for v in new old; do
        flags=()
        [ $run = traced ] || flags+=(--no-trace)
        root=$PWD
        [ $v = old ] && root=$(cd "$old_tree" && pwd)
        # the script puts its own tree first on sys.path: run the other tree's copy of it
        [ -f "$root/bench/profile_gpu_timeline.py" ] || { mkdir -p "$root/bench" && cp bench/*.py "$root/bench/"; }
        PYTHONPATH="/tmp/site:$root" part "ab_${v}_$run" timeout 300 $py "$root/bench/profile_gpu_timeline.py" \
          --rows "$rows" --files "${FILES:-20}" "${flags[@]}" --out "$out/ab_${v}_$run.json"
      done
    done
    profile_summary ab
    ;;
  readers)  # the worker pipeline with 1 or 2 batches decoded at once, alternating, same data;
    # then one traced run of each (GPU busy, read_many span per reading thread)
    part prepare timeout 900 $py bench/profile_gpu_timeline.py --rows "$rows" --files "${FILES:-20}" \
      --prepare-only
    for run in 1 2 traced; do
      for n in 2 1; do
        flags=()
        [ $run = traced ] || flags+=(--no-trace)
        part "readers_${n}_$run" timeout 300 $py bench/profile_gpu_timeline.py --rows "$rows" \
          --files "${FILES:-20}" --read-threads "$n" "${flags[@]}" --out "$out/readers_${n}_$run.json"
      done
    done
    profile_summary readers
    ;;
  transform_steps)  # where one pipeline's transform spends its time: host spans of its parts,
    # then the same with the device synchronised after each part (its GPU work included)
    part prepare timeout 900 $py bench/profile_gpu_timeline.py --rows "$rows" --files "${FILES:-20}" \
      --prepare-only
    part transform_steps timeout 300 $py bench/profile_gpu_timeline.py --rows "$rows" \
      --files "${FILES:-20}" --transform-steps --out "$out/transform_steps.json"
    part transform_steps_synced timeout 300 $py bench/profile_gpu_timeline.py --rows "$rows" \
      --files "${FILES:-20}" --transform-steps --sync-substeps --no-trace \
      --out "$out/transform_steps_synced.json"
    grep -h "timed:\|transform\|feature\|fused\|lookup\|entity\|time feat\|predict\|traced:" \
      "$out"/transform_steps*.log
    ;;
  transform_kernels)  # GPU tests of the transform's kernels and their users, then the string
    # lookup (kernel vs cuDF's index, same run) and the drift counts (this tree, then OLD_TREE's
    # bin_counts when set)
    part transform_kernel_tests $py -m pytest -q -p no:cacheprovider "${warn[@]}" -m gpu \
      tests/unit/test_string_match_kernel.py tests/unit/test_bin_counts_kernel.py \
      tests/unit/test_key_index.py tests/unit/test_gpu_path.py tests/unit/test_scoring.py \
      tests/unit/test_drift.py
    part bench_transform_kernels $py bench/bench_transform_kernels.py --rows "$rows" \
      --out "$out/bench_transform_kernels.json"
    if [ -n "${OLD_TREE:-}" ]; then
      root=$(cd "$OLD_TREE" && pwd)
      mkdir -p "$root/bench" && cp bench/bench_transform_kernels.py bench/bench_tree_predict.py "$root/bench/"
      PYTHONPATH="/tmp/site:$root" part bench_transform_kernels_old $py \
        "$root/bench/bench_transform_kernels.py" --rows "$rows" --only bin_counts \
        --out "$out/bench_transform_kernels_old.json"
    fi
    ;;
  flow_ab)  # job-level settings A and B (space-separated KEY=VALUE; empty = defaults), ROUNDS x
    # A B B A flow runs on one running cluster with the model loaded
    part flow_ab timeout 590 $py bench/bench_scoring.py --rows "$rows" --files "${FILES:-20}" \
      --device gpu --work /tmp/gpupipe-bench-scoring --out "$out/flow_ab.json" \
      --ab-rounds "${ROUNDS:-2}" --ab-a "${AB_A:-}" --ab-b "${AB_B:-}"
    ;;
  tests)
    part gpu_tests $py -m pytest -q -p no:cacheprovider "${warn[@]}" -m gpu tests
    # the Triton kernels' own tests carry no `gpu` marker (CI runs them in the interpreter):
    # here they run compiled, on the GPU
    part kernel_tests $py -m pytest -q -p no:cacheprovider "${warn[@]}" \
      tests/unit/test_kernels.py tests/unit/test_bin_counts_kernel.py \
      tests/unit/test_string_match_kernel.py tests/unit/test_tree_predict.py
    ;;
  scoring)
    part "bench_scoring${TAG:-}" $py bench/bench_scoring.py --rows "$rows" --files "${FILES:-20}" \
      --device gpu --work /tmp/gpupipe-bench-scoring --out "$out/bench_scoring${TAG:-}.json" \
      ${SCORING_ARGS:-}
    ;;
  scoring_cpu_check)  # issue 4's last "done when" item: a 20M-row GPU flow run whose scores are
    # compared with the model on the CPU, every file, matched by id (tolerance 1e-5)
    part bench_scoring_cpu_check $py bench/bench_scoring.py --rows "$rows" --files "${FILES:-20}" \
      --device gpu --no-warm --cpu-check-files "${FILES:-20}" --work /tmp/gpupipe-bench-scoring \
      --out "$out/bench_scoring_cpu_check.json"
    grep -h "CPU model" "$out/bench_scoring_cpu_check.log"
    ;;
  input_codecs)  # the same rows written zstd (the generator's codec) and snappy (pyarrow's and
    # Spark's default): what the input's parquet decode costs the flow end to end
    for codec in zstd snappy; do
      part "bench_scoring_$codec" $py bench/bench_scoring.py --rows "$rows" --files "${FILES:-20}" \
        --device gpu --work /tmp/gpupipe-bench-scoring --input-codec "$codec" \
        --out "$out/bench_scoring_$codec.json"
    done
    grep -h "model cached)" "$out"/bench_scoring_zstd.log "$out"/bench_scoring_snappy.log
    ;;
  scoring_ab)  # bench_scoring with two settings in A B B A order on one machine (in the ninth
    # session the order of two back-to-back runs moved the 200M-row results by about 0.5 s):
    # AB_A and AB_B are --set arguments, e.g. AB_A=scoring.gpu_worker_threads=1
    n=0
    for setting in "${AB_A:?AB_A=KEY=VALUE}" "${AB_B:?AB_B=KEY=VALUE}" "$AB_B" "$AB_A"; do
      n=$((n + 1))
      part "bench_scoring_ab$n" $py bench/bench_scoring.py --rows "$rows" --files "${FILES:-20}" \
        --device gpu --work /tmp/gpupipe-bench-scoring --out "$out/bench_scoring_ab$n.json" \
        --set "$setting"
    done
    $py - "$out"/bench_scoring_ab?.json <<'SUMMARY'
import json, sys
for path in sys.argv[1:]:
    d = json.load(open(path))
    runs = ", ".join(f"{r['name'].strip()} {r['seconds']:.2f} s" for r in d["results"])
    print(f"{path.rsplit('/', 1)[-1]} {d['params']['set']}: {runs}")
SUMMARY
    ;;
  multigpu)
    CUDA_VISIBLE_DEVICES=0 part debug_etl $py bench/debug_gpu_etl.py
    part bench_multigpu_train $py bench/bench_multigpu.py --rows "$rows" --gpus 1,2 \
      --out "$out/bench_multigpu_train.json"
    ;;
  multigpu_scoring)
    for n in 1 2; do
      part "bench_scoring_${n}gpu" $py bench/bench_scoring.py --rows "$rows" --files "${FILES:-20}" \
        --device gpu --workers "$n" --no-warm --work /tmp/gpupipe-bench-scoring \
        --out "$out/bench_scoring_${n}gpu.json"
    done
    ;;
  run)
    part gpupipe_run $py -m flows.cli run --device gpu --rows "${RUN_ROWS:-2000000}" \
      --home /tmp/gpupipe-run/home --set 'publish.model_repo="/tmp/gpupipe-run/model_repo"'
    cp /tmp/gpupipe-run/home/last_run.json "$out/last_run_gpu.json" 2>/dev/null
    ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
