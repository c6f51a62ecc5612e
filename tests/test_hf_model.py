"""The transformers integration: AutoModel without trust_remote_code, generate, bf16, padding, save/load."""
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import GOLDEN_CASES, golden


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_auto_model_loads_without_remote_code_and_greedy_generate_matches_argmax(case):
    d, ids, expected = golden(case)
    assert AutoConfig.from_pretrained(d).model_type == "iquestloopcoder"
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)  # no trust_remote_code
    assert type(model).__name__ == "IQuestLoopCoderForCausalLM"
    with torch.no_grad():
        assert np.abs(model(torch.tensor([ids])).logits[0].numpy() - expected).max() < 1e-4
        prompt = ids[:6]
        # explicit all-ones mask: token 0 occurs in the prompts and must not be taken for padding
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                             max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
        assert out[:6] == prompt and len(out) == 26
        full = model(torch.tensor([out])).logits[0]
    assert full[5:-1].argmax(-1).tolist() == out[6:]  # greedy == teacher-forced argmax of the full forward


def test_gate_tensors_are_loaded_from_the_released_names():
    d, ids, expected = golden(GOLDEN_CASES[0])
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    from safetensors.torch import load_file

    sd = load_file(str(d / "model.safetensors"))
    assert torch.equal(model.model.gate_projections[1].bias, sd["model.gate_projections.1.bias"])
    assert torch.equal(model.model.gate_projections[0].weight, sd["model.gate_projections.0.weight"])


def test_bf16_prefill_equals_decode_and_tracks_fp32():
    d, ids, expected = golden(GOLDEN_CASES[0])
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
        cache, rows = None, []
        for t in ids:
            o = model(torch.tensor([[t]]), past_key_values=cache)
            cache = o.past_key_values
            rows.append(o.logits[0, -1])
    dec = torch.stack(rows)
    assert full.dtype == torch.float32  # logits up-cast like HF
    assert (full - dec).abs().max() < 0.15
    assert (full.argmax(-1) == torch.tensor(expected).argmax(-1)).float().mean() > 0.85
    assert np.abs(full.numpy() - expected).max() < 0.3


def test_left_padded_batch_generate_equals_single(tiny_ckpt):
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    a, b = [5, 17, 42, 99, 7, 300, 12, 8, 9, 10, 11, 30, 31, 32, 33, 34, 35, 36, 37, 38], [1, 3]
    single = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist() for p in (a, b)]
    pad = len(a) - len(b)
    ids = torch.tensor([a, [0] * pad + b])
    mask = torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert out[0, len(a):].tolist() == single[0]
    assert out[1, len(a):].tolist() == single[1]


def test_save_pretrained_round_trip(tmp_path, tiny_ckpt):
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    model.save_pretrained(tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_config_without_head_dim_means_the_same_on_every_path(tmp_path):
    """head_dim left out of config.json is hidden / heads (64 / 4 = 16) through load_model and through
    AutoModelForCausalLM alike; the two models are the same, and so are their logits."""
    import json

    from conftest import make_checkpoint
    from loopref import forward
    from trtllm_loop.modeling.load import load_model

    d, conf, w = make_checkpoint(tmp_path / "nohd", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16)
    del conf["head_dim"]
    (d / "config.json").write_text(json.dumps(conf))
    assert AutoConfig.from_pretrained(d).head_dim == 16
    a = load_model(d, "float32")
    b = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    ids = [5, 17, 3, 88, 41, 9, 12, 60, 2, 33, 7]
    with torch.no_grad():
        la, lb = a(torch.tensor([ids])).logits[0].numpy(), b(torch.tensor([ids])).logits[0].numpy()
    assert np.array_equal(la, lb)
    assert np.abs(la - forward(conf, w, ids)).max() < 1e-4  # and they are right (the oracle derives D = 64 / 4)


def test_transformers_config_is_derived_from_the_schema():
    """Every LoopConfig field has the same default in IQuestLoopCoderConfig, and bad values are refused there too."""
    from trtllm_loop.config import ConfigError, LoopConfig
    from trtllm_loop.modeling import IQuestLoopCoderConfig

    hf, ours = IQuestLoopCoderConfig(), LoopConfig()
    assert hf.to_loop_config() == ours
    assert IQuestLoopCoderConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=None).head_dim == 16
    with pytest.raises(ConfigError, match="'loop_window_size' is 0"):
        IQuestLoopCoderConfig(loop_window_size=0)
