#!/usr/bin/env bash
# Streaming as the shared tools measure it: 500 streams of 50 chunks 20 ms apart held for 6 s,
# direct to the node mock upstream and through `meterline serve --workers 2`, in one minute.
#   bash bench/shared_streams.sh    (METERLINE_SHARED_TOOLS: the folder of streams.js)
set -euo pipefail
cd "$(dirname "$0")/.."
T="${METERLINE_SHARED_TOOLS:-../shared/tools}"  # mock_upstream.js and streams.js
UP=18931; ML=18932
base="${METERLINE_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}"
db=ml_stream_$$; psql "$base" -qc "CREATE DATABASE $db"
URL="${base%/*}/$db"
dir=$(mktemp -d)
cat > $dir/providers.yaml <<YAML
providers:
  - name: node
    base_url: http://127.0.0.1:$UP/v1
    models: ["*"]
    stream_usage: inject
YAML
node $T/mock_upstream.js $UP --chunk-ms 20 > $dir/up.log 2>&1 & upid=$!
export METERLINE_DATABASE_URL=$URL METERLINE_ADMIN_TOKEN=admin-stream METERLINE_PROVIDERS=$dir/providers.yaml METERLINE_DATA_DIR=$dir/data METERLINE_ACCESS_LOG=false METERLINE_TIER_BASIC_RPM=100000000
.venv/bin/meterline db upgrade > /dev/null
.venv/bin/meterline serve --port $ML --workers 2 > $dir/ml.log 2>&1 & mpid=$!
for i in $(seq 60); do curl -sf http://127.0.0.1:$ML/healthz > /dev/null && break; sleep 1; done
acc=$(curl -s -X POST http://127.0.0.1:$ML/billing/accounts -H "Authorization: Bearer admin-stream" -H 'content-type: application/json' -d '{"name":"stream"}' | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
key=$(curl -s -X POST http://127.0.0.1:$ML/billing/accounts/$acc/keys -H "Authorization: Bearer admin-stream" -H 'content-type: application/json' -d '{}' | python3 -c 'import sys,json;print(json.load(sys.stdin)["key"])')
uptime
echo "direct:"; node $T/streams.js http://127.0.0.1:$UP/v1/chat/completions 500 meta-llama/Llama-3.3-70B-Instruct x 50 6
echo "meterline:"; node $T/streams.js http://127.0.0.1:$ML/v1/chat/completions 500 meta-llama/Llama-3.3-70B-Instruct $key 50 6
sleep 3
psql $URL -Atc "SELECT count(*), count(*) FILTER (WHERE status_code = 200), sum(completion_tokens) FROM usage_ledger"
kill $mpid $upid; wait $mpid 2>/dev/null || true
psql "$base" -qc "DROP DATABASE $db WITH (FORCE)"
