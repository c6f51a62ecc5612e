"""``trtllm-loop triton-repo``: render a ready Triton model repository (tensorrtllm | llmapi | reference)."""
from __future__ import annotations

import argparse

from trtllm_loop.commands.argtypes import add_force, fraction, positive_float, positive_int

HELP = """\
Render a Triton model repository for a Loop checkpoint. Every flavour exposes the same client contract:
`ensemble` (preprocessing -> tensorrt_llm -> postprocessing) and `tensorrt_llm_bls` (exact streaming with
incremental detokenization and text stop words), inputs text_input / max_tokens / stream / stop_words /
chat_messages / apply_chat_template / sampling fields.

flavours:
  tensorrtllm  tensorrt_llm = TensorRT-LLM C++ backend over --engine DIR (GPU, NGC trtllm container)
  llmapi       tensorrt_llm = Python model driving tensorrt_llm.LLM (PyTorch backend) from 1/model.yaml (GPU)
  reference    tensorrt_llm = Python model running the paged runtime emulator on CPU

The output appears only when complete and validated (every config.pbtxt parsed with tritonclient's
ModelConfig protobuf; ensemble wiring checked).

example:
  trtllm-loop synth /tmp/tiny --preset tiny --dtype float32
  trtllm-loop triton-repo --flavour reference --model /tmp/tiny --out /tmp/repo
  trtllm-loop serve /tmp/repo
"""


def register(sub) -> None:
    p = sub.add_parser("triton-repo", help="render a Triton model repository (tensorrtllm | llmapi | reference)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavour", "--flavor", required=True, choices=["tensorrtllm", "llmapi", "reference"])
    p.add_argument("--model", required=True, metavar="DIR", help="HF checkpoint directory (config.json, tokenizer)")
    p.add_argument("--engine", metavar="DIR", help="TensorRT-LLM engine directory (tensorrtllm flavour)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: --model)")
    p.add_argument("--out", required=True, metavar="DIR", help="output repository directory")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="Triton and runtime max batch size (8)")
    p.add_argument("--max-seq-len", type=positive_int, help="prompt + output tokens (default: engine / max_position_embeddings)")
    p.add_argument("--max-num-tokens", type=positive_int, default=256, help="tokens per scheduler step (256)")
    p.add_argument("--max-input-len", type=positive_int, help="longest accepted prompt in tokens (default: max_seq_len - 1)")
    p.add_argument("--max-output-len", type=positive_int, help="largest accepted max_tokens (default: max_seq_len - 1)")
    p.add_argument("--kv-cache-fraction", type=fraction, default=0.9, help="GPU memory fraction for the KV cache")
    p.add_argument("--enable-kv-cache-reuse", action="store_true", help="prefix caching (GPU flavours)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="cuda_graph_mode false (GPU flavours)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size (llmapi)")
    p.add_argument("--exclude-input-in-output", action="store_true",
                   help="server default: return only the completion (TRT-LLM default is to echo the prompt)")
    p.add_argument("--decoupled", choices=["true", "false"], default="true",
                   help="decoupled tensorrt_llm / tensorrt_llm_bls (true: streaming; false: one response per request, "
                        "so unary infer over gRPC/HTTP works on ensemble and tensorrt_llm_bls); default true")
    p.add_argument("--max-prompt-bytes", type=positive_int,
                   help="largest accepted prompt in UTF-8 bytes, checked before tokenizing "
                        "(default: 64 per max_input_len token, at least 65536)")
    p.add_argument("--bls-response-timeout", type=positive_float, default=300.0, metavar="S",
                   help="tensorrt_llm_bls ends a request with an error when tensorrt_llm sends nothing for S seconds")
    p.add_argument("--torch-threads", type=positive_int, default=1, help="CPU threads of the reference runtime")
    add_force(p, "--out")
    p.set_defaults(func=run)


def run(args) -> int:
    from trtllm_loop.serving.render import render_repository

    out = render_repository(
        args.flavour, args.model, args.out, engine_dir=args.engine, tokenizer_dir=args.tokenizer,
        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
        max_input_len=args.max_input_len, max_output_len=args.max_output_len,
        kv_cache_free_gpu_mem_fraction=args.kv_cache_fraction, enable_kv_cache_reuse=args.enable_kv_cache_reuse,
        cuda_graph_mode=not args.no_cuda_graphs, exclude_input_in_output=args.exclude_input_in_output,
        torch_threads=args.torch_threads, tensor_parallel_size=args.tp, overwrite=args.force,
        decoupled=args.decoupled == "true", max_prompt_bytes=args.max_prompt_bytes,
        bls_response_timeout_s=args.bls_response_timeout)
    print(f"wrote {args.flavour} Triton repository to {out} (validated); serve it with: trtllm-loop serve {out}")
    return 0
