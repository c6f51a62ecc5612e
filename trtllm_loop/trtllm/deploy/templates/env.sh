# Environment for serving this deploy directory (sourced by serve.sh; export it yourself for LLM(...) in Python).
DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$DEPLOY_DIR/python${PYTHONPATH:+:$PYTHONPATH}"
{{window_size_shares}}
# FP8/NVFP4 KV scales of a ModelOpt export are per attention module, shared by the pass-1 and pass-2 KV layers
# (docs/tensorrt-llm.md 6.2); keep TRT-LLM's default scale 1.0 rather than loading them.
export TRTLLM_LOAD_KV_SCALES=0
