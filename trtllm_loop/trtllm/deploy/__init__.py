"""``trtllm-loop build --backend pytorch``: a self-contained deploy directory for TensorRT-LLM's PyTorch backend.

One module per job:

* :mod:`.build_config` -- the ``build_configs/<target>.yaml`` schema (:class:`BuildConfig`, :func:`load_build_config`);
* :mod:`.formats`      -- the checkpoint's weight format and what a target accepts (:func:`check_combination`);
* :mod:`.memory`       -- bytes per GPU and the VSWA pool split (:func:`memory_plan`, :func:`check_fits`);
* :mod:`.llm_args`     -- the one generator of TensorRT-LLM LLM-API arguments (also used by the Triton
  ``llmapi`` renderer, ``trtllm_loop/serving/render.py``);
* :mod:`.writer`       -- :func:`build`, which writes the directory below from ``templates/`` (package data).

Layout written (into a temporary sibling directory, renamed into place at the end: no partial output)::

    DEPLOY/
      config.json              TRT-LLM view: 2L KV layers (num_hidden_layers), L physical (num_unique_layers)
      hf_config.json           the checkpoint's own config.json (80-layer HF view), untouched
      *.safetensors [+ index]  weights, hard-linked (or copied) from the checkpoint
      hf_quant_config.json ... the checkpoint's other JSON / tokenizer files, copied
      llm_api_options.yaml     LLM-API arguments (trtllm-serve --extra_llm_api_options)
      env.sh                   environment TRT-LLM needs (window-size memory shares of the VSWA pools)
      serve.sh                 trtllm-serve launcher, single GPU, TP on one node, or TP across nodes (MPI)
      python/                  a copy of the trtllm_loop package (the custom model code)
      custom_modules/iquest_loop/__init__.py   the --custom_module_dirs package that registers the model
      triton_repo/             the complete Triton ``llmapi`` repository (ensemble, pre/post-processing, BLS,
                               tensorrt_llm + 1/model.yaml), rendered by ``trtllm_loop.serving.render`` (not named
                               "triton": a directory of that name on sys.path shadows the triton package)
      launch_triton.sh, triton_hooks/sitecustomize.py   start Triton with the model registered
      memory_plan.json, build_info.json

The build configs live in ``build_configs/<target>.yaml``; each key is explained there.
"""
from .build_config import BuildConfig, load_build_config
from .formats import DENSE_FORMATS, allowed_tp, check_combination, weight_format
from .llm_args import llm_api_args, llm_api_options, triton_model_yaml
from .memory import check_fits, memory_plan
from .writer import build

_check_fits = check_fits  # the name before deploy became a package

__all__ = ["BuildConfig", "DENSE_FORMATS", "allowed_tp", "build", "check_combination", "check_fits",
           "llm_api_args", "llm_api_options", "load_build_config", "memory_plan", "triton_model_yaml",
           "weight_format"]
