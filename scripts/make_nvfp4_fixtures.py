#!/usr/bin/env python3
"""Build the tiny NVFP4 test fixtures under ``tests/fixtures/nvfp4/`` with the real producers, on CPU.

The source model is the golden case ``s1_gqa4x2_w8_T29`` (2 layers, hidden 64) cast to bf16, loaded into the
reference model ``trtllm_loop.modeling`` (the loop layers call the same nn.Linear modules in both passes).

    # 1. source model + calibration data (main venv)
    .venv/bin/python scripts/make_nvfp4_fixtures.py source
    # 2. ModelOpt 0.47.0: NVFP4, W4A16_NVFP4, NVFP4 + FP8 KV, FP8 (the reference layout for `convert --to fp8`),
    #    NVFP4_AWQ (awq_lite with the CPU fake-quant shim of nvfp4.md 6.4)
    #    (venv: torch 2.13 cpu, nvidia-modelopt==0.47.0, transformers==5.14.1, accelerate, requests)
    /work/venvs/modelopt/bin/python scripts/make_nvfp4_fixtures.py modelopt
    # 3. llm-compressor 0.14.0.1: NVFP4, NVFP4A16               (venv: torch 2.13 cpu, llmcompressor==0.14.0.1)
    /work/venvs/llmc/bin/python scripts/make_nvfp4_fixtures.py llmcompressor

``source`` also records, with forward pre-hooks on the plain model, each Linear's input amax in pass 1 and
in pass 2 over the calibration batches (``calib_amax.json``): the test checks ModelOpt's exported
``input_scale`` against max(pass 1, pass 2) / 2688.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "tests" / "fixtures" / "nvfp4"
GOLDEN = Path("/work/shared/golden/s1_gqa4x2_w8_T29")
CALIB_SHAPE = (8, 2, 32)  # batches x batch size x tokens


def calib_batches(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    n, b, t = CALIB_SHAPE
    return [torch.randint(3, vocab, (b, t), generator=g) for _ in range(n)]


def load_source(dtype=torch.bfloat16):
    from trtllm_loop.modeling.load import load_model
    model = load_model(OUT / "source", dtype)
    model.config.architectures = ["IQuestLoopCoderForCausalLM"]
    model.config.torch_dtype = dtype
    model.config._name_or_path = str(OUT / "source")  # llm-compressor re-reads the on-disk config
    return model


def cmd_source(args) -> None:
    from safetensors.torch import load_file, save_file
    src = OUT / "source"
    src.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((GOLDEN / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(GOLDEN / "model.safetensors").items()}
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(GOLDEN / "input_ids.json", src / "input_ids.json")
    model = load_source()
    amax: dict[str, list[float]] = {}
    calls: dict[str, int] = {}

    def hook(name):
        def pre(_mod, inp):
            k = calls.get(name, 0)
            calls[name] = k + 1
            a = amax.setdefault(name, [0.0, 0.0])
            a[k % 2] = max(a[k % 2], float(inp[0].detach().abs().amax().float()))
        return pre

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for ids in calib_batches(cfg["vocab_size"]):
            calls.clear()
            model(input_ids=ids)
    (OUT / "calib_amax.json").write_text(json.dumps(
        {"calib": {"shape": list(CALIB_SHAPE), "seed": 1234, "low": 3}, "dtype": "bfloat16",
         "amax": {k: {"pass1": v[0], "pass2": v[1]} for k, v in sorted(amax.items())}}, indent=1) + "\n")
    print("wrote", src, OUT / "calib_amax.json")


def _forward_loop(vocab):
    def loop(model):
        with torch.no_grad():
            for ids in calib_batches(vocab):
                model(input_ids=ids)
    return loop


def _register_kv_quantizers(mtq) -> None:
    """ModelOpt cannot place KV quantizers in the loop attention by itself (the attention math runs in the
    runtime backend, outside ``Attention.forward``: "Auto quantization of KV Cache fails"). Register a quantized
    Attention whose ``k_bmm_quantizer``/``v_bmm_quantizer`` observe the k_proj/v_proj outputs of both passes.
    Note: that is the pre-RoPE key (RoPE mixes pairs of dims, so the amax can differ slightly from the cached
    key's); the export renames them to ``k_proj.k_scale``/``v_proj.v_scale`` = amax / 448 as usual."""
    from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer
    from trtllm_loop.modeling.modeling_iquestloopcoder import Attention

    class QuantLoopAttention(QuantModule):
        def _setup(self):
            self.k_bmm_quantizer = TensorQuantizer()
            self.v_bmm_quantizer = TensorQuantizer()
            self.k_proj.register_forward_hook(lambda _m, _i, out: self.k_bmm_quantizer(out))
            self.v_proj.register_forward_hook(lambda _m, _i, out: self.v_bmm_quantizer(out))

    mtq.register(original_cls=Attention, quantized_cls=QuantLoopAttention)


def _cpu_fake_quant_shim() -> None:
    """ModelOpt 0.47's NVFP4 fake-quant asserts CUDA (tensor_quant.py:172); AWQ needs it. Pure-torch stand-in,
    shared/docs/nvfp4.md section 6.4 (test aid, version specific)."""
    import modelopt.torch.quantization.tensor_quant as tq
    from trtllm_loop import nvfp4

    orig = tq.dynamic_block_quantize_op

    def fake_quant(x, block_size, amax):
        flat = x.float().reshape(-1, block_size)
        g = amax.float().amax() / nvfp4.GLOBAL_DIV
        packed, s, _ = nvfp4.quantize(flat, g)
        return nvfp4.dequantize(packed, s, g).reshape(x.shape).to(x.dtype)

    def patched(inp, bs, amax, nb, eb, snb, seb):
        if (nb, eb, snb, seb) == (4, 2, 8, 4) and not inp.is_cuda:
            return fake_quant(inp, bs, amax)
        return orig(inp, bs, amax, nb, eb, snb, seb)

    tq.dynamic_block_quantize_op = patched


def cmd_modelopt(args) -> None:
    import copy
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    _register_kv_quantizers(mtq)

    vocab = json.loads((OUT / "source" / "config.json").read_text())["vocab_size"]
    fp8_kv = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    fp8_kv["quant_cfg"] += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])  # 0.47: quant_cfg is a list
    variants = {"modelopt_nvfp4": mtq.NVFP4_DEFAULT_CFG, "modelopt_w4a16_nvfp4": mtq.W4A16_NVFP4_CFG,
                "modelopt_nvfp4_fp8kv": fp8_kv, "modelopt_fp8": mtq.FP8_DEFAULT_CFG,
                "modelopt_nvfp4_awq": mtq.NVFP4_AWQ_LITE_CFG}
    _cpu_fake_quant_shim()
    for name, cfg in variants.items():
        if args.only and name not in args.only:
            continue
        model = load_source()
        cfg = copy.deepcopy(cfg)
        cfg["quant_cfg"].append({"quantizer_name": "*gate_projections*", "enable": False})  # gate stays BF16
        mtq.quantize(model, cfg, _forward_loop(vocab))
        out = OUT / name
        shutil.rmtree(out, ignore_errors=True)
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(out))
        print(f"{name}: modelopt {modelopt.__version__} ->", sorted(p.name for p in out.iterdir()))


def _tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def cmd_llmcompressor(args) -> None:
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    vocab = json.loads((OUT / "source" / "config.json").read_text())["vocab_size"]
    rows = [r.tolist() for b in calib_batches(vocab) for r in b]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    for name, scheme in (("llmc_nvfp4", "NVFP4"), ("llmc_nvfp4a16", "NVFP4A16")):
        if args.only and name not in args.only:
            continue
        model = load_source()
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
        oneshot(model=model, dataset=ds, recipe=recipe, processor=_tiny_tokenizer(vocab), pipeline="basic",
                num_calibration_samples=len(rows), max_seq_length=CALIB_SHAPE[2])
        out = OUT / name
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, save_compressed=True)
        print(f"{name}: llmcompressor {llmcompressor.__version__} ->", sorted(p.name for p in out.iterdir()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["source", "modelopt", "llmcompressor"])
    p.add_argument("--only", nargs="*", help="fixture names to (re)build")
    args = p.parse_args()
    {"source": cmd_source, "modelopt": cmd_modelopt, "llmcompressor": cmd_llmcompressor}[args.step](args)


if __name__ == "__main__":
    main()
