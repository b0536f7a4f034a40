"""Lattice codecs: Hadamard rotation + one fp16 scale per vector + E8 or D4 box codes.

Per vector x [D] (D a power of two, multiple of 8):
  y = R x;  s = fp16(c_m * rms(y));  t = y / s
  E8 (8 coordinates per block, exactly 8m bits): the coset E8 + 1/4, truncated to a box,
      u = j/2 + 1/4 with all j_i of one parity p, sum(j) = 0 mod 4, j_i in [-2^m, 2^m - 1].
      Exact nearest point: per parity, round tau = 2t - 1/2 to that parity and clamp; when
      sum(j) = 2 mod 4 move the single cheapest coordinate by +-2 inside the box; keep the
      better parity. Stored as a_i = (j_i - p + 2^m) / 2 in [0, 2^m), sum(a) even:
      bit 0 = p, then a_0..a_6 (m bits each), then a_7 >> 1 (m - 1 bits): m bytes/block.
  D4 (4 coordinates per block, 4m - 1 bits): u = k + 1/2, sum(k) even, k_i in
      [-2^(m-1), 2^(m-1) - 1]; two blocks share m bytes (8m - 2 bits used).
Rates m = 2..8. A block's code is one little-endian word of m bytes (uint32 up to m = 4,
uint64 above): the same bit layout at every rate, so m <= 4 codes are byte-identical to
the kernels' format. Components: {"codes": [D/8 * m] uint8, "scale": [1] float16}. Decoding is a few integer
ops per coordinate (no search), then u * s and the inverse rotation.
"""

from __future__ import annotations

import mlx.core as mx

from mlxkv.codec.base import D4, E8, KernelLayout
from mlxkv.codec.rotation import rotate, unrotate

RATES = (2, 3, 4, 5, 6, 7, 8)  # bits per coordinate

# Step constants c_{L,m}: minimise the MSE of rotated, RMS-normalised K/V captured from
# SmolLM2-135M and Gemma-3-270M on a calibration text (Emma, never an evaluation window):
# `python benchmarks/fit_steps.py` (results/fit_steps.json).
_STEP = {
    ("e8", 2): 0.9727, ("e8", 3): 0.5716, ("e8", 4): 0.3243, ("e8", 5): 0.1800,
    ("e8", 6): 0.0966, ("e8", 7): 0.0521, ("e8", 8): 0.0284,
    ("d4", 2): 0.9240, ("d4", 3): 0.5500, ("d4", 4): 0.3171, ("d4", 5): 0.1748,
    ("d4", 6): 0.0971, ("d4", 7): 0.0510, ("d4", 8): 0.0275,
}


def _scale(y: mx.array, step: float) -> mx.array:
    rms = mx.sqrt(mx.mean(y * y, axis=-1, keepdims=True))
    return (rms * step).astype(mx.float16)


def word_dtype(num_bytes: int) -> mx.Dtype:
    """uint32 for words of up to 4 bytes, uint64 for 5 to 8 (rates m > 4)."""
    if not 1 <= num_bytes <= 8:
        raise ValueError(f"words hold 1 to 8 bytes, got {num_bytes}")
    return mx.uint32 if num_bytes <= 4 else mx.uint64


def _pack_words(words: mx.array, num_bytes: int) -> mx.array:
    """uint32/uint64 words [..., B] -> little-endian bytes [..., B * num_bytes] uint8."""
    dt = word_dtype(num_bytes)
    shifts = mx.arange(num_bytes, dtype=dt) * 8
    out = (words.astype(dt)[..., None] >> shifts) & 0xFF
    return out.reshape(*words.shape[:-1], -1).astype(mx.uint8)


def _unpack_words(codes: mx.array, num_bytes: int) -> mx.array:
    """Inverse of _pack_words: words [..., B] in word_dtype(num_bytes)."""
    dt = word_dtype(num_bytes)
    b = codes.astype(dt).reshape(*codes.shape[:-1], -1, num_bytes)
    shifts = mx.arange(num_bytes, dtype=dt) * 8
    return mx.sum(b << shifts, axis=-1).astype(dt)


def _cheapest_move(j, tau, step, lo, hi):
    """Index and signed move (+-step) of the cheapest in-box single-coordinate change."""
    base = (j - tau) ** 2
    inf = mx.array(float("inf"), dtype=mx.float32)
    up = mx.where(j + step <= hi, (j + step - tau) ** 2 - base, inf)
    down = mx.where(j - step >= lo, (j - step - tau) ** 2 - base, inf)
    both = mx.concatenate([up, down], axis=-1)  # [..., 2n]
    idx = mx.argmin(both, axis=-1)
    n = j.shape[-1]
    coord = idx % n
    sign = mx.where(idx < n, step, -step)
    delta = mx.take_along_axis(both, idx[..., None], axis=-1)[..., 0]
    return coord, sign, delta


def e8_nearest(tau: mx.array, bits: int) -> tuple[mx.array, mx.array]:
    """Exact nearest (j, p) in the box-truncated coset for targets tau [..., 8]."""
    size = 2**bits
    best_j, best_cost, best_p = None, None, None
    for p in (0, 1):
        lo, hi = -size + p, size - 2 + p
        j = 2 * mx.round((tau - p) / 2) + p
        j = mx.clip(j, lo, hi)
        cost = mx.sum((j - tau) ** 2, axis=-1)
        bad = (mx.sum(j, axis=-1).astype(mx.int32) % 4) != 0
        coord, sign, delta = _cheapest_move(j, tau, 2.0, lo, hi)
        fix = mx.where(bad[..., None] & (mx.arange(8) == coord[..., None]), sign[..., None], 0)
        j = j + fix
        cost = mx.where(bad, cost + delta, cost)
        if best_j is None:
            best_j, best_cost, best_p = j, cost, mx.zeros(cost.shape, dtype=mx.int32)
        else:
            take = cost < best_cost
            best_j = mx.where(take[..., None], j, best_j)
            best_cost = mx.where(take, cost, best_cost)
            best_p = mx.where(take, 1, best_p)
    return best_j, best_p


def d4_nearest(target: mx.array, bits: int) -> mx.array:
    """Exact nearest k (sum even, in the box) for targets t - 1/2 of shape [..., 4]."""
    half = 2 ** (bits - 1)
    lo, hi = -half, half - 1
    k = mx.clip(mx.round(target), lo, hi)
    odd = (mx.sum(k, axis=-1).astype(mx.int32) % 2) != 0
    coord, sign, _ = _cheapest_move(k, target, 1.0, lo, hi)
    fix = mx.where(odd[..., None] & (mx.arange(4) == coord[..., None]), sign[..., None], 0)
    return k + fix


class LatticeCodec:
    """E8 or D4 box codes at `bits` per coordinate with a seeded Hadamard rotation."""

    def __init__(self, lattice: str = "e8", bits: int = 4, seed: int = 0,
                 step: float | None = None):
        if lattice not in ("e8", "d4") or bits not in RATES:
            raise ValueError(f"unsupported lattice codec {lattice}:{bits} (bits 2..8)")
        self.lattice, self.bits, self.seed = lattice, bits, seed
        self.step = _STEP[(lattice, bits)] if step is None else step
        self.name = f"{lattice}m{bits}"

    @property
    def metadata(self) -> dict:
        return {"codec": self.lattice, "m": self.bits, "seed": self.seed, "scale": "fp16",
                "step": self.step}

    @property
    def kernel_layout(self) -> KernelLayout:
        return KernelLayout(E8 if self.lattice == "e8" else D4, self.bits,
                            {"codes": "codes", "scales": "scale"}, rotation_seed=self.seed,
                            step=self.step)

    def packed_spec(self, head_dim: int, dtype: mx.Dtype):
        if head_dim % 8:
            raise ValueError(f"lattice codecs need head_dim % 8 == 0, got {head_dim}")
        return {"codes": ((head_dim // 8 * self.bits,), mx.uint8), "scale": ((1,), mx.float16)}

    def bytes_per_vector(self, head_dim: int, dtype: mx.Dtype) -> int:
        return head_dim // 8 * self.bits + 2

    # -- encode ----------------------------------------------------------------------------
    def encode(self, x: mx.array) -> dict[str, mx.array]:
        y = rotate(x, self.seed)
        s = _scale(y, self.step)
        t = y / mx.maximum(s.astype(mx.float32), 1e-30)
        t = mx.where(s.astype(mx.float32) > 0, t, 0.0)
        blocks = t.reshape(*t.shape[:-1], -1, 8)
        words = self._e8_words(blocks) if self.lattice == "e8" else self._d4_words(blocks)
        return {"codes": _pack_words(words, self.bits), "scale": s}

    def _e8_words(self, t: mx.array) -> mx.array:
        m, dt = self.bits, word_dtype(self.bits)
        j, p = e8_nearest(2 * t - 0.5, m)
        a = ((j - p[..., None] + 2**m) / 2).astype(dt)
        word = p.astype(dt)
        for i in range(7):
            word = word | (a[..., i] << (1 + m * i))
        return word | ((a[..., 7] >> 1) << (1 + 7 * m))

    def _d4_words(self, t: mx.array) -> mx.array:
        m, dt = self.bits, word_dtype(self.bits)
        k = d4_nearest(t.reshape(*t.shape[:-1], 2, 4) - 0.5, m)
        b = (k + 2 ** (m - 1)).astype(dt)  # [..., 2, 4]
        word = mx.zeros(b.shape[:-2], dtype=dt)
        width = 4 * m - 1
        for half in range(2):
            for i in range(3):
                word = word | (b[..., half, i] << (half * width + m * i))
            word = word | ((b[..., half, 3] >> 1) << (half * width + 3 * m))
        return word

    # -- decode ----------------------------------------------------------------------------
    def decode_rotated(self, packed: dict[str, mx.array]) -> mx.array:
        """The rotated-domain reconstruction u * s [..., D] in float32 (what kernels use)."""
        words = _unpack_words(packed["codes"], self.bits)
        u = self._e8_points(words) if self.lattice == "e8" else self._d4_points(words)
        u = u.reshape(*u.shape[:-2], -1)
        return u * packed["scale"].astype(mx.float32)

    def _e8_points(self, w: mx.array) -> mx.array:
        m, mask = self.bits, 2**self.bits - 1
        p = (w & 1).astype(mx.float32)
        a = [(w >> (1 + m * i)) & mask for i in range(7)]
        parity = sum(a[1:], a[0]) & 1
        a.append((((w >> (1 + 7 * m)) & (mask >> 1)) << 1) | parity)
        a = mx.stack(a, axis=-1).astype(mx.float32)
        return (a - 2 ** (m - 1)) + (2 * p[..., None] + 1) / 4

    def _d4_points(self, w: mx.array) -> mx.array:
        m, mask, width = self.bits, 2**self.bits - 1, 4 * self.bits - 1
        halves = []
        for half in range(2):
            b = [(w >> (half * width + m * i)) & mask for i in range(3)]
            parity = (b[0] + b[1] + b[2]) & 1
            b.append((((w >> (half * width + 3 * m)) & (mask >> 1)) << 1) | parity)
            halves.append(mx.stack(b, axis=-1).astype(mx.float32) - 2 ** (m - 1) + 0.5)
        return mx.concatenate(halves, axis=-1)

    def decode(self, packed: dict[str, mx.array], dtype: mx.Dtype) -> mx.array:
        return unrotate(self.decode_rotated(packed), self.seed).astype(dtype)
