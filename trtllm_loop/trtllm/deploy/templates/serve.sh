#!/usr/bin/env bash
# Serve this deploy directory with trtllm-serve (TensorRT-LLM {{trtllm_version}}, PyTorch backend), OpenAI API.
#
#   ./serve.sh                           one GPU (tensor parallel size {{tp}})
#   ./serve.sh --tp 2                    TP across the GPUs of this node
#   ./serve.sh --tp 2 --hostfile hosts   TP across nodes (e.g. two DGX Sparks), one rank per GPU, launched with
#                                        mpirun + trtllm-llmapi-launch (TRT-LLM's own MPI launcher); every node
#                                        needs this directory at the same path and passwordless ssh
#   DRY_RUN=1 ./serve.sh ...             print the command instead of running it
#
# Allowed --tp values ({{tp_rule}}): {{allowed_tp}}
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/env.sh"
TP={{tp}}
HOSTFILE=""
HOST="0.0.0.0"
PORT=8000
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tp) TP="$2"; shift 2 ;;
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
case " {{allowed_tp}} " in
  *" $TP "*) ;;
  *) echo "serve.sh: --tp $TP is not allowed for this model; allowed: {{allowed_tp}}" >&2; exit 2 ;;
esac
CMD=(trtllm-serve "$DIR" --backend pytorch --tp_size "$TP"
     --custom_module_dirs "$DIR/custom_modules/{{module}}"
     --extra_llm_api_options "$DIR/llm_api_options.yaml"
     --host "$HOST" --port "$PORT")
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "serve.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
  # one rank per hostfile slot (a DGX Spark has one GPU: slots=1 per node); export what env.sh set
  XS=()
  for v in PYTHONPATH TRTLLM_WINDOW_SIZE_SHARES TRTLLM_LOAD_KV_SCALES; do
    [[ -n "${!v:-}" ]] && XS+=(-x "$v")
  done
  CMD=(mpirun --hostfile "$HOSTFILE" -np "$TP" --bind-to none "${XS[@]}"
       trtllm-llmapi-launch "${CMD[@]}")
fi
CMD+=("${EXTRA[@]+"${EXTRA[@]}"}")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
