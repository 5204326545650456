"""The Triton kernels of :mod:`equikern.triton.cp` (a module of their own: it imports triton)."""

import triton
import triton.language as tl


@triton.jit
def _matrix(z, x2, s2, A, B, C, I, J, K, R, IP: tl.constexpr, JP: tl.constexpr, KP: tl.constexpr,
            RP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """(p2 [RP], M [KP, IP], At [RP, IP], Cm [KP, RP]) of sample z."""
    j = tl.arange(0, JP)
    r = tl.arange(0, RP)
    i = tl.arange(0, IP)
    k = tl.arange(0, KP)
    xv = tl.load(x2 + z * s2 + j, mask=j < J, other=0.0).to(ACC)
    Bm = tl.load(B + j[:, None] * R + r[None, :], mask=(j[:, None] < J) & (r[None, :] < R), other=0.0).to(ACC)
    p2 = tl.sum(Bm * xv[:, None], axis=0)
    Cm = tl.load(C + k[:, None] * R + r[None, :], mask=(k[:, None] < K) & (r[None, :] < R), other=0.0).to(ACC)
    At = tl.load(A + i[None, :] * R + r[:, None], mask=(i[None, :] < I) & (r[:, None] < R), other=0.0).to(ACC)
    M = tl.dot(Cm * p2[None, :], At, input_precision=PREC, out_dtype=ACC)
    return p2, M, At, Cm


@triton.jit
def fwd(x1, x2, A, B, C, w, out, Z, I, J, K, R, Cc, s2, HAS_W: tl.constexpr, ZB: tl.constexpr,
        IP: tl.constexpr, JP: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, BC: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    i = tl.arange(0, IP)
    k = tl.arange(0, KP)
    for t in range(0, ZB):
        z = (tl.program_id(0) * ZB + t).to(tl.int64)
        zv = z < Z
        zc = tl.minimum(z, Z - 1)
        _, M, _, _ = _matrix(zc, x2, s2, A, B, C, I, J, K, R, IP, JP, KP, RP, ACC, PREC)
        X = tl.load(
            x1 + (zc * I + i[:, None]) * Cc + c[None, :],
            mask=(i[:, None] < I) & (c[None, :] < Cc),
            other=0.0,
        )
        O = tl.dot(M, X.to(ACC), input_precision=PREC, out_dtype=ACC)
        if HAS_W:
            O = O * tl.load(w + zc * Cc + c, mask=c < Cc, other=0.0).to(ACC)[None, :]
        tl.store(out + (zc * K + k[:, None]) * Cc + c[None, :], O.to(out.dtype.element_ty),
                 mask=zv & (k[:, None] < K) & (c[None, :] < Cc))  # fmt: skip


@triton.jit
def bwd(g, x1, x2, A, B, C, w, gx1, gx2, gw, gA, gB, gC, Z, I, J, K, R, Cc, s2, HAS_W: tl.constexpr,
        FACTORS: tl.constexpr, ZB: tl.constexpr, IP: tl.constexpr, JP: tl.constexpr, KP: tl.constexpr,
        RP: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    chunk = tl.program_id(1)
    c = chunk * BC + tl.arange(0, BC)
    i = tl.arange(0, IP)
    j = tl.arange(0, JP)
    k = tl.arange(0, KP)
    r = tl.arange(0, RP)
    cm = c < Cc
    sA = tl.zeros([RP, IP], ACC)
    sB = tl.zeros([JP, RP], ACC)
    sC = tl.zeros([KP, RP], ACC)
    for t in range(0, ZB):
        z = (tl.program_id(0) * ZB + t).to(tl.int64)
        zv = z < Z
        zc = tl.minimum(z, Z - 1)
        p2, M, At, Cm = _matrix(zc, x2, s2, A, B, C, I, J, K, R, IP, JP, KP, RP, ACC, PREC)
        G = tl.load(
            g + (zc * K + k[:, None]) * Cc + c[None, :],
            mask=zv & (k[:, None] < K) & cm[None, :],
            other=0.0,
        ).to(ACC)
        X = tl.load(
            x1 + (zc * I + i[:, None]) * Cc + c[None, :],
            mask=zv & (i[:, None] < I) & cm[None, :],
            other=0.0,
        ).to(ACC)
        if HAS_W:
            wv = tl.load(w + zc * Cc + c, mask=zv & cm, other=0.0).to(ACC)
            O = tl.dot(M, X, input_precision=PREC, out_dtype=ACC)
            tl.store(gw + zc * Cc + c, tl.sum(G * O, axis=0).to(gw.dtype.element_ty), mask=zv & cm)
            G = G * wv[None, :]
        gX = tl.dot(tl.trans(M), G, input_precision=PREC, out_dtype=ACC)
        tl.store(gx1 + (zc * I + i[:, None]) * Cc + c[None, :], gX.to(gx1.dtype.element_ty),
                 mask=zv & (i[:, None] < I) & cm[None, :])  # fmt: skip
        T = tl.dot(G, tl.trans(X), input_precision=PREC, out_dtype=ACC)  # [KP, IP]: over the tile's channels
        U = tl.dot(tl.trans(Cm), T, input_precision=PREC, out_dtype=ACC)  # [RP, IP]
        gp2 = tl.sum(U * At, axis=1)  # [RP]
        Bm = tl.load(B + j[:, None] * R + r[None, :], mask=(j[:, None] < J) & (r[None, :] < R), other=0.0).to(
            ACC
        )
        g2 = tl.sum(Bm * gp2[None, :], axis=1)  # [JP]
        tl.store(gx2 + (chunk * Z + zc) * J + j, g2.to(gx2.dtype.element_ty), mask=zv & (j < J))
        if FACTORS:
            xv = tl.load(x2 + zc * s2 + j, mask=zv & (j < J), other=0.0).to(ACC)
            sA += U * p2[:, None]
            sB += xv[:, None] * gp2[None, :]
            TA = tl.dot(T, tl.trans(At), input_precision=PREC, out_dtype=ACC)  # [KP, RP]
            sC += TA * p2[None, :]
    if FACTORS:
        part = tl.program_id(0) * tl.num_programs(1) + chunk
        tl.store(gA + (part * I + i[None, :]) * R + r[:, None], sA.to(gA.dtype.element_ty),
                 mask=(i[None, :] < I) & (r[:, None] < R))  # fmt: skip
        tl.store(gB + (part * J + j[:, None]) * R + r[None, :], sB.to(gB.dtype.element_ty),
                 mask=(j[:, None] < J) & (r[None, :] < R))  # fmt: skip
        tl.store(gC + (part * K + k[:, None]) * R + r[None, :], sC.to(gC.dtype.element_ty),
                 mask=(k[:, None] < K) & (r[None, :] < R))  # fmt: skip
