"""NVFP4 math in torch: E2M1 codes, nibble packing, FP8 block-16 scales, the two global-scale conventions,
the 128x4 block-scale swizzle and a W4A4 activation emulation.

Conventions (``shared/docs/nvfp4.md`` sections 1-5):

* a 4-bit code is ``sign << 3 | mag``, ``mag`` indexing ``[0, .5, 1, 1.5, 2, 3, 4, 6]``; rounding is
  round-to-nearest, ties to the even code;
* two codes per byte along the input (K) dimension, element ``2j`` in the LOW nibble: ``[N, K] -> [N, K/2]``;
* one float8_e4m3fn scale per 16 consecutive inputs: ``[N, K/16]``, row-major (never swizzled on disk);
* one fp32 per-tensor scale. ModelOpt stores a *multiplier* ``weight_scale_2 = amax / 2688``;
  compressed-tensors stores a *divisor* ``weight_global_scale = 2688 / amax``. Everything here takes the
  multiplier ("g"); use :func:`ct_to_multiplier` for compressed-tensors values.

    W[n, k] = E2M1[code(n, k)] * float32(block_scale[n, k // 16]) * g
"""
from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_DIV = E2M1_MAX * E4M3_MAX  # 2688: the largest block scale (448) times the largest element (6)
MIN_BLOCK_SCALE = 2.0 ** -9      # smallest FP8 E4M3 subnormal; ModelOpt clamps block scales to it

# value of each 4-bit code; code = sign << 3 | magnitude index
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_MIDS = (E2M1_VALUES[1:8] + E2M1_VALUES[:7]) / 2  # decision bounds 0.25 0.75 1.25 1.75 2.5 3.5 5


# ---------------------------------------------------------------------------------------------- elements
def round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Magnitudes ``a >= 0`` -> E2M1 magnitude index 0..7 (nearest, ties to even index, saturating at 6).

    The index counts the decision bounds below ``a``; a value exactly on a bound goes to the even side, i.e. it
    counts bounds 0.75, 1.75, 3.5 (odd lower index: round up) but not 0.25, 1.25, 2.5, 5. Seven comparisons
    (no int64 bucket indices: ~10x faster than ``torch.bucketize`` on CPU, same result)."""
    a = a.float().clamp(max=E2M1_MAX)
    idx = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for j, m in enumerate(_MIDS.tolist()):
        idx.add_(((a >= m) if j % 2 else (a > m)).view(torch.uint8))
    return idx


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Already-scaled values -> 4-bit codes (uint8, one code per element). -0.0 and negatives set bit 3."""
    return round_e2m1(x.abs()) | ((x < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_VALUES.to(codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` codes -> ``[..., K/2]`` bytes, element 2j in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: last dimension {codes.shape[-1]} is odd")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[..., K/2]`` bytes -> ``[..., K]`` codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------- scales
def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """ModelOpt ``weight_scale_2`` / ``input_scale``: amax / (6 * 448), a dequant multiplier."""
    return torch.as_tensor(amax, dtype=torch.float32) / GLOBAL_DIV


def ct_to_multiplier(global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors ``weight_global_scale`` / ``input_global_scale`` (a divisor) -> multiplier."""
    return 1.0 / global_scale.float().reshape(())


def _blocks(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"NVFP4 needs a 2-D weight with in_features divisible by {BLOCK}, got {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1, BLOCK)


def block_scales(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """ModelOpt block scales: ``fp8(clamp(block_amax / (6 g), 2^-9, 448))``; an all-zero block gets 1.0."""
    bamax = _blocks(w).abs().amax(-1).float()
    s = (bamax / (E2M1_MAX * g)).clamp(MIN_BLOCK_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.where(bamax == 0, torch.ones_like(s, dtype=torch.float32), s.float()).to(torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------- quantize
def quantize(w: torch.Tensor, g: torch.Tensor | float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ModelOpt NVFP4 (fp32 arithmetic): ``w [N, K]`` -> (packed uint8 [N, K/2], fp8 scale [N, K/16],
    fp32 ``weight_scale_2`` scalar). ``g`` defaults to ``amax(w) / 2688``; pass the stored (or fused-group)
    value to reproduce a checkpoint's bytes."""
    g = global_scale_from_amax(w.abs().amax().float()) if g is None else torch.as_tensor(g, dtype=torch.float32)
    g = g.reshape(())
    s = block_scales(w, g)
    blk = _blocks(w).float()
    codes = encode_e2m1(blk / (s.float().unsqueeze(-1) * g))
    return pack_nibbles(codes.flatten(1)), s, g


def quantize_ct(w: torch.Tensor, global_scale: torch.Tensor | float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llm-compressor / compressed-tensors NVFP4 rounding: ``s = fp8(clamp(gs * bf16(block_amax/6), ±448))``
    and ``codes = rne(x / (s / gs))`` in fp32, ``gs`` the (bf16-rounded) divisor. Returns
    (packed, fp8 scale, fp32 ``weight_global_scale`` of shape (1,))."""
    if global_scale is None:
        global_scale = (GLOBAL_DIV / w.abs().amax().float()).to(torch.bfloat16)
    gs = torch.as_tensor(global_scale).float().reshape(())
    blk = _blocks(w)
    bamax = (blk.abs().amax(-1).to(torch.bfloat16).float() / E2M1_MAX).to(torch.bfloat16).float()
    s = (gs * bamax).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    s_f = s.float()
    s_f = torch.where(s_f == 0, torch.full_like(s_f, torch.finfo(torch.float8_e4m3fn).eps), s_f)
    codes = encode_e2m1(blk.float() / (s_f / gs).unsqueeze(-1))
    return pack_nibbles(codes.flatten(1)), s_f.to(torch.float8_e4m3fn), gs.reshape(1)


# byte -> (value of the low nibble, value of the high nibble): one lookup decodes two elements
_BYTE_LUT = torch.stack((E2M1_VALUES[torch.arange(256) & 0xF], E2M1_VALUES[torch.arange(256) >> 4]), dim=-1)


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, g: torch.Tensor | float) -> torch.Tensor:
    """fp32 dequantization of (a row slice of) a packed weight; see :func:`dequantize`."""
    n, k = packed.shape[0], packed.shape[1] * 2
    vals = torch.nn.functional.embedding(packed.int(), _BYTE_LUT.to(packed.device)).view(n, k // BLOCK, BLOCK)
    g = torch.as_tensor(g, dtype=torch.float32).reshape(())
    return (vals * (scale.float() * g).unsqueeze(-1)).view(n, k)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, g: torch.Tensor | float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed ``[N, K/2]`` + fp8 ``[N, K/16]`` + multiplier ``g`` -> dense ``[N, K]``, computed in fp32 as
    ``e2m1 * (fp32(scale) * g)``, in row chunks so the temporaries stay small for 27648 x 5120 weights."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if packed.dim() != 2 or scale.shape != (n, k // BLOCK):
        raise ValueError(f"block scale shape {tuple(scale.shape)} does not match packed {tuple(packed.shape)}"
                         f" (expected {(n, k // BLOCK)})")
    out = torch.empty(n, k, dtype=dtype)
    step = row_chunk(k)
    for r in range(0, n, step):
        out[r:r + step] = dequantize_rows(packed[r:r + step], scale[r:r + step], g).to(dtype)
    return out


def dequantized_amax(packed: torch.Tensor, scale: torch.Tensor, g: torch.Tensor | float) -> float:
    """``max |dequantize(packed, scale, g)|`` without dequantizing: E2M1 values grow with the 3-bit magnitude
    code, so each block's largest |element| is ``E2M1[max magnitude code] * (scale * g)``."""
    n, kb = scale.shape
    mag = torch.maximum(packed & 7, (packed >> 4) & 7).view(n, kb, BLOCK // 2).amax(-1)
    g = torch.as_tensor(g, dtype=torch.float32).reshape(())
    return float((E2M1_VALUES[mag.long()] * (scale.float() * g)).amax()) if mag.numel() else 0.0


def row_chunk(k: int, elements: int = 1 << 22) -> int:
    """Rows per chunk so that one chunk holds about ``elements`` values."""
    return max(1, elements // max(k, 1))


def rescale_to_global(packed: torch.Tensor, scale: torch.Tensor, g_old: torch.Tensor, g_new: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Re-express a tensor quantized under multiplier ``g_old`` under ``g_new >= g_old`` (a fused group's max).

    Block scales become ``s * g_old / g_new``. Where that is representable in FP8 the 4-bit codes are kept and
    the dequantized values are unchanged (up to fp32 rounding of the product); the other blocks are
    re-quantized from their dequantized values (lossy). Returns (packed, scale, number of re-quantized blocks).
    """
    g_old64, g_new64 = float(g_old), float(g_new)
    want = scale.double() * (g_old64 / g_new64)
    s_new = want.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    exact = (s_new.double() - want).abs() <= 1e-12 * want
    if bool(exact.all()):
        return packed, s_new, 0
    w = dequantize(packed, scale, g_old)
    p2, s2, _ = quantize(w, torch.as_tensor(g_new, dtype=torch.float32))
    keep = exact.repeat_interleave(BLOCK // 2, dim=1)  # block b covers bytes 8b .. 8b+7
    s_out = torch.where(exact, s_new.float(), s2.float()).to(torch.float8_e4m3fn)
    return torch.where(keep, packed, p2), s_out, int((~exact).sum())


# ---------------------------------------------------------------------------------------------- swizzle
def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def swizzle_block_scale(scale: torch.Tensor) -> torch.Tensor:
    """Linear ``[N, K/16]`` -> the CUTLASS/TRT-LLM "128x4" layout, flat ``[round_up(N,128) * round_up(K/16,4)]``
    with zero padding (TRT-LLM ``block_scale_interleave``, vLLM ``swizzle_blockscale``)."""
    n, kb = scale.shape
    mp, kp = _round_up(n, 128), _round_up(kb, 4)
    padded = torch.zeros(mp, kp, dtype=torch.uint8)
    padded[:n, :kb] = scale.view(torch.uint8)
    out = padded.reshape(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4).reshape(-1)
    return out.view(scale.dtype) if scale.dtype != torch.uint8 else out


def unswizzle_block_scale(flat: torch.Tensor, n: int, kb: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_block_scale`: flat 128x4 buffer -> linear ``[n, kb]``."""
    mp, kp = _round_up(n, 128), _round_up(kb, 4)
    b = flat.view(torch.uint8).reshape(mp // 128, kp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(mp, kp)
    out = b[:n, :kb].contiguous()
    return out.view(flat.dtype) if flat.dtype != torch.uint8 else out


# ---------------------------------------------------------------------------------------------- W4A4
def fake_quant_activation(x: torch.Tensor, input_scale: torch.Tensor | float,
                          pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W4A4 activation emulation for a Linear input ``x [..., K]``: NVFP4 with dynamic per-16 FP8 block scales
    under the static global multiplier ``input_scale`` (= amax_x / 2688, ModelOpt meaning), dequantized again.
    Values beyond the calibrated amax saturate (block scale 448, element 6).

    NVFP4_AWQ: the engine quantizes ``x * pre_quant_scale`` and multiplies by the stored weight. The dense
    weight of :func:`trtllm_loop.checkpoint.load_state_dict` has ``pre_quant_scale`` folded in, so this returns
    ``Q(x * pqs) / pqs``; multiplying it by that dense weight gives exactly ``Q(x * pqs) @ W_ckpt.T``."""
    shape, dtype = x.shape, x.dtype
    xf = x.reshape(-1, shape[-1]).float()
    if pre_quant_scale is not None:
        xf = xf * pre_quant_scale.float()
    g = torch.as_tensor(input_scale, dtype=torch.float32).reshape(())
    packed, s, _ = quantize(xf, g)
    y = dequantize(packed, s, g)
    if pre_quant_scale is not None:
        y = y / pre_quant_scale.float()
    return y.reshape(shape).to(dtype)
