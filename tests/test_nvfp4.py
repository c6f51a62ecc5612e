"""NVFP4 math against the facts of shared/docs/nvfp4.md (sections 1, 3.3, 4.4, 5): value table, tie rule,
nibble order, FP8 block scales, reciprocal conventions, the 128x4 swizzle, W4A4 emulation, fused rescaling."""
import pytest
import torch

from trtllm_loop import nvfp4


def test_e2m1_table_and_codes():
    want = [0, .5, 1, 1.5, 2, 3, 4, 6]
    assert nvfp4.decode_e2m1(torch.arange(8, dtype=torch.uint8)).tolist() == want
    assert nvfp4.decode_e2m1(torch.arange(8, 16, dtype=torch.uint8)).tolist() == [-v for v in want]
    assert nvfp4.encode_e2m1(torch.tensor(want)).tolist() == list(range(8))
    assert nvfp4.encode_e2m1(torch.tensor([-0.5, -6.0, -1.5])).tolist() == [9, 15, 11]


@pytest.mark.parametrize("x, code", [
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),  # ties: to the even code
    (0.2, 0), (0.3, 1), (0.76, 2), (2.49, 4), (2.51, 5), (4.9, 6), (5.1, 7), (7.0, 7), (1e9, 7),  # nearest, saturate
])
def test_round_ties_to_even(x, code):
    assert int(nvfp4.round_e2m1(torch.tensor([x]))[0]) == code


def test_low_nibble_is_even_element():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = nvfp4.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(nvfp4.unpack_nibbles(packed), codes)


def test_fp8_scale_bytes_of_the_doc_example():
    # doc 2.2: q_proj weight_scale bytes 114, 118, 113, 113 are the values 160, 224, 144, 144
    b = torch.tensor([114, 118, 113, 113], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert b.float().tolist() == [160, 224, 144, 144]
    p = torch.zeros(1, 8, dtype=torch.uint8)
    w = nvfp4.dequantize(p, b.reshape(1, 4)[:, :1], 1.0)
    assert w.shape == (1, 16)


def test_quantize_layout_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.02
    packed, s, g = nvfp4.quantize(w)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 64)
    assert s.dtype == torch.float8_e4m3fn and s.shape == (96, 8)
    assert g.shape == () and float(g) == pytest.approx(float(w.abs().max()) / 2688, rel=1e-6)
    assert float(s.float().max()) == pytest.approx(448, rel=0.07)  # the largest block lands near 448
    d = nvfp4.dequantize(packed, s, g)
    err = (d - w).view(96, 8, 16).abs().amax(-1) / w.view(96, 8, 16).abs().amax(-1)
    assert float(err.max()) <= 0.177  # half the top E2M1 step plus FP8 rounding (doc 6.5)
    rel = float((d - w).norm() / w.norm())
    assert 0.07 < rel < 0.12  # ~0.095 for Gaussian weights
    # swapping the nibbles wrecks it (doc: 0.095 -> 1.41)
    swapped = ((packed & 0xF) << 4) | (packed >> 4)
    assert float((nvfp4.dequantize(swapped, s, g) - w).norm() / w.norm()) > 1.0


def test_exact_grid_values_roundtrip_bit_exact():
    # a weight that is exactly e2m1 * fp8 * g reproduces itself
    g = torch.tensor(2.0 ** -10)
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    codes[:, 0] = 7  # each block's max is 6 -> block scale recovered exactly
    codes[:, 16] = 7
    s = torch.tensor([[64.0, 2.0]] * 4).to(torch.float8_e4m3fn)
    w = nvfp4.dequantize(nvfp4.pack_nibbles(codes), s, g)
    p2, s2, _ = nvfp4.quantize(w, g)
    assert torch.equal(s2.view(torch.uint8), s.view(torch.uint8))
    assert torch.equal(nvfp4.dequantize(p2, s2, g), w)
    codes2 = nvfp4.unpack_nibbles(p2)
    assert torch.equal(codes2, torch.where(codes == 8, torch.zeros_like(codes), codes))  # -0 encodes as +0


def test_ct_reciprocal_convention():
    torch.manual_seed(2)
    w = (torch.randn(32, 64) * 0.05).to(torch.bfloat16)
    p_ct, s_ct, gs = nvfp4.quantize_ct(w)
    assert gs.shape == (1,) and float(gs) == float(torch.tensor(2688 / float(w.abs().max().float()))
                                                   .to(torch.bfloat16))
    d_ct = nvfp4.dequantize(p_ct, s_ct, nvfp4.ct_to_multiplier(gs))
    # the same weight through ModelOpt's convention with weight_scale_2 = 1 / weight_global_scale
    p_mo, s_mo, _ = nvfp4.quantize(w, 1.0 / gs.reshape(()))
    d_mo = nvfp4.dequantize(p_mo, s_mo, 1.0 / gs.reshape(()))
    assert float((d_ct - d_mo).abs().max()) <= 0.177 * float(w.abs().max())
    assert float((d_ct - w.float()).norm() / w.float().norm()) < 0.12


def _doc_offset(m, k, kb):  # shared/docs/nvfp4.md 4.4, TRT-LLM get_sf_out_offset_128x4
    nkt = (kb + 3) // 4
    return (m // 128) * nkt * 512 + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)


@pytest.mark.parametrize("n, kb", [(256, 16), (300, 22), (128, 4), (5, 3)])
def test_swizzle_matches_trtllm_offsets_and_vllm_reshape(n, kb):
    s = torch.randint(1, 255, (n, kb), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    flat = nvfp4.swizzle_block_scale(s)
    mp, kp = (n + 127) // 128 * 128, (kb + 3) // 4 * 4
    assert flat.numel() == mp * kp
    want = torch.zeros(mp * kp, dtype=torch.uint8)
    for m in range(n):
        for k in range(kb):
            want[_doc_offset(m, k, kb)] = s[m, k]
    assert torch.equal(flat, want)
    # vLLM swizzle_blockscale: pad, reshape(M/128, 4, 32, K/4, 4).permute(0, 3, 2, 1, 4)
    pad = torch.zeros(mp, kp, dtype=torch.uint8)
    pad[:n, :kb] = s
    vllm = pad.reshape(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4).reshape(-1)
    assert torch.equal(flat, vllm)
    assert torch.equal(nvfp4.unswizzle_block_scale(flat, n, kb), s)
    fp8 = s.view(torch.float8_e4m3fn)
    assert nvfp4.swizzle_block_scale(fp8).dtype == torch.float8_e4m3fn


def _doc_w4a4(x, p, s8, w_g, in_g):  # shared/docs/nvfp4.md 6.5 w4a4_linear, written out independently
    bamax = x.view(x.shape[0], -1, 16).abs().amax(-1)
    sx = (bamax / (6 * in_g)).clamp(2 ** -9, 448).to(torch.float8_e4m3fn).float()
    grid = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6])
    a = (x.view(x.shape[0], -1, 16) / (sx.unsqueeze(-1) * in_g)).abs().clamp(max=6)
    mids = (grid[1:] + grid[:-1]) / 2
    idx = torch.bucketize(a, mids)
    idx = idx + ((a == mids[idx.clamp(max=6)]) & (idx % 2 == 1)).long()
    xq = (grid[idx] * x.view(x.shape[0], -1, 16).sign() * sx.unsqueeze(-1)).flatten(1)
    wq = nvfp4.dequantize(p, s8, 1.0)
    return (xq @ wq.T) * (in_g * w_g)


def test_fake_quant_activation_is_the_w4a4_gemm():
    torch.manual_seed(3)
    x, w = torch.randn(8, 64), torch.randn(32, 64) * 0.05
    p, s8, wg = nvfp4.quantize(w)
    in_g = x.abs().max() / 2688
    y = nvfp4.fake_quant_activation(x, in_g) @ nvfp4.dequantize(p, s8, wg).T
    y_doc = _doc_w4a4(x, p, s8, wg, in_g)
    assert torch.allclose(y, y_doc, rtol=1e-5, atol=1e-6)
    rel = float((y - x @ w.T).norm() / (x @ w.T).norm())
    assert 0.09 < rel < 0.19  # doc 5: ~0.134 for two FP4 operands
    # values above the calibrated amax saturate at 6 * 448 * input_scale
    big = nvfp4.fake_quant_activation(torch.full((1, 16), 10.0), torch.tensor(1.0 / 2688))
    assert torch.allclose(big, torch.ones(1, 16))


def test_fake_quant_activation_with_pre_quant_scale_matches_folded_weight():
    torch.manual_seed(4)
    x, w_ckpt = torch.randn(4, 32), torch.randn(16, 32) * 0.05
    pqs = torch.rand(32) + 0.5
    p, s8, wg = nvfp4.quantize(w_ckpt)
    w_deq = nvfp4.dequantize(p, s8, wg)
    in_g = (x * pqs).abs().max() / 2688
    engine = nvfp4.fake_quant_activation(x * pqs, in_g) @ w_deq.T  # y = Q(x * pqs) @ W_ckpt^T
    ours = nvfp4.fake_quant_activation(x, in_g, pqs) @ (w_deq * pqs).T  # folded dense weight
    assert torch.allclose(ours, engine, rtol=1e-5, atol=1e-6)


def test_rescale_to_global_power_of_two_is_exact():
    torch.manual_seed(5)
    w = torch.randn(16, 64) * 0.01
    p, s, g = nvfp4.quantize(w)
    g_new = g * 4  # block scales shrink by 4: exact in FP8 unless they fall into subnormals
    p2, s2, n = nvfp4.rescale_to_global(p, s, g, g_new)
    assert n == 0 and torch.equal(p2, p)
    assert torch.equal(nvfp4.dequantize(p2, s2, g_new), nvfp4.dequantize(p, s, g))


def test_rescale_to_global_reports_inexact_blocks():
    torch.manual_seed(6)
    w = torch.randn(16, 64) * 0.01
    p, s, g = nvfp4.quantize(w)
    g_new = g * 1.37
    p2, s2, n = nvfp4.rescale_to_global(p, s, g, g_new)
    assert 0 < n <= 64
    d_old, d_new = nvfp4.dequantize(p, s, g), nvfp4.dequantize(p2, s2, g_new)
    blk_amax = w.view(16, 4, 16).abs().amax(-1, keepdim=True)
    assert float(((d_new - w).view(16, 4, 16).abs() / blk_amax).max()) <= 0.25
    exact = ~torch.isclose(d_old, d_new, rtol=0, atol=0).view(16, 4, 16).any(-1)
    assert int((~exact).sum()) <= n  # untouched blocks dequantize identically


def test_dequantized_amax_without_dequantizing():
    torch.manual_seed(7)
    for shape in [(64, 128), (3, 16)]:
        w = torch.randn(shape) * 0.03
        p, s, g = nvfp4.quantize(w)
        assert nvfp4.dequantized_amax(p, s, g) == float(nvfp4.dequantize(p, s, g).abs().max())
