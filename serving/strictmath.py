"""``exp`` exactly as Java's ``StrictMath.exp``, which Spark SQL's ``exp`` calls, for numpy arrays.

Java specifies ``StrictMath.exp`` as the result of fdlibm's ``e_exp.c`` (Sun, 1993), bit for bit
on every platform. numpy's and Python's ``exp`` come from the C library and may differ from it in
the last bit for some inputs, so a JVM-free reader that must equal Spark's ``model.transform``
evaluates fdlibm's algorithm itself. It is written here from the algorithm's description (no
package on PyPI provides fdlibm's exp for numpy); ``tests/test_serving_parity.py`` checks it
against Spark's ``exp`` on a million inputs and on the edge cases.

The algorithm: reduce x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in a high part whose product
with k is exact and a low part), approximate exp(r) by a degree-5 minimax polynomial in r² in
the rational form 1 + r + r·c / (2 - c), then scale by 2^k. Every step below is one IEEE double
operation in fdlibm's order; numpy evaluates each ufunc with one rounding and no fused
multiply-add, as Java's strict floating point does.
"""

from __future__ import annotations

import numpy as np

# fdlibm e_exp.c's constants (their bit patterns in the comments).
_LN2_HI = 6.93147180369123816490e-01  # 0x3fe62e42 fee00000
_LN2_LO = 1.90821492927058770002e-10  # 0x3dea39ef 35793c76
_INV_LN2 = 1.44269504088896338700e00  # 0x3ff71547 652b82fe
_P1 = 1.66666666666666019037e-01  # 0x3FC55555 5555553E
_P2 = -2.77777777770155933842e-03  # 0xBF66C16C 16BEBD93
_P3 = 6.61375632143793436117e-05  # 0x3F11566A AF25DE2C
_P4 = -1.65339022054652515390e-06  # 0xBEBBBD41 C5D26BF1
_P5 = 4.13813679705723846039e-08  # 0x3E663769 72BEA4D0
_OVERFLOW = 7.09782712893383973096e02  # above: +inf
_UNDERFLOW = -7.45133219101941108420e02  # below: 0
_TWO_M1000 = 9.33263618503218878990e-302  # 2^-1000

# Thresholds on the high 32 bits of |x|.
_HALF_LN2_HI = 0x3FD62E42  # |x| > ln2 / 2: reduce
_THREE_HALVES_LN2_HI = 0x3FF0A2B2  # |x| < 1.5 ln2: k = +-1
_TINY_HI = 0x3E300000  # |x| < 2^-28: exp(x) = 1 + x
_BIG_HI = 0x40862E42  # |x| >= 709.78...: check for overflow, underflow, inf, NaN
_INF_HI = 0x7FF00000


def strict_exp(values: np.ndarray | float) -> np.ndarray:
    """e^x for each element, equal bit for bit to ``java.lang.StrictMath.exp``."""
    x = np.asarray(values, dtype=np.float64)
    high = (x.view(np.uint64) >> np.uint64(32)).astype(np.int64)
    negative = (high >> 31) == 1
    abs_high = high & 0x7FFFFFFF

    with np.errstate(all="ignore"):
        # Argument reduction. Between ln2/2 and 1.5 ln2, k = +-1; above, k = trunc(x/ln2 +- 1/2).
        near = (abs_high > _HALF_LN2_HI) & (abs_high < _THREE_HALVES_LN2_HI)
        far = abs_high >= _THREE_HALVES_LN2_HI
        sign = np.where(negative, -1.0, 1.0)
        k_far = np.trunc(_INV_LN2 * x + 0.5 * sign)
        k = np.where(far, k_far, np.where(near, sign, 0.0))
        # near: hi = x - (+-ln2_hi), lo = +-ln2_lo; far: hi = x - k ln2_hi, lo = k ln2_lo.
        hi = np.where(far, x - k_far * _LN2_HI, x - sign * _LN2_HI)
        lo = np.where(far, k_far * _LN2_LO, sign * _LN2_LO)
        reduced = near | far
        r = np.where(reduced, hi - lo, x)

        t = r * r
        c = r - t * (_P1 + t * (_P2 + t * (_P3 + t * (_P4 + t * _P5))))
        y_unreduced = 1.0 - ((r * c) / (c - 2.0) - r)
        y_reduced = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
        k_int = k.astype(np.int32)
        # 2^k y: exact where the result is normal; below, scale by 2^(k+1000) then 2^-1000 (one
        # rounding into the subnormals, as fdlibm does).
        scaled = np.where(
            k_int >= -1021,
            np.ldexp(y_reduced, k_int),
            np.ldexp(y_reduced, k_int + 1000) * _TWO_M1000,
        )
        result = np.where(reduced, scaled, y_unreduced)
        result = np.where(abs_high < _TINY_HI, 1.0 + x, result)

        # Large |x|, infinities and NaN.
        big = abs_high >= _BIG_HI
        result = np.where(big & (x > _OVERFLOW), np.inf, result)
        result = np.where(big & (x < _UNDERFLOW), 0.0, result)
        result = np.where(np.isnan(x), x + x, result)
    return result
