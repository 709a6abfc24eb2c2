#!/bin/sh
# The GPU proof of QLoRA in Rust, on one NVIDIA GPU, in ≤ 8 minutes (issue 19): run from the bundle that
# `cargo xtask gpu-check` builds (target/gpu-check/), with the repository's tests/fixtures two levels up or in
# $FIXTURES. Writes report.json (and prints it) into $OUT (or the bundle directory):
#   kernels         gpu-check: every kernel against the CPU reference; copy and dequantize bandwidth (gpu-check.md)
#   steps           QLoRA training steps (bench-step JSON): random Llama-7B shapes, all 32 layers, NF4 + double
#                   quant, bf16 compute, LoRA r 64 on all linear layers, gradient checkpointing, at 1 × 2048 and
#                   4 × 512; the same with a dense bf16 base (16-bit LoRA); a LLaMA-65B-shaped step (80 layers,
#                   1 × 512, paged AdamW with a 1 GiB device budget). MFU = 6 · params · tokens/s / peak.
#   train           `qlora train --device cuda` vs the CPU on the tiny fixture model, 10 steps: losses per step.
# Each part has its own time limit; a part that fails or runs out of time is reported as such, the rest go on.
set -u
cd "$(dirname "$0")"
BUNDLE=$PWD
if [ -z "${CUDA_PATH:-}" ]; then for d in /usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-12* /usr/lib/cuda; do [ -d "$d/include" ] && { export CUDA_PATH="$d"; break; }; done; fi
for d in "${CUDA_PATH:-/usr/local/cuda}/lib64" "${CUDA_PATH:-/usr/local/cuda}/targets/x86_64-linux/lib"; do [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH="$BUNDLE/lib:${LD_LIBRARY_PATH:-}"
OUT=${OUT:-$BUNDLE}
FIXTURES=${FIXTURES:-$BUNDLE/../../tests/fixtures}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}   # dense bf16 peak of an H100/H200 SXM
DEVICE=${DEVICE:-cuda}            # DEVICE=cpu runs the script's plumbing on a machine without a GPU
MODEL_7B=${MODEL_7B:-random:llama-7b}      # (with small models there: MODEL_7B=random:smollm2-135m,layers=2)
MODEL_65B=${MODEL_65B:-random:llama-65b}
mkdir -p "$OUT"
LINES="$OUT/report.lines"
: > "$LINES"
started=$(date +%s)
note() { printf '%s\n' "$1" >> "$LINES"; }
gpu_name=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
note "{\"part\":\"machine\",\"gpu\":\"$gpu_name\",\"gpus\":$gpus}"

# 1. Kernels.
t=$(date +%s)
if OUT="$OUT" timeout 150 ./gpu-check > "$OUT/gpu-check.log" 2>&1; then status=ok; else status="failed rc $?"; fi
failed=$(sed -n 's/^correctness: \([0-9]*\) checks, \([0-9]*\) failed.*/\2/p' "$OUT/gpu-check.log")
checks=$(sed -n 's/^correctness: \([0-9]*\) checks.*/\1/p' "$OUT/gpu-check.log")
copy=$(sed -n 's/^device copy.*: \([0-9.]*\) GB\/s.*/\1/p' "$OUT/gpu-check.md" 2>/dev/null | head -1)
note "{\"part\":\"kernels\",\"status\":\"$status\",\"checks\":${checks:-null},\"failed\":${failed:-null},\"copy_gbs\":${copy:-null},\"seconds\":$(( $(date +%s) - t )),\"table\":\"gpu-check.md\"}"

# 2. Training steps.
step() { # name limit_s args...
  name=$1; limit=$2; shift 2; t=$(date +%s)
  line=$(timeout "$limit" ./qlora bench-step --device "$DEVICE" --steps 3 --warmup 1 --compute-dtype bf16 --lora-r 64 "$@" 2> "$OUT/$name.err" | tail -1)
  rc=$?
  case "$line" in
    \{*) echo "$line" > "$OUT/$name.json"
         mfu=$(echo "$line" | sed -n 's/.*"tokens_per_s":\([0-9.e+-]*\).*"base_params":\([0-9]*\).*/\1 \2/p' | awk -v p="$PEAK_TFLOPS" '{ if (NF == 2) printf "%.4f", 6 * $2 * $1 / (p * 1e12); else printf "null" }')
         note "{\"part\":\"step\",\"name\":\"$name\",\"status\":\"ok\",\"mfu\":${mfu:-null},\"seconds\":$(( $(date +%s) - t )),\"bench\":$line}" ;;
    *) note "{\"part\":\"step\",\"name\":\"$name\",\"status\":\"failed rc $rc\",\"seconds\":$(( $(date +%s) - t )),\"stderr_tail\":\"$(tail -c 300 "$OUT/$name.err" | tr '\n"\\' "  /")\"}" ;;
  esac
}
step qlora-7b-1x2048 100 --model "$MODEL_7B" --quant nf4 --batch 1 --seq 2048
step qlora-7b-4x512 80 --model "$MODEL_7B" --quant nf4 --batch 4 --seq 512
step lora16-7b-1x2048 100 --model "$MODEL_7B" --quant none --batch 1 --seq 2048
step qlora-65b-1x512 170 --model "$MODEL_65B" --quant nf4 --batch 1 --seq 512 --optimizer-device-budget-mib 1024

# 3. The trainer on the GPU against the CPU.
t=$(date +%s)
train() { # device dir
  timeout 60 ./qlora train --model "$FIXTURES/tiny-train/model-nf4" --data "$FIXTURES/tiny-train/chat-train.jsonl" \
    --max-steps 10 --micro-batch-size 2 --grad-accum 2 --lora-r 8 --eval-steps 0 --save-steps 0 --sample-prompt '' \
    --device "$1" --output-dir "$2" --overwrite-output-dir > "$2.log" 2>&1
}
losses() { sed -n 's/.*"kind":"train".*"loss":\([0-9.e+-]*\).*/\1/p' "$1/metrics.jsonl" 2>/dev/null | paste -sd, -; }
train cpu "$OUT/train-cpu"; train "$DEVICE" "$OUT/train-cuda"
cpu=$(losses "$OUT/train-cpu"); gpu=$(losses "$OUT/train-cuda")
worst=$(printf '%s\n%s\n' "$cpu" "$gpu" | awk -F, 'NR==1{n=NF; for(i=1;i<=NF;i++) a[i]=$i} NR==2{w=0; if (NF!=n || n==0) {print "null"; exit} for(i=1;i<=NF;i++){d=($i-a[i])/a[i]; if(d<0)d=-d; if(d>w)w=d} printf "%.3e", w}')
note "{\"part\":\"train\",\"cpu_losses\":[${cpu}],\"cuda_losses\":[${gpu}],\"worst_rel_diff\":${worst:-null},\"goal\":1e-3,\"seconds\":$(( $(date +%s) - t ))}"

# 4. More than one GPU: data parallel scaling (issue 24), when present.
tps() { sed -n 's/.*"tokens_per_s":\([0-9.e+-]*\).*/\1/p' "$OUT/$1.json" 2>/dev/null; }
if [ "$gpus" -gt 1 ]; then
  single=$DEVICE; DEVICE=cuda:0,cuda:1
  step dp2-7b-4x512 120 --model "$MODEL_7B" --quant nf4 --batch 4 --seq 512
  DEVICE=$single
  one=$(tps qlora-7b-4x512); two=$(tps dp2-7b-4x512)
  scaling=$(echo "$one $two" | awk 'NF == 2 && $1 > 0 { printf "%.3f", $2 / $1; exit } { printf "null" }')
  note "{\"part\":\"multi-gpu\",\"status\":\"ran\",\"gpus_used\":2,\"scaling_vs_1_gpu\":${scaling:-null},\"goal\":1.8}"
else
  note "{\"part\":\"multi-gpu\",\"status\":\"1 GPU: skipped\"}"
fi

{ printf '{"total_seconds":%d,"parts":[\n' $(( $(date +%s) - started )); paste -sd, "$LINES"; printf ']}\n'; } > "$OUT/report.json"
cat "$OUT/report.json"
