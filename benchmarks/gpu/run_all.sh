#!/usr/bin/env bash
# Every GPU check in one run (< 8 minutes on one H100/H200), JSON into $OUT (default
# benchmarks/results/gpu/). Without CUDA every part skips cleanly and the script exits 0.
#
#   bash benchmarks/gpu/run_all.sh                 # on the lent GPU machine: OUT is set by the tool
#   OUT=/tmp/gpu bash benchmarks/gpu/run_all.sh    # anywhere else
#
# Parts (each under its own time limit, so one slow part cannot eat the others' time):
#   gpu_tests    the `gpu`-marked tests alone (fit's CUDA estimate against max_memory_allocated,
#                the kernels, the measurer), results in the log
#   tests        the whole pytest suite on the machine's torch (2.11 there), as far as its limit goes
#   train_peak   peak memory (max_memory_allocated) and step time of a training step: eager,
#                torch.compile at activation budgets 1.0/0.5/0.0, fxmem default/0.5/0.0; with
#                each variant's kernels per step and their device time (--profile)
#   kernels_gpu  fxmem's generated Triton kernels vs eager and Inductor; int8 matmul vs bf16 cuBLAS
#   int4         the int4 and int8 weight-only matmuls at decode shapes (tiled, split-K, GEMV launches)
#                vs bf16 cuBLAS and torchao int4/int8 (when the script exists)
#   chunked_loss the chunked loss (its Triton kernel): peak and step time against torch.compile on
#                the long-context case (vocab 128k, B1 x T2048); CHUNKED_LOSS_ARGS adds e.g.
#                `--workloads mlp_long --variants torch.compile,"fxmem chunk.mlp"` where there is time
#   host_overhead the host time the chunked loss adds to a launch-bound step (tiny HF Llama):
#                step time against torch.compile and chunk=False, and ATen calls per step
#   tests        (not in the default PARTS: it never got far in its time) the whole suite
#   inference_peak (not in the default PARTS: the tool returns at most 8 files and the default
#                parts' limits already add up to 450 s) the inference forward's peak and time
#                beside torch.compile's (HF GPT-2, HF Llama, MiniLM); e.g. PARTS="inference_peak"
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo '{"skipped": "CUDA is not available"}' > "$OUT/skipped.json"
  echo "run_all.sh: no CUDA device; every GPU check skipped"
  exit 0
fi

# backend="fxmem" is found through the package's entry point: install the checkout, offline
# (the tool returns at most 8 files from $OUT: one log for all parts, one JSON (+PNG) per part)
LOG=$OUT/run_all.log
"$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . > /tmp/fxmem-pip.log 2>&1 \
  || { echo "pip install of fxmem failed:"; tail -5 /tmp/fxmem-pip.log; } | tee -a "$LOG"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee -a "$LOG"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | grep -v '^USDT' | tee -a "$LOG" | tail -40
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
}

# PARTS picks parts (default: all, in this order: the figures that exist nowhere else first, the
# test suite last); TRAIN_PEAK_ARGS replaces train_peak's default cases and variants. The limits
# add up to 7.5 minutes (450 s), so the whole script stays under 8 with the set-up.
PARTS=${PARTS:-train_peak chunked_loss host_overhead int4 kernels_gpu gpu_tests}
for name in $PARTS; do
  case $name in
    # the HF cases after the logits-output change (Llama was 3.5x torch.compile's step time) and
    # the two cases without any GPU figure yet; budgets: TRAIN_PEAK_ARGS="--cases blocks_manual"
    # --profile: per variant, the kernels one step launches and their device time (is a slower
    # step more launches or slower kernels?), so one lent session both measures and diagnoses
    train_peak) part train_peak "${TRAIN_PEAK_LIMIT:-185}" "$PY" benchmarks/train_peak.py --device cuda --steps 20 \
        --profile ${TRAIN_PEAK_ARGS:---cases hf_llama hf_gpt2 blocks_sdpa --variants eager torch.compile fxmem} \
        --out "$OUT/train_peak.json" ;;
    # the JSON is rewritten after each workload: a part cut short by its limit keeps what it measured
    chunked_loss) part chunked_loss "${CHUNKED_LOSS_LIMIT:-60}" "$PY" benchmarks/chunked_loss.py --device cuda \
        --steps 5 --workloads long_context --variants torch.compile,fxmem ${CHUNKED_LOSS_ARGS:-} \
        --out "$OUT/chunked_loss.json" ;;
    # is the small model's slower GPU step the chunked loss's host time? (CPU: 1.46x torch.compile's)
    host_overhead) part host_overhead "${HOST_OVERHEAD_LIMIT:-45}" "$PY" benchmarks/host_overhead.py --device cuda \
        --rounds 10 --out "$OUT/host_overhead.json" ;;
    int4) [ -f benchmarks/kernels_int4.py ] && part int4 50 "$PY" benchmarks/kernels_int4.py --out "$OUT/int4.json" ;;
    kernels_gpu) part kernels_gpu 50 "$PY" benchmarks/gpu/kernels_gpu.py --out "$OUT/kernels_gpu.json" ;;
    # the test suite on this machine's torch (2.11 on the lent machines; CI has 2.13), GPU tests included
    # the GPU tests first and alone: the whole suite does not finish in its limit on the lent machine
    gpu_tests) part gpu_tests "${GPU_TESTS_LIMIT:-60}" "$PY" -m pytest -q -m gpu -p no:cacheprovider -rA ;;
    inference_peak) part inference_peak "${INFERENCE_PEAK_LIMIT:-60}" "$PY" benchmarks/inference_peak.py --device cuda \
        --out "$OUT/inference_peak.json" ;;
    tests) part tests "${TESTS_LIMIT:-20}" "$PY" -m pytest -q -n 12 -p no:cacheprovider -rfE \
        --junitxml="$OUT/tests.xml" ${TESTS_ARGS:-} ;;
    *) echo "run_all.sh: unknown part $name (parts: train_peak chunked_loss host_overhead int4 kernels_gpu gpu_tests tests inference_peak)" | tee -a "$LOG" ;;
  esac
done
ls -la "$OUT"
exit 0
