#!/usr/bin/env python3
"""Fits the polynomial and rational coefficients of moekit's vector math
(include/moekit/cpu/detail/vec_math-inl.hpp) and prints them as floats.

Near-minimax relative error by iteratively reweighted least squares (Lawson)
on Chebyshev nodes; the rational fit linearised (Sanathanan-Koerner). A
developer tool, not run by the build or the tests: it needs numpy and mpmath.

    python3 tools/fit_vec_math.py
"""
import math

import mpmath
import numpy as np

mpmath.mp.dps = 30


def nodes(a, b, n):
    k = np.arange(n)
    return np.sort((a + b) / 2 + (b - a) / 2 * np.cos(np.pi * (k + 0.5) / n))


def fit_poly(x, f, powers, iterations=60):
    """c minimising max |sum_j c_j x^powers[j] - f| / |f|."""
    basis = np.stack([x ** p for p in powers], 1)
    weight = np.full_like(x, 1.0 / len(x))
    for _ in range(iterations):
        w = np.sqrt(weight) / np.abs(f)
        c, *_ = np.linalg.lstsq(basis * w[:, None], f * w, rcond=None)
        err = np.abs(basis @ c - f) / np.abs(f)
        weight = weight * err
        weight /= weight.sum()
    return c, err.max()


def fit_rational(x, f, m, n, iterations=40):
    """P (degree m) / D (degree n, D(0) = 1) minimising the max relative error."""
    weight = np.full_like(x, 1.0 / len(x))
    d_old = np.ones_like(x)
    for _ in range(iterations):
        a = np.concatenate([np.stack([x ** k for k in range(m + 1)], 1),
                            -np.stack([f * x ** k for k in range(1, n + 1)], 1)], 1)
        w = np.sqrt(weight) / (np.abs(f) * np.abs(d_old))
        c, *_ = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)
        p, d = c[:m + 1], np.concatenate([[1.0], c[m + 1:]])
        d_old = np.polyval(d[::-1], x)
        err = np.abs(np.polyval(p[::-1], x) / d_old - f) / np.abs(f)
        weight = weight * err
        weight /= weight.sum()
    return p, d, err.max()


def show(name, coefficients, err):
    print(f"{name}: " + ", ".join(f"{np.float32(c):.9e}" for c in coefficients) +
          f"   (max relative error of the fit {err:.2e})")


def main():
    # exp: e^r = 1 + r + r^2 P(r), |r| <= ln2 / 2, P of degree 4 (lowest first).
    h = math.log(2) / 2
    r = nodes(-h, h, 4000)
    show("exp P", *fit_poly(r, (np.expm1(r) - r) / r ** 2, range(5)))

    # log: log(1 + f) = f - f^2/2 + s (f^2/2 + R), s = f / (2 + f),
    # R(z) = z (c0 + c1 z + c2 z^2 + c3 z^3), z = s^2, f in [sqrt(1/2) - 1, sqrt(2) - 1].
    f = nodes(math.sqrt(0.5) - 1, math.sqrt(2) - 1, 4000)
    f = f[np.abs(f) > 1e-3]
    s = f / (2 + f)
    half_f2 = 0.5 * f * f
    big_r = (np.log1p(f) - f + half_f2) / s - half_f2
    show("log R / z", *fit_poly(s * s, big_r / (s * s), range(4)))

    # Phi(x) = 1/2 + x P(x^2) for |x| <= 0.75, P of degree 4 in x^2.
    x = nodes(1e-4, 0.75, 4000)
    phi = np.array([float(mpmath.ncdf(v)) for v in x])
    show("Phi inner P", *fit_poly(x, (phi - 0.5) / x, [0, 2, 4, 6, 8]))

    # Phi(-a) = e^(-a^2/2) Q(a) for a in [0.75, 14.5], Q = P / D of degree 4 / 5.
    a = nodes(0.75, 14.5, 3000)
    q = np.array([float(mpmath.ncdf(-v) * mpmath.exp(v * v / 2)) for v in a])
    p, d, err = fit_rational(a, q, 4, 5)
    show("Phi tail Q numerator", p, err)
    show("Phi tail Q denominator", d, err)


if __name__ == "__main__":
    main()
