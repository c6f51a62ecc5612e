"""IQuest-Coder-V1 Loop on TensorRT-LLM 1.2.x's **engine flow** (TensorRT engines; legacy, frozen in 1.2.x):

* :mod:`.model` -- the model definition (``tensorrt_llm.models`` style), registered in ``MODEL_MAP``;
* :mod:`.config` -- the TRT-LLM checkpoint config (2L KV layers, L blocks, window) and its way back;
* :mod:`.checkpoint` -- ``convert --to trtllm-ckpt``: names, quantization, tensor-parallel shards;
* :mod:`.gate_plugin` -- the loop gate as a TensorRT v3 plugin layer;
* :mod:`.runner` -- teacher-forced logits on the API double (``logits --mode engine``).
"""
