#!/usr/bin/env bash
# `make gpu-check`: the CUDA path, checked on a machine that has a CUDA
# device (on one without, it says so and exits 0). On cuda:0:
#   1. the bf16 parity tests against transformers (cli/tests/it/hf_parity.rs,
#      the bf16 rule: logits within 0.1, greedy tokens equal but at bf16
#      ties), in process on the device (TRAMONTANE_DEVICE=cuda:0);
#   2. `serve` with 2 workers and the router on the device, answering the
#      README's requests (curl chat, the openai client's completion, the
#      CLI over gRPC);
#   3. bench-forward rows on the `bench` model, bf16 and int8 experts.
# Prints one table; exits non-zero when a check failed.
# GPU_CHECK_DEVICE picks the device (default cuda:0).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/tramontane}
PYTHON=${PYTHON:-.venv/bin/python}
# As the Makefile sets them, for `cargo test` run from here too.
export VIRTUAL_ENV=${VIRTUAL_ENV:-$PWD/.venv}
export PATH=$VIRTUAL_ENV/bin:$PATH
export LIBTORCH_USE_PYTORCH=1
DEVICE=${GPU_CHECK_DEVICE:-cuda:0}

# GPU_CHECK_DEVICE=cpu runs the same checks on the CPU: a dry run of this
# script where there is no GPU.
if [[ $DEVICE == cuda:* ]]; then
  count=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
  if [ "${count:-0}" = 0 ]; then
    echo "gpu-check: no CUDA device on this machine (torch.cuda.is_available() is false): nothing to check"
    exit 0
  fi
  gpu=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')
  echo "gpu-check on $DEVICE: $gpu ($count CUDA devices)"
else
  echo "gpu-check on $DEVICE (a dry run of the checks)"
fi

rows=()
failed=0
record() { # check, PASS|FAIL, detail
  rows+=("$1|$2|$3")
  [ "$2" = PASS ] || failed=1
}

# 1. Parity in bf16 on the device.
parity=(
  hf_parity::bf16_compute_stays_within_bounds_of_transformers_in_bf16
  hf_parity::qwen2_moe_bf16_stays_within_bounds_of_transformers_in_bf16
  hf_parity::olmoe_bf16_stays_within_bounds_of_transformers_in_bf16
)
log=$(mktemp)
if TRAMONTANE_DEVICE=$DEVICE cargo test --release --locked --test it -- --exact "${parity[@]}" >"$log" 2>&1; then
  record "parity vs transformers, bf16 (3 checkpoints)" PASS "$(grep -o 'test result: [^;]*' "$log" | tail -1)"
else
  record "parity vs transformers, bf16 (3 checkpoints)" FAIL "see $log"
fi

# 2. serve --workers 2 on the device, and the README's requests.
out=$(mktemp)
"$BIN" serve --workers 2 --devices "$DEVICE" --device "$DEVICE" --dtype bf16 \
  --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$out" 2>"$out.err" &
serve=$!
for _ in $(seq 600); do
  [ "$(grep -c 'listening on' "$out")" -ge 2 ] && break
  kill -0 $serve 2>/dev/null || break
  sleep 0.5
done
grpc=$(grep 'listening on' "$out" | sed -n 1p | sed 's/.*listening on //')
http=$(grep 'listening on' "$out" | sed -n 2p | sed 's/.*listening on //')
if [ -z "$http" ]; then
  record "serve --workers 2 on $DEVICE" FAIL "did not start: $(tail -3 "$out.err")"
else
  record "serve --workers 2 on $DEVICE" PASS "router gRPC $grpc, HTTP $http"
  chat=$(curl -s "$http/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "demo-model", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}')
  tokens=$(echo "$chat" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["usage"]["completion_tokens"])' 2>/dev/null)
  if [ -n "$tokens" ]; then record "chat completion (curl)" PASS "$tokens tokens"; else record "chat completion (curl)" FAIL "$chat"; fi
  text=$("$PYTHON" -c "from openai import OpenAI; c = OpenAI(base_url='http://$http/v1', api_key='none'); print(len(c.completions.create(model='demo-model', prompt='The tramontane is', max_tokens=32).choices[0].text))" 2>&1)
  if [[ "$text" =~ ^[0-9]+$ ]]; then record "completion (openai client)" PASS "$text characters"; else record "completion (openai client)" FAIL "$text"; fi
  generated=$("$BIN" generate --server "$grpc" --prompt "The tramontane is" --max-tokens 32 2>&1)
  if [ $? -eq 0 ]; then record "generate --server (gRPC)" PASS "${#generated} characters"; else record "generate --server (gRPC)" FAIL "$generated"; fi
fi
kill -INT $serve 2>/dev/null
wait $serve 2>/dev/null

# 3. bench-forward on the device: bf16, and int8 experts (libtorch's path
# on CUDA: dequantized per call, correct before fast).
model=target/bench-model
[ -f $model/config.json ] || "$BIN" gen-model --preset bench --out $model >/dev/null
for variant in "bf16|--dtype bf16" "int8 experts|--dtype bf16 --quantize int8"; do
  name=${variant%%|*}
  # shellcheck disable=SC2086 # the flags are words
  if result=$("$BIN" bench-forward --model $model --device "$DEVICE" ${variant#*|} --json \
      --rows prefill-1x512,decode-1,decode-32 2>&1); then
    summary=$(echo "$result" | "$PYTHON" -c '
import json, sys
rows = json.loads(sys.stdin.read().splitlines()[-1])["rows"]
print(", ".join("%s %.1f tok/s" % (r["name"], r["tokens_per_s"]) for r in rows))')
    record "bench-forward $name" PASS "$summary"
  else
    record "bench-forward $name" FAIL "$(echo "$result" | tail -2)"
  fi
done

echo
printf '%-46s %-5s %s\n' check result detail
for row in "${rows[@]}"; do
  IFS='|' read -r check result detail <<<"$row"
  printf '%-46s %-5s %s\n' "$check" "$result" "$detail"
done
exit $failed
