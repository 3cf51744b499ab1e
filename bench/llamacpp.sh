#!/usr/bin/env bash
# Our cpu backend beside llama.cpp on the same weights: bf16, 8-bit and 4-bit, prefill and decode
# tokens/s, 2 threads. llama.cpp is not a dependency: build it and convert the checkpoint by hand
# (bench/README.md, "Side by side with llama.cpp"), then
#
#   LLAMA_BIN=/tmp/llb/bin MODEL=/tmp/bs GGUF_BF16=/tmp/bs.gguf GGUF_Q8_0=/tmp/bs-q8_0.gguf \
#     GGUF_Q4_0=/tmp/bs-q4_0.gguf bash bench/llamacpp.sh
#
# env: FORMATS (default "bf16 q8_0 q4_0"; a format whose GGUF variable is unset is skipped),
# THREADS (2), PROMPT (512), GEN (64), REPS (3), OUT (a directory for the raw JSON; default a
# temporary one).
#
# The formats compared. llama.cpp's Q8_0 and Q4_0 are symmetric blocks of 32 weights along the
# input dimension with one fp16 scale per block (8.5 and 4.5 bits per weight). Ours is the GPTQ
# layout (docs/quantization.md) quantized on load with --group-size 32 --sym: groups of 32 along
# the input dimension, one fp16 scale each, so the same bits per weight and the same dequantized
# form (q - zero) * scale with the zero fixed at the middle of the code range. What differs: the
# storage (our int32 words packed along K, repacked on load into the kernels' panels, where Q8_0
# and Q4_0 keep self-contained 34- and 18-byte blocks), the rounding that picks each scale, and
# the activations (llama.cpp quantizes them to 8 bits for its Q8_0/Q4_0 dot products; ours stay
# bf16). Quantize the GGUFs with `llama-quantize --pure --output-tensor-type bf16
# --token-embedding-type bf16` so that, as in ours, the embedding, lm_head and router (which
# llama-quantize never quantizes) stay bf16 and every other matrix is Q8_0/Q4_0.
# Per format, alternating because a shared machine's bandwidth drifts: llama-bench prefill
# (-p PROMPT -n 0), ours (one throughput.py run measures both), llama-bench decode (-p 0 -n GEN
# -d PROMPT: GEN tokens after a PROMPT-token context, as our decode follows its prefill).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -n "${LLAMA_BIN:-}" ] || { echo "error: set LLAMA_BIN to the bin directory of a llama.cpp build" >&2; exit 1; }
[ -n "${MODEL:-}" ] || { echo "error: set MODEL to the checkpoint directory the GGUFs were converted from" >&2; exit 1; }
FORMATS=${FORMATS:-bf16 q8_0 q4_0}
THREADS=${THREADS:-2}
PROMPT=${PROMPT:-512}
GEN=${GEN:-64}
REPS=${REPS:-3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
[ -x "$LLAMA_BIN/llama-bench" ] || { echo "error: no executable $LLAMA_BIN/llama-bench" >&2; exit 1; }

ran=""
for f in $FORMATS; do
  case $f in
    bf16) gguf=${GGUF_BF16:-}; quant=() ;;
    q8_0) gguf=${GGUF_Q8_0:-}; quant=(--quant int8 --group-size 32 --sym) ;;
    q4_0) gguf=${GGUF_Q4_0:-}; quant=(--quant int4 --group-size 32 --sym) ;;
    *) echo "error: unknown format $f (expected bf16, q8_0 or q4_0)" >&2; exit 1 ;;
  esac
  if [ -z "$gguf" ]; then echo "skipping $f: its GGUF variable is unset" >&2; continue; fi
  [ -f "$gguf" ] || { echo "error: no file $gguf (format $f)" >&2; exit 1; }
  echo "$f: llama.cpp prefill, ours, llama.cpp decode" >&2
  "$LLAMA_BIN/llama-bench" -m "$gguf" -t "$THREADS" -r "$REPS" -p "$PROMPT" -n 0 -o json > "$OUT/$f.llama_prefill.json"
  python bench/throughput.py --model "$MODEL" "${quant[@]}" --threads "$THREADS" --prompt-len "$PROMPT" \
    --gen-len "$GEN" --reps "$REPS" --json | tail -n 1 > "$OUT/$f.ours.json"
  "$LLAMA_BIN/llama-bench" -m "$gguf" -t "$THREADS" -r "$REPS" -p 0 -n "$GEN" -d "$PROMPT" -o json > "$OUT/$f.llama_decode.json"
  ran="$ran $f"
done
[ -n "$ran" ] || { echo "error: no format ran: set GGUF_BF16, GGUF_Q8_0 and/or GGUF_Q4_0" >&2; exit 1; }

python - "$OUT" $ran <<'PY'
import json, sys
out, formats = sys.argv[1], sys.argv[2:]
load = lambda name: json.load(open(f"{out}/{name}.json"))
print("| format | ours decode tok/s | ours prefill tok/s | llama.cpp decode tok/s | llama.cpp prefill tok/s "
      "| decode ours/llama.cpp | prefill ours/llama.cpp |")
print("|---|---|---|---|---|---|---|")
for f in formats:
    ours = load(f"{f}.ours")
    lp, ld = load(f"{f}.llama_prefill")[0]["avg_ts"], load(f"{f}.llama_decode")[0]["avg_ts"]
    od, op = ours["decode_tok_s"], ours["prefill_tok_s"]
    print(f"| {f} | {od:.1f} | {op:.1f} | {ld:.1f} | {lp:.1f} | {od / ld:.2f} | {op / lp:.2f} |")
PY
echo "raw JSON in $OUT" >&2
