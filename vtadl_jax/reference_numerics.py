"""Float64 NumPy/SciPy re-derivations of every kernel and metric, for ``vtadl-jax selftest``.

Each function restates its quantity from the defining formula (direct loops, dense
matrices, SciPy distributions) and imports nothing of vtadl_jax, so a disagreement
points at the kernel (or the backend running it), never at shared code.
Sources: SSIM, Wang et al. 2004; mixture density networks, Bishop 1994; pairwise
variance updates, Chan, Golub & LeVeque 1979; capsules, Sabour et al. 2017 (eq. 1, 2,
Procedure 1); AUPRO, Bergmann et al. 2019/2021; resizing as torch.nn.functional.interpolate.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, special, stats


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


# ------------------------------------------------------------------------ image kernels
def ssim(x, y, *, max_val: float, filter_size: int = 11, sigma: float = 1.5,
         padding: str = "same") -> np.ndarray:
    """(N,) mean SSIM; windowed moments by 2-D correlation with the normalised Gaussian
    window (zero border for "same", fully inside windows for "valid")."""
    x, y = _f64(x, y)
    r = filter_size // 2
    g = np.exp(-0.5 * ((np.arange(filter_size) - r) / sigma) ** 2)
    window = np.outer(g, g) / np.outer(g, g).sum()

    def local_mean(img):  # img (H, W)
        out = ndimage.correlate(img, window, mode="constant", cval=0.0)
        return out if padding == "same" else out[r:img.shape[0] - r, r:img.shape[1] - r]

    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    result = []
    for a, b in zip(x, y):
        maps = []
        for ch in range(a.shape[-1]):
            u, v = a[..., ch], b[..., ch]
            mu_u, mu_v = local_mean(u), local_mean(v)
            var_u = local_mean(u * u) - mu_u ** 2
            var_v = local_mean(v * v) - mu_v ** 2
            cov = local_mean(u * v) - mu_u * mu_v
            maps.append((2 * mu_u * mu_v + c1) * (2 * cov + c2)
                        / ((mu_u ** 2 + mu_v ** 2 + c1) * (var_u + var_v + c2)))
        result.append(np.mean(maps))
    return np.asarray(result)


def gaussian_blur(maps, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter (reflect border) on every (H, W) map."""
    (maps,) = _f64(maps)
    flat = maps.reshape(-1, *maps.shape[-2:])
    out = [ndimage.gaussian_filter(m, sigma, truncate=truncate, mode="reflect") for m in flat]
    return np.asarray(out).reshape(maps.shape)


def resize_bilinear(x, size, align_corners: bool = False) -> np.ndarray:
    """Bilinear resize of (N, H, W[, C]) by PyTorch's source-coordinate rule, pixel by pixel."""
    (x,) = _f64(x)

    def table(n_in, n_out):
        rows = []
        for j in range(n_out):
            if align_corners:
                src = j * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            else:
                src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            lam = min(max(src - i0, 0.0), 1.0)
            rows.append((i0, i1, lam))
        return rows

    out = np.zeros((x.shape[0], size[0], size[1]) + x.shape[3:])
    for i, (a0, a1, la) in enumerate(table(x.shape[1], size[0])):
        for j, (b0, b1, lb) in enumerate(table(x.shape[2], size[1])):
            out[:, i, j] = ((1 - la) * (1 - lb) * x[:, a0, b0] + (1 - la) * lb * x[:, a0, b1]
                            + la * (1 - lb) * x[:, a1, b0] + la * lb * x[:, a1, b1])
    return out


def resize_nearest(x, size) -> np.ndarray:
    """Nearest resize, source index floor(j * n_in / n_out) in exact integer arithmetic."""
    (x,) = _f64(x)
    rows = [i * x.shape[1] // size[0] for i in range(size[0])]
    cols = [j * x.shape[2] // size[1] for j in range(size[1])]
    return x[:, rows][:, :, cols]


# ----------------------------------------------------------------------- mixtures
def mixture_nll(z, logits, means, scales) -> np.ndarray:
    """-log sum_k softmax(logits)_k prod_d N(z_d; mu_kd, s_kd^2), z (..., D), means (..., K, D)."""
    z, logits, means, scales = _f64(z, logits, means, scales)
    log_w = logits - special.logsumexp(logits, axis=-1, keepdims=True)
    log_n = stats.norm.logpdf(z[..., None, :], means, scales).sum(-1)
    return -special.logsumexp(log_w + log_n, axis=-1)


def mixture_nll_full_cov(z, logits, means, chol) -> np.ndarray:
    """Full-covariance mixture NLL with Sigma_k = L_k L_k^T, point by point with SciPy."""
    z, logits, means, chol = _f64(z, logits, means, chol)
    z2, lg, mu = z.reshape(-1, z.shape[-1]), logits.reshape(-1, logits.shape[-1]), \
        means.reshape(-1, *means.shape[-2:])
    ch = np.tril(chol).reshape(-1, *chol.shape[-3:])
    out = []
    for i in range(len(z2)):
        log_w = lg[i] - special.logsumexp(lg[i])
        terms = [log_w[k] + stats.multivariate_normal.logpdf(z2[i], mu[i, k],
                                                             ch[i, k] @ ch[i, k].T)
                 for k in range(lg.shape[-1])]
        out.append(-special.logsumexp(terms))
    return np.asarray(out).reshape(z.shape[:-1])


def vtadl_code_mdn_loss(z, logits, means, log_var) -> np.ndarray:
    """The VT-ADL code's density loss per patch, v a log-variance:
    sum_k w_k 0.5 (log 2 pi + sum_d [v_kd + (z_d - mu_kd)^2 / exp(v_kd)])."""
    z, logits, means, log_var = _f64(z, logits, means, log_var)
    w = np.exp(logits - special.logsumexp(logits, axis=-1, keepdims=True))
    sq = (z[..., None, :] - means) ** 2
    per = 0.5 * (np.log(2 * np.pi) + np.sum(log_var + sq / np.exp(log_var), axis=-1))
    return np.sum(w * per, axis=-1)


# ---------------------------------------------------------------- patch Gaussians
def gaussian_fit(feats, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(P, C) means and (P, C, C) unbiased covariances + eps I of feats (N, P, C), np.cov."""
    (x,) = _f64(feats)
    cov = np.stack([np.cov(x[:, p], rowvar=False, ddof=1) for p in range(x.shape[1])])
    return x.mean(0), cov + eps * np.eye(x.shape[2])


def centred_sums(feats) -> np.ndarray:
    """(P, C, C) sum_i (x_i - mean)(x_i - mean)^T of feats (N, P, C)."""
    (x,) = _f64(feats)
    d = x - x.mean(0)
    return np.stack([d[:, p].T @ d[:, p] for p in range(x.shape[1])])


def cholesky(cov) -> np.ndarray:
    return np.linalg.cholesky(np.asarray(cov, np.float64))


def mahalanobis(feats, mean, cov) -> np.ndarray:
    """(B, P) sqrt(d^T Sigma^-1 d) with a dense solve per position."""
    x, mean, cov = _f64(feats, mean, cov)
    out = np.zeros(x.shape[:2])
    for p in range(x.shape[1]):
        d = x[:, p] - mean[p]
        out[:, p] = np.sqrt(np.einsum("bc,bc->b", d, np.linalg.solve(cov[p], d.T).T))
    return out


# ---------------------------------------------------------------------- capsules
def squash(s, eps: float = 1e-8) -> np.ndarray:
    """|s|^2 / (1 + |s|^2) * s / |s| over the last axis (Sabour et al. 2017, eq. 1), with
    |s| = sqrt(|s|^2 + eps) in the division (the kernel's guard at s = 0; eps=0: eq. 1)."""
    (s,) = _f64(s)
    sq = np.sum(s * s, axis=-1, keepdims=True)
    return sq / (1 + sq) * s / np.sqrt(sq + eps)


def dynamic_routing(u, w, iterations: int, eps: float = 1e-8) -> np.ndarray:
    """Votes u_hat_{j|i} = W_ij u_i, then Procedure 1 with loops over i and j: (B, n_out, d)."""
    u, w = _f64(u, w)
    bsz, n_in, n_out = u.shape[0], w.shape[0], w.shape[1]
    out = np.zeros((bsz, n_out, w.shape[2]))
    for b in range(bsz):
        votes = np.array([[w[i, j] @ u[b, i] for j in range(n_out)] for i in range(n_in)])
        logit = np.zeros((n_in, n_out))
        for it in range(iterations):
            c = np.exp(logit) / np.exp(logit).sum(1, keepdims=True)
            v = squash(np.array([sum(c[i, j] * votes[i, j] for i in range(n_in))
                                 for j in range(n_out)]), eps)
            if it < iterations - 1:
                logit = logit + np.einsum("ijd,jd->ij", votes, v)
        out[b] = v
    return out


def single_capsule_sum(u, w) -> np.ndarray:
    """s[b] = sum_i W_i u[b, i] for W (n_in, d_out, d_in), u (B, n_in, d_in): a loop over i."""
    u, w = _f64(u, w)
    out = np.zeros((u.shape[0], w.shape[1]))
    for b in range(u.shape[0]):
        for i in range(w.shape[0]):
            out[b] += w[i] @ u[b, i]
    return out


def single_capsule_sum_vjp(u, w, g) -> tuple[np.ndarray, np.ndarray]:
    """(du, dW) of sum(g * single_capsule_sum(u, W)): du[b, i] = W_i^T g[b],
    dW_i = sum_b g[b] u[b, i]^T (loops over b and i)."""
    u, w, g = _f64(u, w, g)
    du, dw = np.zeros_like(u), np.zeros_like(w)
    for b in range(u.shape[0]):
        for i in range(w.shape[0]):
            du[b, i] = w[i].T @ g[b]
            dw[i] += np.outer(g[b], u[b, i])
    return du, dw


# ----------------------------------------------------------------------- metrics
def auroc(scores, labels) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), over every (positive, negative) pair."""
    s, y = np.ravel(scores).astype(np.float64), np.ravel(labels).astype(bool)
    pos, neg = s[y][:, None], s[~y][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def average_precision(scores, labels) -> float:
    """sum over distinct thresholds t (descending) of (R(t) - R(t_prev)) P(t)."""
    s, y = np.ravel(scores).astype(np.float64), np.ravel(labels).astype(bool)
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        pred = s >= t
        recall = np.sum(pred & y) / np.sum(y)
        ap += (recall - prev_recall) * np.sum(pred & y) / np.sum(pred)
        prev_recall = recall
    return float(ap)


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under PRO(FPR) up to fpr_limit, one threshold per distinct score;
    regions: 8-connected components of each mask (scipy.ndimage.label)."""
    maps, masks = np.asarray(maps, np.float64), np.asarray(masks).astype(bool)
    regions = [(img, region) for img, m in enumerate(masks)
               for region in _components(m)]
    fpr, pro = [0.0], [0.0]
    normal = ~masks
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr.append(np.sum(pred & normal) / np.sum(normal))
        pro.append(np.mean([np.sum(pred[img] & r) / np.sum(r) for img, r in regions]))
    fpr, pro = np.asarray(fpr), np.asarray(pro)
    keep = fpr <= fpr_limit
    x, y = list(fpr[keep]), list(pro[keep])
    k = int(np.sum(keep))
    if k < len(fpr):  # interpolate the segment crossing fpr_limit
        x.append(fpr_limit)
        y.append(pro[k - 1] + (pro[k] - pro[k - 1]) * (fpr_limit - fpr[k - 1])
                 / (fpr[k] - fpr[k - 1]))
    return float(np.trapezoid(y, x) / fpr_limit)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    return [lab == r + 1 for r in range(n)]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else tuple(int(u) for u in v)


def conv_transpose(x, w, stride, padding, output_padding=0):
    """PyTorch ConvTranspose2d (no bias, NHWC) by its scatter definition
    y[i s + a - p] += x[i] w[a]; w (kh, kw, Cin, Cout); stride, padding and output
    padding ints or (h, w) pairs."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (sh, sw), (ph, pw), (qh, qw) = _pair(stride), _pair(padding), _pair(output_padding)
    b, h, wd, _ = x.shape
    kh, kw, _, co = w.shape
    oh, ow = (h - 1) * sh - 2 * ph + kh + qh, (wd - 1) * sw - 2 * pw + kw + qw
    full = np.zeros((b, (h - 1) * sh + kh + qh, (wd - 1) * sw + kw + qw, co))
    for a in range(kh):
        for c in range(kw):
            full[:, a:a + (h - 1) * sh + 1:sh, c:c + (wd - 1) * sw + 1:sw] += x @ w[a, c]
    return full[:, ph:ph + oh, pw:pw + ow]


def conv_transpose_vjp(x, w, g, stride, padding):
    """(dx, dw) of sum(g * conv_transpose(x, w)) from the definition (its adjoint); g may
    carry output padding (its extra rows/columns read taps past the input's end)."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    _, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    gfull = np.zeros((g.shape[0], (h - 1) * sh + kh + sh, (wd - 1) * sw + kw + sw, g.shape[3]))
    gfull[:, ph:ph + g.shape[1], pw:pw + g.shape[2]] = g
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for a in range(kh):
        for c in range(kw):
            ga = gfull[:, a:a + (h - 1) * sh + 1:sh, c:c + (wd - 1) * sw + 1:sw]
            dx += ga @ w[a, c].T
            dw[a, c] = np.einsum("bhwi,bhwo->io", x, ga)
    return dx, dw


def separable_blur_matrix(n: int, taps, padding: str) -> np.ndarray:
    """The 1-D correlation with ``taps`` ("same": zero padding f // 2; "valid": none) as a
    dense (n_out, n) matrix; a separable 2-D blur is M_h z M_w^T, its adjoint M_h^T g M_w."""
    taps = np.asarray(taps, np.float64)
    f = taps.shape[0]
    r = f // 2 if padding == "same" else 0
    n_out = n + 2 * r - f + 1
    m = np.zeros((n_out, n))
    for i in range(n_out):
        for k in range(f):
            j = i + k - r
            if 0 <= j < n:
                m[i, j] += taps[k]
    return m
