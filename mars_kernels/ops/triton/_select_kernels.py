"""``@triton.jit`` routines shared by the routing kernels (top-k gating, noisy
gating, MARS routing): the selection keys, the top-k selection and small
elementwise helpers.

Every kernel handles a ``BLOCK_T x BLOCK_E`` tile of a row-major ``[T, E]``
logits tensor per program: ``BLOCK_E`` is the next power of two of ``E`` (lanes
``>= E`` are masked), ``BLOCK_T`` rows per program (rows ``>= T`` masked). Math
runs in ``CDT`` (float32, or float64 for float64 input). Row offsets are formed
in int64.

Selection ("larger first, ties to the lower expert index, NaN as +inf") works on
integer keys that are unique within a row, so one ``tl.max`` per round (or one
``tl.sort``) gives the order with the tie-break built in:

* ``MODE 0`` (float32 values): the value's bits made order-preserving as an
  int32, in the high half of an int64; ``BLOCK_E - 1 - lane`` in the low half.
* ``MODE 1`` / ``MODE 2`` (float16 / bfloat16 logits): the 16-bit pattern made
  order-preserving, times 65536, plus ``BLOCK_E - 1 - lane``: an int32 key
  (needs ``BLOCK_E <= 65536``), half the register and shuffle traffic of int64.
* ``MODE 3`` (float64): the order-preserving int64 of the value bits, not
  unique, so each round takes a second reduction (lowest lane among the maxima).

Before keying, NaN becomes +inf and -0.0 becomes +0.0 (so they tie, as in
``torch.sort``). Padded lanes get the key type's minimum, which no real value
reaches. The selected value is decoded back from the key, which is exact.
"""
import triton
import triton.language as tl

I64_MIN = tl.constexpr(-(2**63))
I32_MIN = tl.constexpr(-(2**31))
INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# --------------------------------------------------------------------------
# small elementwise helpers
# --------------------------------------------------------------------------
@triton.jit
def routed_dot(grad_w_ptr, weights_ptr, rows64, row_ok, K: tl.constexpr, KP: tl.constexpr, CDT: tl.constexpr):
    """s [BLOCK_T] = sum_j grad_weights[t, j] * weights[t, j] over the k routed experts."""
    colk = tl.arange(0, KP)[None, :]
    kmask = row_ok[:, None] & (colk < K)
    koff = rows64[:, None] * K + colk
    g = tl.load(grad_w_ptr + koff, mask=kmask, other=0.0).to(CDT)
    w = tl.load(weights_ptr + koff, mask=kmask, other=0.0).to(CDT)
    return tl.sum(g * w, axis=1)


@triton.jit
def row_tile(T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's tile of BLOCK_T token rows x BLOCK_E expert lanes:
    (pid, rows64 [BLOCK_T] int64, row_ok [BLOCK_T], lane1 [BLOCK_E],
    lane [1, BLOCK_E], lane_ok [1, BLOCK_E], mask [BLOCK_T, BLOCK_E])."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    lane1 = tl.arange(0, BLOCK_E)
    lane = lane1[None, :]
    lane_ok = lane < E
    return pid, rows.to(tl.int64), row_ok, lane1, lane, lane_ok, row_ok[:, None] & lane_ok


@triton.jit
def log1p(y):
    """log(1 + y) for y >= 0, accurate for tiny y (Goldberg's correction)."""
    u = 1.0 + y
    d = u - 1.0
    return tl.where(d == 0.0, y, tl.log(u) * (y / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def softplus(x):
    """softplus(x) = log(1 + exp(x)), torch's form (identity above 20)."""
    return tl.where(x > 20.0, x, log1p(tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def remove(key, hit, MODE: tl.constexpr):
    """key with the lanes in hit set to the pad key (below every real key)."""
    if MODE == 1 or MODE == 2:
        key = tl.where(hit, I32_MIN, key)
    else:
        key = tl.where(hit, I64_MIN, key)
    return key


@triton.jit
def is_pad(key, MODE: tl.constexpr):
    if MODE == 1 or MODE == 2:
        r = key == I32_MIN
    else:
        r = key == I64_MIN
    return r


@triton.jit
def make_keys(x, lane, lane_ok, BLOCK_E: tl.constexpr, MODE: tl.constexpr):
    """Selection keys [BLOCK_T, BLOCK_E] of the values x (float32, float64 in MODE 3).

    Larger key = ranks first; unique per row in MODEs 0-2; padded lanes get
    the key type's minimum.
    """
    x = tl.where(x != x, float("inf"), x)  # NaN ranks as +inf
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0
    if MODE == 0:
        bits = x.to(tl.int32, bitcast=True)
        o = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = o.to(tl.int64) * 4294967296 + (BLOCK_E - 1 - lane).to(tl.int64)
        key = tl.where(lane_ok, key, I64_MIN)
    elif MODE == 1:
        # exact: x came from float16
        b = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        o = tl.where(b >= 0, b, b ^ 0x7FFF)
        key = o * 65536 + (BLOCK_E - 1 - lane)
        key = tl.where(lane_ok, key, I32_MIN)
    elif MODE == 2:
        # x came from bfloat16: its float32 bits' high half is the bf16 pattern
        b = x.to(tl.int32, bitcast=True) >> 16
        o = tl.where(b >= 0, b, b ^ 0x7FFF)
        key = o * 65536 + (BLOCK_E - 1 - lane)
        key = tl.where(lane_ok, key, I32_MIN)
    else:
        bits = x.to(tl.int64, bitcast=True)
        o = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)
        key = tl.where(lane_ok, o, I64_MIN)
    return key


@triton.jit
def decode_value(key, MODE: tl.constexpr):
    """The (canonical) value a key was built from, float32 (float64 in MODE 3)."""
    if MODE == 0:
        hi = (key >> 32).to(tl.int32)
        bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
        val = bits.to(tl.float32, bitcast=True)
    elif MODE == 1:
        hi = key >> 16
        b = tl.where(hi >= 0, hi, hi ^ 0x7FFF)
        val = b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    elif MODE == 2:
        hi = key >> 16
        b = tl.where(hi >= 0, hi, hi ^ 0x7FFF)
        val = (b * 65536).to(tl.float32, bitcast=True)
    else:
        bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFFFFFFFFFF)
        val = bits.to(tl.float64, bitcast=True)
    return val


@triton.jit
def decode_index(key, BLOCK_E: tl.constexpr, MODE: tl.constexpr):
    """The expert index (int32) stored in a key's low bits (MODEs 0-2)."""
    if MODE == 0:
        low = (key - (key >> 32) * 4294967296).to(tl.int32)
    else:
        low = key & 0xFFFF
    return BLOCK_E - 1 - low


@triton.jit
def column(tile, col, j):
    """tile[:, j] of a [BLOCK_T, KP] tile (a masked row reduction)."""
    return tl.sum(tl.where(col == j, tile, 0), axis=1)


@triton.jit
def select(
    key,
    lane,
    lane_ok,
    M: tl.constexpr,
    K_CHOSEN: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    MODE: tl.constexpr,
    USE_SORT: tl.constexpr,
):
    """The M best entries of each row, in order.

    key [BLOCK_T, BLOCK_E] from :func:`make_keys`; lane [1, BLOCK_E].
    Returns sel_idx [BLOCK_T, KP] int32, sel_val [BLOCK_T, KP] (columns >= M
    are junk), and chosen [BLOCK_T, BLOCK_E]: lane is among the first K_CHOSEN
    (K_CHOSEN == M or M - 1). USE_SORT (MODEs 0-2 only) sorts the whole row
    (KP must be BLOCK_E); otherwise M rounds of a row max.
    """
    col = tl.arange(0, KP)[None, :]
    if USE_SORT:
        skey = tl.sort(key, dim=1, descending=True)
        sel_idx = decode_index(skey, BLOCK_E, MODE)
        sel_val = decode_value(skey, MODE)
        kth = column(skey, col, K_CHOSEN - 1)  # keys are unique: ">= kth" is the top K_CHOSEN
        chosen = (key >= kth[:, None]) & lane_ok
    else:
        sel_idx = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
        last = tl.zeros([BLOCK_T], dtype=tl.int32)
        if MODE == 3:
            # keys may tie: the second reduction picks the lowest lane among the maxima
            sel_val = tl.zeros([BLOCK_T, KP], dtype=tl.float64)
            for j in range(M):
                m = tl.max(key, axis=1)
                i = tl.min(tl.where(key == m[:, None], lane, BLOCK_E), axis=1)
                key = tl.where(lane == i[:, None], I64_MIN, key)
                sel_idx = tl.where(col == j, i[:, None], sel_idx)
                sel_val = tl.where(col == j, decode_value(m, MODE)[:, None], sel_val)
                last = i
        else:
            sel_val = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
            for j in tl.static_range(M):
                m = tl.max(key, axis=1)
                i = decode_index(m, BLOCK_E, MODE)
                key = remove(key, key == m[:, None], MODE)
                sel_idx = tl.where(col == j, i[:, None], sel_idx)
                sel_val = tl.where(col == j, decode_value(m, MODE)[:, None], sel_val)
                last = i
        # every taken lane now holds the pad key; drop the M-th if it is extra
        chosen = is_pad(key, MODE) & lane_ok
        if K_CHOSEN < M:
            chosen = chosen & (lane != last[:, None])
    return sel_idx, sel_val, chosen
