#!/usr/bin/env bash
# Triton (tensorrtllm_backend llmapi model, LLM API + PyTorch backend) for this deploy directory.
# Run inside the TensorRT-LLM/Triton container from the TensorRT-LLM triton_backend directory.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/env.sh"
export PYTHONPATH="$DIR/triton_hooks:$PYTHONPATH"
exec python3 scripts/launch_triton_server.py --model_repo="$DIR/triton_repo" "$@"
