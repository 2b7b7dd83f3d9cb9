#!/usr/bin/env bash
# The project's GPU measurements in a few batched calls (for a lent GPU machine with
# nothing installable: run from the repo root with the image's python3).
#   bash benchmarks/gpu_suite.sh train     # training-step throughput + digits runs
#   bash benchmarks/gpu_suite.sh analysis  # waterline --measure for convnext_tiny, convfirst_t
#   MODEL=convfirst_t bash benchmarks/gpu_suite.sh scaling   # 1 vs all GPUs + a real run
#   bash benchmarks/gpu_suite.sh convfirst # ConvFirst/MBConv blocks: inference + training
#   BWD_BLOCK_M=64 bash benchmarks/gpu_suite.sh convfirst   # ... with the 64-row backward (default 128)
#   MODELS=convfirst_t,convnext_tiny bash benchmarks/gpu_suite.sh models  # whole-model img/s
#   bash benchmarks/gpu_suite.sh mosaic    # Mosaic GPU kernel variants vs XLA and Triton
#   bash benchmarks/gpu_suite.sh dwconv    # Pallas depthwise conv vs XLA, block forwards
#   COLUMNS=1 bash benchmarks/gpu_suite.sh dwconv  # the column-walk conv variants only
#   bash benchmarks/gpu_suite.sh pipelined # pipelined vs serial Mosaic kernels (+ their tests)
#   bash benchmarks/gpu_suite.sh mosaic_train  # training-path blocks (Mosaic backward) + step
#   bash benchmarks/gpu_suite.sh ws        # two-warpgroup backward kernels: GPU tests + blocks
#   SHAPE=128,28,28,192 bash benchmarks/gpu_suite.sh retune  # tuning.retune vs the table
#   bash benchmarks/gpu_suite.sh profile   # per-kernel GPU time: stage blocks, ConvNeXt-T
#   bash benchmarks/gpu_suite.sh layernorm # stem / downsampling LayerNorm kernels vs XLA
#   bash benchmarks/gpu_suite.sh gconv     # Mosaic grouped conv / MBConv stage: GPU tests, vs XLA
#   bash benchmarks/gpu_suite.sh cfstage   # ConvFirst stages in the padded-row layout + convfirst_t
#   MODEL=convnext_tiny bash benchmarks/gpu_suite.sh compare  # xla vs auto step, 2 processes each
#   SHAPES=56x96 bash benchmarks/gpu_suite.sh wgrad  # depthwise kernel-gradient kernels vs XLA
#   bash benchmarks/gpu_suite.sh gemm      # GEMM forms of the split kernels: GPU tests, kernels
#   MODEL=convfirst_t bash benchmarks/gpu_suite.sh dispatch  # block_impl=None at batch 1-32:
#                                          # each stage's forms, then the model xla vs auto
# Results go to $OUT (or ./out) as JSON / PNG / logs; a short summary is printed last.
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
log() { echo "== $*"; }
case "${1:-}" in
  train)
    for spec in "convnext_tiny xla" "convnext_tiny auto" "convfirst_t xla"; do
      set -- $spec
      log "throughput $1 $2"
      timeout 200 python3 -m train.throughput --model "$1" --block-impl "$2" --batch-size 256 \
        --image-size 224 --steps 30 --json "$OUT/tput_$1_$2.json" 2>&1 | grep -v cuda_timer
    done
    log "digits convnext_atto (default run)"
    t=$SECONDS; timeout 200 python3 -m train --no-progress --output-dir /tmp/d1 \
      2>&1 | grep -vE "cuda_timer" | tail -4; echo "wall $((SECONDS - t)) s"
    cp /tmp/d1/curves.png "$OUT/digits_convnext_atto.png" 2>/dev/null
    log "digits convfirst_atto"
    t=$SECONDS; timeout 200 python3 -m train --no-progress --model convfirst_atto \
      --steps 300 --output-dir /tmp/d2 2>&1 | grep -vE "cuda_timer" | tail -4; echo "wall $((SECONDS - t)) s"
    ;;
  analysis)
    for m in convnext_tiny convfirst_t; do
      log "analysis $m"
      timeout 280 python3 -m convfirst_jax.analysis --model "$m" --batch 256 --device h100 \
        --measure --no-progress --plot "$OUT/$m.png" --json "$OUT/$m.json" 2>&1 | grep -v cuda_timer \
        | tee "$OUT/analysis_$m.txt" | tail -32
    done
    ;;
  scaling)
    n=$(python3 -c "import jax; print(jax.device_count())")
    log "devices: $n"
    m=${MODEL:-convnext_tiny}
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m train.throughput --model "$m" \
      --block-impl xla --batch-size 256 --steps 10 --warmup 3 --json "$OUT/scale_1.json" 2>&1 | grep -v cuda_timer
    timeout 200 python3 -m train.throughput --model "$m" --block-impl xla \
      --batch-size $((256 * n)) --steps 10 --warmup 3 --json "$OUT/scale_$n.json" 2>&1 | grep -v cuda_timer
    log "digits on $n devices"
    timeout 150 python3 -m train --no-progress --output-dir /tmp/d3 2>&1 | grep -v cuda_timer | tail -3
    ;;
  convfirst)
    log "training blocks (Pallas grouped-conv layer vs XLA)"
    timeout 280 python3 -m benchmarks.blocks_convfirst_train ${BWD_BLOCK_M:+--bwd-block-m $BWD_BLOCK_M} \
      --json "$OUT/convfirst_train_blocks.json" \
      2>&1 | grep -v cuda_timer | tee "$OUT/convfirst_train_blocks.txt" | tail -9
    log "inference blocks (fused, BatchNorm folded)"
    timeout 280 python3 -m benchmarks.blocks_convfirst --check --json "$OUT/convfirst_blocks.json" \
      2>&1 | grep -v cuda_timer | tee "$OUT/convfirst_blocks.txt" | tail -14
    ;;
  models)
    m=${MODELS:-convfirst_t,convnext_tiny}
    log "whole-model inference $m"
    timeout 560 python3 -m benchmarks.models --models "$m" --batches "${BATCHES:-1,16,64,256}" \
      --impls xla,pallas,auto --json "$OUT/models_${m//,/_}.json" 2>&1 | grep -v cuda_timer \
      | tee "$OUT/models_${m//,/_}.txt" | tail -30
    ;;
  mosaic)
    log "Mosaic GPU fused pointwise kernel vs XLA (and Triton): variants, checks, timings"
    timeout 560 python3 -m benchmarks.mosaic_blocks --json "$OUT/mosaic_blocks.json" 2>&1 \
      | grep -v cuda_timer | tee "$OUT/mosaic_blocks.txt" | tail -10
    ;;
  mosaic_train)
    log "training-path ConvNeXt blocks: XLA vs hybrid vs Mosaic backward (+ dwconv wgrad)"
    timeout 300 python3 -m benchmarks.mosaic_train --json "$OUT/mosaic_train.json" 2>&1 \
      | grep -v cuda_timer | tee "$OUT/mosaic_train.txt" | sed -n '/^ConvNeXt blocks/,$p'
    for impl in xla auto; do
      log "throughput convnext_tiny $impl"
      timeout 150 python3 -m train.throughput --model convnext_tiny --block-impl "$impl" \
        --batch-size 256 --image-size 224 --steps 30 --json "$OUT/tput_convnext_tiny_$impl.json" \
        2>&1 | grep -v cuda_timer | tail -1
    done
    ;;
  ws)
    # the two-warpgroup Mosaic backward kernels: compiled tests (incl. the shared-scratch
    # canary), then the training-path blocks at the stage-2 / stage-3 shapes
    log "GPU tests: two-warpgroup backward kernels"
    timeout 300 python3 -m pytest -q -m gpu tests/pallas_kernels/test_mosaic_mlp_bwd.py \
      -k "two_warpgroup or compiled_bwd or db1_gemm" 2>&1 | grep -v cuda_timer | tail -6
    log "training-path blocks at ${WS_SHAPES:-28x192,14x384}"
    timeout 270 python3 -m benchmarks.mosaic_train --shapes "${WS_SHAPES:-28x192,14x384}" \
      --json "$OUT/mosaic_train_ws.json" 2>&1 | grep -v cuda_timer \
      | tee "$OUT/mosaic_train_ws.txt" | sed -n '/^ConvNeXt blocks/,$p'
    ;;
  retune)
    # tuning.retune's phases on one ConvNeXt-T block shape per call (SHAPE=N,H,W,C; default
    # stage 2), caching into $OUT; the checked-in table's entry is printed beside its choice.
    shape=${SHAPE:-128,28,28,192}
    log "retune $shape"
    CONVFIRST_JAX_TUNING_CACHE="$OUT/retune_cache.json" timeout 560 python3 - "$shape" <<'PY' \
      2>&1 | grep -v cuda_timer | tee "$OUT/retune_${shape//,/x}.txt" | tail -14
import sys
import jax.numpy as jnp
from pallas_kernels.convnext_block import tuning
shape = tuple(int(v) for v in sys.argv[1].split(","))
table = tuning.get_tiles(shape[-1], jnp.bfloat16)  # before retune writes the cache
best, _ = tuning.retune(shape, jnp.bfloat16)
for name in ("fwd_kernel", "mosaic_block_m", "mosaic_stages", "mosaic_dwconv",
             "mosaic_backward", "mosaic_bwd_stages", "mosaic_dwconv_wgrad", "auto"):
  print(f"{name:20s} retune {getattr(best, name)!s:8s} table {getattr(table, name)!s}")
PY
    ;;
  profile)
    for shape in 128,56,56,96 128,28,28,192 128,14,14,384 128,7,7,768; do
      log "kernel profile, block $shape (training path, auto)"
      timeout 120 python3 -m benchmarks.kernel_profile block --shape "$shape" --top 15 \
        --json "$OUT/profile_block_${shape//,/x}.json" 2>&1 | grep -v cuda_timer | tail -16
    done
    for mode in inference train; do
      log "kernel profile, convnext_tiny $mode, batch 256, auto"
      timeout 200 python3 -m benchmarks.kernel_profile model --model convnext_tiny --mode "$mode" \
        --top 25 --json "$OUT/profile_convnext_tiny_$mode.json" 2>&1 | grep -v cuda_timer | tail -26
    done
    ;;
  gconv)
    log "Mosaic grouped conv and MBConv stage: GPU tests, then Mosaic vs XLA at MBConv shapes"
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/pallas_kernels/test_mosaic_gconv.py \
      2>&1 | tail -3
    timeout 380 python3 -m benchmarks.mosaic_gconv --parts conv,mbconv --json "$OUT/mosaic_gconv.json" \
      2>&1 | grep -v cuda_timer | tail -12
    ;;
  gemm)
    log "mosaic_gemm (the split form's kernels as K-streaming GEMMs): GPU tests, then kernels"
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/pallas_kernels/test_mosaic_gemm.py \
      2>&1 | tail -3
    timeout 380 python3 -m benchmarks.mosaic_gemm --iters 20 --json "$OUT/mosaic_gemm.json" 2>&1 \
      | grep -v cuda_timer | tail -40
    ;;
  cfstage)
    log "ConvFirst stages in the padded-row layout: GPU tests, stages vs XLA, convfirst_t img/s"
    timeout 160 python3 -m pytest -q -p no:cacheprovider -m gpu tests/pallas_kernels/test_mosaic_gconv.py \
      -k convfirst 2>&1 | tail -3
    timeout 180 python3 -m benchmarks.mosaic_gconv --parts convfirst --json "$OUT/mosaic_gconv_convfirst.json" \
      2>&1 | grep -v cuda_timer | tail -5
    timeout 240 python3 -m benchmarks.models --models convfirst_t,convnext_tiny --batches 256 \
      --impls xla,auto --json "$OUT/models_cfstage.json" 2>&1 | grep -v cuda_timer | tail -8
    ;;
  layernorm)
    log "LayerNorm kernels: GPU tests, then Pallas vs XLA at the stem / downsampling shapes"
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/pallas_kernels/test_layernorm.py \
      2>&1 | tail -1
    timeout 150 python3 -m benchmarks.layernorm --json "$OUT/layernorm.json" 2>&1 \
      | grep -v cuda_timer | tail -5
    ;;
  pipelined)
    log "compiled tests of the pipelined Mosaic kernels"
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider \
      -k "pipelined" tests/pallas_kernels/test_mosaic_mlp.py \
      tests/pallas_kernels/test_mosaic_split.py 2>&1 | tail -3
    log "pipelined vs serial Mosaic kernels (kernel level)"
    timeout 300 python3 -m benchmarks.mosaic_pipelined --json "$OUT/mosaic_pipelined.json" \
      2>&1 | grep -v cuda_timer | tee "$OUT/mosaic_pipelined.txt" | tail -16
    ;;
  dwconv)
    log "Pallas depthwise conv tiles vs XLA, and the ConvNeXt block forward with each conv"
    # COLUMNS=1: only the default tiles and the column-walk variants (DwconvTiles(columns=True))
    timeout 400 python3 -m benchmarks.dwconv_kernel ${COLUMNS:+--columns --no-block} \
      --json "$OUT/dwconv_kernel.json" 2>&1 \
      | grep -v cuda_timer | tee "$OUT/dwconv_kernel.txt" | tail -7
    log "block forwards (benchmarks.blocks, no backward)"
    timeout 200 python3 -m benchmarks.blocks --blocks convnext --no-backward --iters 30 \
      --json "$OUT/blocks_convnext_fwd.json" 2>&1 | grep -v cuda_timer | tail -6
    ;;
  compare)
    log "training step, ${MODEL:-convnext_tiny}, xla vs auto, 2 processes each (benchmarks.step_compare)"
    timeout 590 python3 -m benchmarks.step_compare --model "${MODEL:-convnext_tiny}" \
      --batch-size 256 --impls xla,auto --processes 2 --steps 15 --warmup 3 \
      --json "$OUT/step_compare_${MODEL:-convnext_tiny}.json" 2>&1 | grep -v cuda_timer | tail -8
    ;;
  wgrad)
    # One shape per call where the device time is short: each Pallas variant compiles for
    # seconds to minutes (benchmarks/dwconv_wgrad.py); results are appended line by line.
    log "depthwise-conv kernel gradient: XLA vs the Pallas kernels (benchmarks.dwconv_wgrad)"
    timeout 560 python3 -m benchmarks.dwconv_wgrad --shapes "${SHAPES:-56x96,28x192,14x384,7x768}" \
      --jsonl "$OUT/dwconv_wgrad.jsonl" 2>&1 | grep -v cuda_timer | tail -8
    ;;
  dispatch)
    # Stages alone (GPU time), then the whole model (what a user sees); one process each,
    # nothing else running: at these batches synchronised model times are host-bound.
    log "block_impl=None at small batches, ${MODEL:-convfirst_t}: stage forms, then xla vs auto"
    timeout 300 python3 -m benchmarks.dispatch --models "${MODEL:-convfirst_t}" \
      --batches 1,4,16,32 --json "$OUT/dispatch.jsonl" 2>&1 | grep -v cuda_timer | tail -20
    timeout 240 python3 -m benchmarks.models --models "${MODEL:-convfirst_t}" --batches 1,4,16,32 \
      --impls xla,auto --json "$OUT/models_dispatch.json" 2>&1 | grep -v cuda_timer | tail -8
    ;;
  *) echo "usage: $0 train|analysis|scaling|convfirst|models|mosaic|dwconv|pipelined|mosaic_train|ws|retune|profile|layernorm|gconv|gemm|cfstage|compare|wgrad|dispatch" >&2
     exit 2 ;;
esac
