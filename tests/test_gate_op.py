"""torch.ops.trtllm_loop.gate_mix (plugins/loop_gate, built by `make plugins`): the CPU kernel -- the same
per-head math the CUDA kernel runs (gate_math.h) -- against the torch composition of `modeling.ops`
(`gate_mix_reference`) and a float64 evaluation of it; the fake kernel; the argument checks; the dispatch of
`kernels.gate_mix.gate_mix`."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trtllm_loop.kernels import gate_mix as gm

# (N, H, D, theta): the 40B layout (H = 40, D = 128), odd N, MQA-like single heads, tiny and odd head_dim / 2
SHAPES = [(1, 40, 128, 500000.0), (7, 40, 128, 10000.0), (33, 8, 64, 1e6), (5, 3, 6, 10000.0), (2, 1, 2, 500000.0),
          (9, 5, 96, 123456.0), (64, 40, 128, 500000.0)]
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


@pytest.fixture(scope="module", autouse=True)
def op():
    assert gm.load_op(), f"{gm.build_dir() / gm.OP_FILE} is not built: run `make plugins`"
    return torch.ops.trtllm_loop.gate_mix


def inputs(N, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + N * 7 + H + D)
    pos = torch.randint(0, 131072, (N,), generator=g, dtype=torch.int32)
    pos[0] = 131071  # the largest position the tests promise (fp32 angles of ~1.3e5 rad)
    if N > 1:
        pos[1] = 0
    q, glob, loc = (torch.randn(N, H, D, generator=g) for _ in range(3))
    w = torch.randn(H, D, generator=g) / D ** 0.5  # gate logits O(1), as in trained and synthetic checkpoints
    b = torch.randn(H, generator=g)
    return [t.to(dtype) if i != 1 else t for i, t in enumerate((q, pos, glob, loc, w, b))]


def ref64(q, pos, glob, loc, w, b, theta):
    """The reference composition evaluated in float64 from the same (rounded) inputs and the same fp32 angles."""
    return gm.gate_mix_reference(q.double(), pos, glob.double(), loc.double(), w.double(), b.double(), theta)


@pytest.mark.parametrize("N,H,D,theta", SHAPES)
def test_fp32_equals_the_reference_within_1e6(op, N, H, D, theta):
    args = inputs(N, H, D)
    got = op(*args, theta)
    want = gm.gate_mix_reference(*args, theta)
    assert got.shape == (N, H, D) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got.double() - ref64(*args, theta)).abs().max() < 1e-5
    # sensitivity: RoPE off by one position, or the gate from the pre-RoPE query, is far outside 1e-6
    shifted = list(args)
    shifted[1] = args[1] + 1
    assert (op(*shifted, theta) - want).abs().max() > 1e-3
    no_rope = gm.mix(gm.gate(args[0], args[4], args[5]), args[2], args[3])
    assert (no_rope - want).abs().max() > 1e-3


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of dtype's values at |x| (normal range; fp16's subnormal spacing below)."""
    _, e = torch.frexp(x.abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.ldexp(torch.ones_like(x), e - 1 - MANTISSA[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,D,theta", SHAPES)
def test_half_precision_is_the_fp32_result_rounded_once(op, dtype, N, H, D, theta):
    """fp32 arithmetic on bf16/fp16 I/O: within half a unit of the last place of the exact result (plus the fp32
    error), where the torch composition in bf16/fp16 rounds every intermediate."""
    args = inputs(N, H, D, dtype)
    got = op(*args, theta)
    assert got.dtype == dtype and got.shape == (N, H, D)
    exact = ref64(*args, theta)
    err = (got.double() - exact).abs()
    bound = 0.5 * ulp(torch.maximum(exact.abs(), got.double().abs()), dtype) + 1e-6 * exact.abs().clamp_min(1)
    assert (err <= bound).all(), float((err / bound).max())
    ref_err = (gm.gate_mix_reference(*args, theta).double() - exact).abs()
    assert err.max() <= ref_err.max()


def test_q_may_be_a_strided_view_of_the_fused_qkv(op):
    N, H, Hkv, D = 5, 6, 2, 16
    q, pos, glob, loc, w, b = inputs(N, H, D)
    qkv = torch.cat([q.flatten(-2), torch.randn(N, 2 * Hkv * D)], -1)
    view = qkv[:, :H * D].unflatten(-1, (H, D))
    assert not view.is_contiguous()
    assert torch.equal(op(view, pos, glob, loc, w, b, 1e4), op(q, pos, glob, loc, w, b, 1e4))
    transposed = q.transpose(0, 1).contiguous().transpose(0, 1)  # heads outermost in memory: copied first
    assert torch.equal(op(transposed, pos, glob, loc, w, b, 1e4), op(q, pos, glob, loc, w, b, 1e4))


def test_no_tokens(op):
    q, pos, glob, loc, w, b = inputs(3, 4, 8)
    out = op(q[:0], pos[:0], glob[:0], loc[:0], w, b, 1e4)
    assert out.shape == (0, 4, 8)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.__setitem__(1, a[1].long()), "positions must be int32"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "positions must be int32 \\[5\\]"),
    (lambda a: a.__setitem__(0, a[0].flatten(-2)), "q must be \\[N, H, D\\]"),
    (lambda a: a.__setitem__(0, a[0][..., :7]), "head_dim .* must be even"),
    (lambda a: a.__setitem__(2, a[2].double()), "global_out must be Float"),
    (lambda a: a.__setitem__(3, a[3][:, :2]), "local_out must be Float"),
    (lambda a: a.__setitem__(4, a[4].t()), "gate_weight must be Float \\[4, 8\\]"),
    (lambda a: a.__setitem__(5, a[5][:3]), "gate_bias must be Float \\[4\\]"),
    (lambda a: [a.__setitem__(i, a[i].long()) for i in (0, 2, 3, 4, 5)], "q must be float32, float16 or bfloat16"),
])
def test_argument_errors_name_the_argument(op, change, message):
    args = inputs(5, 4, 8)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        op(*args, 1e4)


def test_fake_kernel_and_opcheck(op):
    args = inputs(3, 4, 8)
    meta = op(*(t.to("meta") for t in args), 1e4)
    assert meta.device.type == "meta" and meta.shape == (3, 4, 8) and meta.dtype == torch.float32
    with pytest.raises(RuntimeError, match="positions must be int32"):
        op(*(t.to("meta").long() if i == 1 else t.to("meta") for i, t in enumerate(args)), 1e4)
    # the schema and the fake kernel against the real one (torch.library.opcheck's checks for custom ops)
    torch.library.opcheck(op.default, (*args, 1e4), test_utils=("test_schema", "test_faketensor"))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_gate_mix_dispatches_to_the_op_or_the_reference(monkeypatch, tmp_path):
    args = inputs(4, 3, 8)
    with _Ops() as fused:
        a = gm.gate_mix(*args, 1e4)
    with _Ops() as plain:
        b = gm.gate_mix(*args, 1e4, use_op=False)
    assert fused.names == ["trtllm_loop.gate_mix.default"]
    assert "aten.sigmoid.default" in plain.names and torch.equal(b, gm.gate_mix_reference(*args, 1e4))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # no library built (a fresh checkout): nothing to load, the reference runs
    monkeypatch.setenv(gm.PLUGIN_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(gm, "_loaded", None)
    assert gm.load_op() is False and gm.op_available() is False and gm.op_available("cuda") is False
    assert gm.plugin_library() is None and gm.preload_library() is None
    assert torch.equal(gm.gate_mix(*args, 1e4), b)
