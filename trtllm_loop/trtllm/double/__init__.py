"""Root of the ``tensorrt_llm`` API double (put on sys.path by ``trtllm_loop.trtllm.compat``); see README.md."""
