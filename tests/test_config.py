"""config.json parsing, validation errors, the slot plan and the sizing arithmetic."""
import json

import pytest

from trtllm_loop.config import ConfigError, LoopConfig
from trtllm_loop.synth import preset_config

RELEASED = dict(model_type="iquestloopcoder", architectures=["IQuestLoopCoderForCausalLM"], vocab_size=76800,
                hidden_size=5120, intermediate_size=27648, num_hidden_layers=80, num_attention_heads=40,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000,
                rms_norm_eps=1e-5, loop_num=2, loop_window_size=64, eos_token_id=[2, 75864, 75869],
                tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.55.4")


def test_released_config_parses_with_eos_list():
    c = LoopConfig.from_dict(RELEASED)
    assert c.eos_token_id == (2, 75864, 75869)
    assert c.group_size == 5 and c.q_size == 5120 and c.kv_size == 1024
    assert c.extra["transformers_version"] == "4.55.4"
    assert LoopConfig.from_dict(c.to_dict()) == c  # round trip


def test_released_parameter_count_and_tensor_count():
    # figures from loop-architecture.md 6.1 (ScaleRLT's header count) and section 2 (883 tensors)
    c = LoopConfig.from_dict(RELEASED)
    assert len(c.tensor_shapes()) == 883
    assert c.num_parameters() == 39_794_696_320
    assert c.tensor_shapes()["model.gate_projections.79.weight"] == (40, 128)
    assert c.tensor_shapes()["model.gate_projections.0.bias"] == (40,)


def test_slot_plan_interleaves_160_slots():
    c = LoopConfig.from_dict(RELEASED)
    plan = c.slot_plan()
    assert len(plan) == 160 == c.num_kv_slots
    assert [(s.slot, s.layer, s.loop_pass, s.window) for s in plan[:4]] == [(0, 0, 1, None), (1, 0, 2, 64),
                                                                            (2, 1, 1, None), (3, 1, 2, 64)]
    assert plan[159].layer == 79 and plan[159].window == 64
    assert c.slot_windows(8192) == [8192, 64] * 80
    assert c.window_pattern(32) == [32, 32]  # a window longer than max_seq_len is clamped like TRT-LLM does
    assert c.pass1_slot(7) == 14 and c.pass2_slot(7) == 15


def test_kv_bytes_match_the_architecture_doc():
    c = LoopConfig.from_dict(RELEASED)
    assert c.kv_bytes_per_token("bfloat16") == {"pass1": 327_680, "pass2": 327_680}
    assert c.kv_bytes_per_token("fp8")["pass1"] == 163_840
    # 327,680 * T + 20 MiB (doc 6.2)
    assert c.kv_bytes_per_sequence(8192, "bfloat16") == 327_680 * 8192 + 20_971_520
    assert c.kv_bytes_per_sequence(10, "bfloat16") == 327_680 * 20


@pytest.mark.parametrize("change,message", [
    ({"loop_num": 3}, "field 'loop_num' is 3; only loop_num = 2 is supported"),
    ({"loop_num": 1}, "only loop_num = 2"),
    ({"model_type": "llama"}, "field 'model_type' is 'llama'; allowed: 'iquestloopcoder'"),
    ({"architectures": ["LlamaForCausalLM"]}, "field 'architectures'"),
    ({"num_key_value_heads": 7}, "'num_key_value_heads' is 7; it must divide num_attention_heads = 40"),
    ({"hidden_act": "gelu"}, "field 'hidden_act' is 'gelu'; allowed: 'silu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "field 'rope_scaling'"),
    ({"attention_bias": True}, "field 'attention_bias' is true; allowed: false"),
    ({"loop_window_size": 0}, "field 'loop_window_size' is 0; it must be a positive integer"),
    ({"loop_window_size": "64"}, "field 'loop_window_size' is '64' (str); expected int"),
    ({"num_hidden_layers": True}, "field 'num_hidden_layers' is True (bool); expected int"),
    ({"eos_token_id": [2, 80000]}, "field 'eos_token_id' has 80000"),
    ({"head_dim": 127}, "field 'head_dim' is 127; it must be a positive even integer"),
    ({"torch_dtype": "int8"}, "field 'torch_dtype' is 'int8'"),
])
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        LoopConfig.from_dict(dict(RELEASED, **change))


def test_missing_head_dim_is_derived_and_file_errors_name_the_path(tmp_path):
    d = dict(RELEASED)
    del d["head_dim"]
    assert LoopConfig.from_dict(d).head_dim == 128
    with pytest.raises(ConfigError, match="config.json: not found"):
        LoopConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LoopConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(RELEASED))
    assert LoopConfig.from_file(tmp_path).num_hidden_layers == 80


def test_presets_are_valid():
    assert preset_config("40b-shape", "bfloat16").num_parameters() == 39_794_696_320
    assert preset_config("tiny", "float32").loop_window_size == 16


def test_tensor_parallel_sizes():
    c = LoopConfig.from_dict(RELEASED)
    # 40 query heads split evenly; 8 KV heads split evenly (1, 2, 4, 8) or replicated (40 = 5 x 8)
    assert c.tp_sizes() == [1, 2, 4, 8, 40]
    c.check_tp(8)
    with pytest.raises(ConfigError, match="tensor parallel size 16 does not fit .*allowed: \\[1, 2, 4, 8, 40\\]"):
        c.check_tp(16)
    mqa = LoopConfig.from_dict(dict(RELEASED, num_attention_heads=4, num_key_value_heads=1, head_dim=None,
                                    hidden_size=64))
    assert mqa.tp_sizes() == [1, 2, 4]
