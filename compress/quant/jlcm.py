"""JLCM: jointly learnable codebooks and mappings (Yvinec et al., ICLR 2024), as read in METHODS.md.

The paper's code is not public; what follows is our reading [open], step by step:
1. Rows (neurons; conv: c_out rows of c_in/g*kh*kw) are sorted by a statistic of their weights (std, or a
   robust range) and cut into G contiguous groups of equal size; each group gets its own codebook of
   K = 2^b entries ("per-group-codebook"), or all share one codebook times a per-group scale
   ("shared-codebook-scale"). No per-weight codebook id: the row's group is implied by its rank, stored as
   a packed group id per row (default, ceil(log2 G) bits a row) or as the row order (see formats.py).
2. Init: weighted 1-D k-means per group (weights: the input second moment E[x_j^2] of each weight's
   column, i.e. its share of the output error), sorted; index = nearest entry.
3. Joint learning on the layer's calibration statistics (stats.py), minimising the output
   reconstruction error: codebooks get exact gradients (Adam, in units of the group's weight std); the
   mapping moves by a proximal straight-through rule: each weight keeps a running average (EMA, reset
   after a move) of the gradient of the loss w.r.t. its dequantized value, and may move only to a
   neighbouring codeword (index +-1) when the first-order gain of that average over the gap beats the
   curvature cost of the jump, -a * d > threshold * h * d^2 / 2 (h = 2 H_jj / energy, d = signed gap): the
   score is the gradient weighted by a decreasing function of the codeword distance, and the loss can
   only fall for an isolated move. `mapping="ste"` is the plain straight-through ablation (latent
   weights, nearest codeword, jumps of any size) and `mapping="frozen"` learns codebooks only.
4. Finally (per-group codebooks) the codebooks are refitted in closed form for the final mapping (least
   squares, K x K per group) when that lowers the loss, and the best state seen is kept.
Not in the paper: activation-aware column scales (`column_scale` = alpha > 0; AWQ's idea, Lin et al. 2024, on
codebooks). Steps 1-4 run on W * s with the moments of x / s (the same loss), s_j = rms(x_j)^alpha (geometric
mean 1), and the artifact stores 1 / s per column (float16), so each column reads its codebook at its own scale:
columns with large inputs get finer steps. It spends 16 bits a column. By default only fully connected layers
(2-D weights) take them (`column_scale_layers`): on MobileNetV2's convs they cost more agreement than they gave
(docs/BENCHMARKS.md, session 18).
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from pydantic import Field

from compress.quant.baselines import column_weights, encode_8bit
from compress.format.weights import encode_codebook, matrix_shape
from compress.quant.kmeans import kmeans_1d_widths
from compress.quant.registry import Encoded, QuantConfig, register_method
from compress.quant.stats import LayerStats

__all__ = ["JLCMConfig", "activation_column_scales", "row_statistic", "group_rows", "nearest_rows", "proximal_step",
           "jlcm_learn", "refit_codebooks", "quantize_jlcm"]


class JLCMConfig(QuantConfig):
    """JLCM options (see compress.quant.jlcm for the method as implemented)."""

    allocation: Literal["uniform", "mixed"] = Field("mixed", description="same bits for every layer, or per-layer "
                                                    "bits from a measured sensitivity to meet the target average")
    # defaults chosen on a real ImageNet MobileNetV2 (docs/BENCHMARKS.md, "Real pretrained model"): folding BN
    # and the float choice protect the depthwise convs that even 8 bits perturb; KL ranks layers by what
    # changes a classifier's answers
    fold_bn: bool = Field(True, description="fold each BatchNorm that follows a conv into the conv's weight before "
                          "quantizing (the BN stays, as a per-channel bias), so errors are measured after the BN")
    float_choice: bool = Field(True, description="mixed: a layer may also stay in float (charged 32 bits a weight, "
                               "twice what the artifact stores) when that is the best use of the bits")
    coded_indices: bool = Field(True, description="mixed: charge each layer's indices the entropy-coded size the "
                                "artifact stores them at instead of their fixed width (docs/BENCHMARKS.md, session 16: "
                                "MobileNetV2 at 4 bits keeps more answers on every calibration seed)")
    sensitivity_metric: Literal["mse", "kl"] = Field("kl", description="mixed: the output error a layer's sensitivity "
                                                     "is measured by: relative squared error, or KL of the softmax "
                                                     "for 2-D outputs (classifiers' logits)")
    groups: int = Field(8, ge=1, le=256, description="G: neuron groups per layer, one codebook each (clamped to the rows)")
    variant: Literal["per-group-codebook", "shared-codebook-scale"] = "per-group-codebook"
    statistic: Literal["std", "range"] = Field("std", description="row statistic the rows are sorted by: std or "
                                               "the 1-99 % quantile range")
    row_map: Literal["group-ids", "order"] = Field("group-ids", description="how the row -> group map is stored: "
                                                   "packed group ids (ceil(log2 G) bits a row) or the row order")
    init_weighting: Literal["hessian", "none"] = Field("hessian", description="k-means init weighted by each "
                                                       "column's input second moment, or plain")
    calib_steps: int = Field(200, ge=0, description="joint learning steps per layer (0: k-means init only)")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate of codebook entries, in units of the group's weight std")
    mapping: Literal["proximal", "ste", "frozen"] = Field("proximal", description="proximal neighbour moves; "
                                                          "plain straight-through (ablation); frozen (codebooks only)")
    momentum: float = Field(0.9, ge=0, lt=1, description="EMA factor of the mapping gradient")
    move_threshold: float = Field(1.0, gt=0, description="a move needs gain > threshold * curvature cost")
    max_move_fraction: float = Field(0.05, gt=0, le=1, description="at most this share of the weights move in "
                                     "one step (those of largest predicted gain)")
    converge_steps: int = Field(0, ge=0, description="stop a layer's learning once its best loss improved by "
                                "less than converge_tol (relative) over this many steps (0: always calib_steps)")
    converge_tol: float = Field(1e-3, ge=0, description="relative improvement that counts as not converged yet")
    refit: bool = Field(True, description="refit per-group codebooks in closed form for the final mapping")
    scale_underdetermined_steps: bool = Field(False, description="a layer with fewer calibration rows than inputs "
                                              "learns for calib_steps x rows / inputs steps (its fit cannot pin "
                                              "the weights down: longer learning fits the calibration noise)")
    damp: float = Field(0.01, ge=0, description="ridge toward the float weights: lambda = damp * mean diag of the "
                        "input second moment (guards against few calibration samples)")
    column_scale: float = Field(0.0, ge=0, le=1, description="activation-aware column scales (AWQ's idea on codebooks): "
                                "quantize W * s with s_j = rms(x_j)^column_scale and store 1/s per column (16 bits a "
                                "column), so columns with large inputs get finer codebook steps; 0: off")
    column_scale_layers: Literal["linear", "all"] = Field(
        "linear", description="which layers get column scales: fully connected ones (2-D weights: linear, attention "
                              "projections), or every layer with input statistics, convs included")

    init_points: int = Field(256, ge=8, description="k-means init: exact on an equal-count summary of this many "
                             "points per group, then Lloyd steps on all values")

    def needs_stats(self) -> bool:
        return self.calib_steps > 0 or self.init_weighting == "hessian"

    def quick(self) -> JLCMConfig:
        return self.model_copy(update={"calib_steps": 0, "init_points": 64})


def row_statistic(w: torch.Tensor, kind: str = "std") -> torch.Tensor:
    """Statistic of each row of w [R, C] that rows are grouped by: std, or the 1-99 % quantile range."""
    if kind == "std":
        return w.std(dim=1, unbiased=False)
    if kind == "range":
        q = torch.quantile(w.float(), torch.tensor([0.01, 0.99], device=w.device), dim=1)
        return q[1] - q[0]
    raise ValueError(f"unknown row statistic '{kind}' (known: std, range)")


def group_rows(stat: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group of each row [R], order [R]): rows sorted by `stat`, position p of the order in group floor(p*G/R)."""
    rows = stat.numel()
    order = torch.argsort(stat, stable=True)
    position_group = torch.div(torch.arange(rows, device=stat.device) * groups, rows, rounding_mode="floor")
    out = torch.empty(rows, dtype=torch.long, device=stat.device)
    out[order] = position_group
    return out, order


def nearest_rows(values: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's sorted table: values [R, C], tables [R, K] -> int64 [R, C]."""
    mids = (tables[:, 1:] + tables[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), values.contiguous())


def _neighbour_moves(idx: torch.Tensor, score: torch.Tensor, tables: torch.Tensor, cost: torch.Tensor,
                     current: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target index, signed gap to its codeword, predicted gain) of the one neighbour move each weight may take.

    With cost = threshold * curvature / 2 >= 0, a move by the gap d gains -score * d - cost * d^2, which can
    only be positive when d has the sign of -score: so each weight has one candidate, the next codeword up
    where its score is negative and the previous one where it is positive (gain -inf past the table's ends).
    """
    k = tables.shape[1]
    step = 1 - 2 * (score >= 0).to(idx.dtype)  # +1 where the score is negative, else -1
    target = idx + step
    inside = (target >= 0) & (target < k)
    target.clamp_(0, k - 1)
    cur = torch.gather(tables, 1, idx) if current is None else current
    gap = torch.gather(tables, 1, target).sub_(cur)  # 0 where the move would leave the table
    gain = (cost * gap).add_(score).mul_(gap).neg_()
    gain.masked_fill_(~inside, float("-inf"))
    return target, gap, gain


def proximal_step(idx: torch.Tensor, score: torch.Tensor, tables: torch.Tensor, curvature: torch.Tensor,
                  threshold: float = 1.0, max_moves: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One proximal mapping update: each index moves by at most one codeword, toward a lower loss.

    idx [R, C] int64; score [R, C] (running gradient of the loss w.r.t. the dequantized weight); tables
    [R, K] the sorted codebook of each row; curvature [R, C] (second derivative of the loss w.r.t. each
    weight). A move by the gap d to the next (d > 0) or previous (d < 0) codeword is taken when its
    predicted gain -score * d - threshold * curvature * d^2 / 2 is positive (only the side against the
    score can gain); at most `max_moves` moves, those of largest gain. Returns (new idx, moved mask).
    """
    target, _, gain = _neighbour_moves(idx, score, tables, 0.5 * threshold * curvature)
    moved = _cap_moves(gain, max_moves)
    return torch.where(moved, target, idx), moved


def _cap_moves(gain: torch.Tensor, max_moves: int | None) -> torch.Tensor:
    """Moves of positive gain; at most `max_moves` of them, those of largest gain."""
    moved = gain > 0
    if max_moves is None or max_moves >= gain.numel():
        return moved
    if gain.device.type != "cpu":
        # no host read of the count: the cut is the max_moves-th largest gain, which keeps every positive gain when
        # fewer are positive (the same moves as below; on the CPU the count is cheaper than a top-k every step)
        cut = torch.topk(gain.reshape(-1), max_moves, sorted=False).values.min()
        return moved & (gain >= cut)
    if int(moved.sum()) > max_moves:
        cut = torch.topk(gain.reshape(-1), max_moves, sorted=False).values.min()
        moved &= gain >= cut
    return moved


def _solve_codebooks(q: torch.Tensor, b: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Solve Q_g c_g = b_g per group with a small ridge toward the current entries (unused entries stay)."""
    k = q.shape[1]
    ridge = 1e-6 * torch.diagonal(q, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)  # [G]
    eye = torch.eye(k, dtype=torch.float64, device=q.device)
    return torch.linalg.solve(q + ridge[:, None, None] * eye, b + ridge[:, None] * tables.double()).float()


def refit_codebooks(w: torch.Tensor, idx: torch.Tensor, row_group: torch.Tensor, tables: torch.Tensor,
                    stats: LayerStats, target: torch.Tensor | None = None, max_elements: int = 1 << 24) -> torch.Tensor:
    """Least-squares codebooks [G, K] for the fixed mapping idx [R, C] (rows in groups `row_group`).

    With w^_r = Y_r c_g (Y_r the one-hot [C, K] of row r's indices) the loss is quadratic in c_g:
    Q_g c_g = b_g with Q_g = sum_r Y_r^T H Y_r and b_g = sum_r Y_r^T P_r (rows r of group g; P_r = M w_r,
    or `target` [R, C] when given).
    """
    rows, cols = w.shape
    groups, k = tables.shape
    g_in = stats.H.shape[0]
    in_group = torch.arange(rows, device=w.device) // (rows // g_in)
    if target is None:
        target = stats.target(w)
    q = torch.zeros(groups, k, k, dtype=torch.float64, device=w.device)
    chunk = max(1, max_elements // (cols * max(cols if g_in > 1 else 1, k)))
    for start in range(0, rows, chunk):
        sl = slice(start, start + chunk)
        y = torch.nn.functional.one_hot(idx[sl], k).to(w.dtype)  # [n, C, K]
        h = stats.H[0] if g_in == 1 else stats.H[in_group[sl]]
        q.index_add_(0, row_group[sl], torch.matmul(y.transpose(1, 2), torch.matmul(h, y)).double())
    b = torch.zeros(groups * k, dtype=torch.float64, device=w.device).index_add_(
        0, (row_group[:, None] * k + idx).reshape(-1), target.reshape(-1).double()).view(groups, k)
    return _solve_codebooks(q, b, tables)


def _basis(idx: torch.Tensor, h: torch.Tensor, k: int) -> torch.Tensor:
    """B [K, R, C] with B[k, r] = the sum of the rows H[j] over the columns j where idx[r, j] == k.

    Then W^ H = sum_k table[r, k] * B[k, r] for any codebook values: a learning step costs K R C instead of
    R C^2, and a moved index updates two rows of B (cost C).
    """
    g_in, cols = h.shape[0], h.shape[1]
    rows = idx.shape[0]
    out = torch.empty(k, rows, cols, dtype=h.dtype, device=h.device)
    for entry in range(k):
        onehot = (idx == entry).to(h.dtype).reshape(g_in, rows // g_in, cols)
        out[entry] = torch.bmm(onehot, h).reshape(rows, cols)
    return out


def _rows_times_h(keys: torch.Tensor, cols: torch.Tensor, coef: torch.Tensor, h: torch.Tensor,
                  out_rows: int, presorted: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """sum_e coef[e] * h[cols[e]] grouped by keys[e]: one sparse (CSR) x dense product, whose cost is
    entries x C (a gather of rows of H and an index_add cost the same twice over, with a copy of every row).
    Returns the dense [out_rows, C] result when out_rows is given, else (the touched keys [U], their rows [U, C]).
    presorted: the keys are known to be in order (e.g. rows from a row-major nonzero), so none is sorted."""
    if not presorted:
        order = torch.argsort(keys, stable=True)
        keys, cols, coef = keys[order], cols[order], coef[order]
    if out_rows:
        uniq = None
        counts = torch.bincount(keys, minlength=out_rows)
    else:
        uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=h.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        sparse = torch.sparse_csr_tensor(crow, cols.to(torch.int64), coef.to(h.dtype), size=(counts.numel(), h.shape[0]),
                                         check_invariants=False)
        product = sparse @ h
    return product if uniq is None else (uniq, product)


class _JointLearner:
    """State of one layer's joint learning: codebook parameters (Adam), mapping, EMA scores, and the cached
    products W^ H (z) and basis B that make a step cheap. Loss L = (sum_r w^_r H w^_r - 2 w^_r P_r + E) / E
    with P = W M^T and E = sum_r w_r F w_r (stats.py), so g = dL/dW^ = 2 (z - P) / E exactly."""

    def __init__(self, w: torch.Tensor, stats: LayerStats, idx: torch.Tensor, row_group: torch.Tensor,
                 tables: torch.Tensor, unit: torch.Tensor, config: JLCMConfig, shared: bool, max_basis: int) -> None:
        self.w, self.config, self.shared = w, config, shared
        self.rows, self.cols = w.shape
        self.k = tables.shape[1]
        self.h = stats.H
        self.g_in = stats.H.shape[0]
        self.h_stacked = self.h.reshape(self.g_in * self.h.shape[1], self.h.shape[2])  # [g C, C]
        self.per_in = self.rows // self.g_in
        self.in_group = torch.arange(self.rows, device=w.device) // self.per_in
        self.idx, self.row_group, self.unit = idx, row_group, unit
        self.unit_rows = unit[row_group][:, None]
        if shared:  # one codebook (in units of each group's std) and a learned scale per group
            self.theta, self.scale = tables.reshape(1, self.k).clone(), torch.ones_like(unit)
            params = [self.theta, self.scale]
        else:  # per-group codebooks, each in units of its group's std
            self.theta, self.scale = (tables / unit[:, None]).clone(), None
            params = [self.theta]
        self.latent = (w / self.unit_rows).clone() if config.mapping == "ste" else None
        if self.latent is not None:
            params.append(self.latent)
        steps = max(config.calib_steps, 1)
        self.opt = torch.optim.Adam(params, lr=config.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
        self.energy = stats.output_energy(w).clamp_min(1e-30)
        self.target = stats.target(w)  # P: row r is M w_r
        diag = torch.diagonal(self.h, dim1=1, dim2=2)
        self.curvature = (2 * diag / self.energy).repeat_interleave(self.per_in, dim=0)  # d2L/dw^2, [R, C]
        self.move_cost = 0.5 * config.move_threshold * self.curvature
        self.ema = torch.zeros_like(w)
        self.max_moves = max(self.rows, int(config.max_move_fraction * self.rows * self.cols))
        self.basis = _basis(idx, self.h, self.k) if self.k * self.rows * self.cols <= max_basis else None
        self.refresh()

    # -- the current state ---------------------------------------------------------------------------------
    def row_tables(self) -> torch.Tensor:
        """[R, K] codebook values of every row."""
        if self.shared:
            return self.theta[0][None, :] * (self.scale * self.unit)[self.row_group][:, None]
        return (self.theta * self.unit[:, None])[self.row_group]

    def refresh(self) -> None:
        """Recompute the tables, W^ and z = W^ H for the current codebooks and mapping."""
        self.tr = self.row_tables()
        self.wq = torch.gather(self.tr, 1, self.idx)
        if self.basis is not None:
            self.z = torch.einsum("rk,krc->rc", self.tr, self.basis)
        else:
            self.z = torch.bmm(self.wq.reshape(self.g_in, self.per_in, self.cols), self.h).reshape(self.rows, self.cols)

    def loss(self) -> float:
        return float(((self.wq * self.z).sum() - 2 * (self.wq * self.target).sum() + self.energy) / self.energy)

    def grad(self) -> torch.Tensor:
        return 2 * (self.z - self.target) / self.energy

    def snapshot(self) -> tuple:
        return (self.idx.clone(), self.theta.clone(), None if self.scale is None else self.scale.clone())

    # -- sparse updates --------------------------------------------------------------------------------------
    def sparse_h(self, r: torch.Tensor, j: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """D H for the sparse D [R, C] holding coef at (r, j): one sparse x dense product (row r of D multiplies
        its input group's H: the groups' H are stacked and D's columns offset by group), or, when nearly every
        row holds many entries, a dense matmul (faster per entry)."""
        rows, cols = self.rows, self.cols
        if r.numel() * 32 > rows * cols:
            dense = torch.zeros(rows, cols, dtype=self.w.dtype, device=self.w.device)
            dense[r, j] = coef
            return torch.bmm(dense.reshape(self.g_in, self.per_in, cols), self.h).reshape(rows, cols)
        return _rows_times_h(r, self._stacked_cols(r, j), coef, self.h_stacked, rows, presorted=True)  # row-major

    def _stacked_cols(self, r: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Columns of the stacked H [g C, C] that rows r read for input j."""
        return j if self.g_in == 1 else self.in_group[r] * self.cols + j

    def move(self, new: torch.Tensor, r: torch.Tensor, j: torch.Tensor, d_h: torch.Tensor) -> None:
        """Take the index changes at (r, j) (new mapping `new`) whose effect on W^ H is d_h."""
        if self.basis is not None and r.numel() * 100 > self.rows * self.cols:
            # many moves: B[old, r] -= H[j], B[new, r] += H[j] as one sparse product over the touched rows
            flat = self.basis.view(self.k * self.rows, self.cols)
            keys = torch.cat([self.idx[r, j] * self.rows + r, new[r, j] * self.rows + r])
            signs = torch.cat([torch.full_like(r, -1), torch.ones_like(r)]).to(self.w.dtype)
            stacked = self._stacked_cols(r, j)
            touched, rows_delta = _rows_times_h(keys, torch.cat([stacked, stacked]), signs, self.h_stacked, 0)
            flat.index_add_(0, touched, rows_delta)
        elif self.basis is not None and r.numel():  # few: rows of H added and taken away (cost: moves x C)
            flat = self.basis.view(self.k * self.rows, self.cols)
            old, now = self.idx[r, j], new[r, j]
            chunk = max(1, (1 << 22) // self.cols)
            for a in range(0, r.numel(), chunk):
                rr, jj = r[a:a + chunk], j[a:a + chunk]
                rows_h = self.h[self.in_group[rr], jj]
                flat.index_add_(0, old[a:a + chunk] * self.rows + rr, rows_h, alpha=-1.0)
                flat.index_add_(0, now[a:a + chunk] * self.rows + rr, rows_h)
        self.idx = new
        self.wq = torch.gather(self.tr, 1, new)
        self.z = self.z + d_h  # exact: H is fixed

    def resort(self) -> None:
        """Keep codebooks sorted (neighbour moves rely on it): permute entries, Adam state, indices, basis."""
        theta = self.theta
        if theta.device.type == "cpu":
            if bool((theta[:, 1:] >= theta[:, :-1]).all()):
                return
            perm = torch.argsort(theta, dim=1)  # new entry e holds old entry perm[e]
        else:  # no host read: a stable sort of sorted entries is the identity, so permuting is a no-op then
            perm = torch.argsort(theta, dim=1, stable=True)
        state = self.opt.state[theta]
        for t in [theta, *(v for v in state.values() if torch.is_tensor(v) and v.shape == theta.shape)]:
            t.copy_(torch.gather(t, 1, perm))
        groups_of = torch.zeros_like(self.row_group) if self.shared else self.row_group
        self.idx = torch.gather(torch.argsort(perm, dim=1)[groups_of], 1, self.idx)
        if self.basis is not None:
            self.basis = self.basis[perm[groups_of].t(), torch.arange(self.rows, device=self.w.device)[None, :]].contiguous()

    # -- one step --------------------------------------------------------------------------------------------
    def codebook_step(self, grad: torch.Tensor) -> None:
        """Adam on the codebooks with their exact gradients: the sum of dL/dw^ over the weights mapped to each."""
        k, rows, w = self.k, self.rows, self.w
        if self.shared:
            su = (self.scale * self.unit)[self.row_group][:, None]
            self.theta.grad = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(
                0, self.idx.reshape(-1), (grad * su).reshape(-1))[None]
            mapped = torch.gather(self.theta[0].expand(rows, k), 1, self.idx)
            self.scale.grad = torch.zeros_like(self.scale).index_add_(
                0, self.row_group, (grad * mapped).sum(1) * self.unit[self.row_group])
        else:
            groups = self.theta.shape[0]
            self.theta.grad = torch.zeros(groups * k, dtype=w.dtype, device=w.device).index_add_(
                0, (self.row_group[:, None] * k + self.idx).reshape(-1), (grad * self.unit_rows).reshape(-1)).view(groups, k)
        if self.latent is not None:
            self.latent.grad = grad * self.unit_rows
        self.opt.step()
        self.sched.step()
        if self.scale is not None:
            self.scale.clamp_(min=1e-3)
        self.resort()

    def proximal_moves(self) -> None:
        """Neighbour moves from the EMA score, kept per row only when they lower that row's loss exactly.

        A row's loss is quadratic, so its moves d (sparse) change it by (2 d.(z - P) + d H d) / E. Moves are
        taken together, but a row whose joint move would raise its loss (correlated inputs) keeps only its
        single best move, and only if that one lowers the loss.
        """
        grad = self.grad()
        self.ema.mul_(self.config.momentum).add_(grad, alpha=1 - self.config.momentum)
        target, gap, gain = _neighbour_moves(self.idx, self.ema, self.tr, self.move_cost, self.wq)
        moved = _cap_moves(gain, self.max_moves)
        r, j = moved.nonzero(as_tuple=True)
        if not r.numel():
            return
        delta = gap.mul_(moved)  # the change of every dequantized weight (0 where it does not move)
        d_h = self.sparse_h(r, j, delta[r, j])
        change = (delta * (grad + d_h / self.energy)).sum(1)  # exact loss change of each row
        rows_bad = (change > 0).nonzero()[:, 0]
        if rows_bad.numel():
            db, mb = delta[rows_bad], moved[rows_bad]
            single = db * grad[rows_bad] + 0.5 * self.curvature[rows_bad] * db * db  # exact change of one move alone
            single.masked_fill_(~mb, float("inf"))
            best, best_j = single.min(dim=1)
            keep = best < 0
            moved[rows_bad] = False
            rows_one, j_one = rows_bad[keep], best_j[keep]
            moved[rows_one, j_one] = True
            d_h[rows_bad] = 0  # the bad rows' share of D H is now that of their single move: one row of H
            d_h[rows_one] = delta[rows_one, j_one][:, None] * self.h[self.in_group[rows_one], j_one]
            r, j = moved.nonzero(as_tuple=True)
        self.move(torch.where(moved, target, self.idx), r, j, d_h)
        self.ema.masked_fill_(moved, 0)

    def ste_moves(self) -> None:
        """Plain straight-through (ablation): latent weights follow the gradient; index = nearest codeword."""
        new = nearest_rows(self.latent * self.unit_rows, self.tr)
        changed = new != self.idx
        if bool(changed.any()):
            r, j = changed.nonzero(as_tuple=True)
            self.move(new, r, j, self.sparse_h(r, j, (torch.gather(self.tr, 1, new) - self.wq)[r, j]))

    def refit(self, idx: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Least-squares per-group codebooks [G, K] for the mapping idx (through the basis when there is one)."""
        if self.basis is None or not torch.equal(idx, self.idx):
            return refit_codebooks(self.w, idx, self.row_group, tables, LayerStats(self.h, self.h, self.h, 0),
                                   target=self.target)
        groups, k = tables.shape
        slot = (self.row_group[:, None] * k + idx).reshape(-1)  # (group, entry) of every weight
        q = torch.stack([torch.zeros(groups * k, dtype=torch.float64, device=self.w.device)
                         .index_add_(0, slot, self.basis[e].reshape(-1).double()) for e in range(k)], dim=1)
        b = torch.zeros(groups * k, dtype=torch.float64, device=self.w.device).index_add_(
            0, slot, self.target.reshape(-1).double())
        return _solve_codebooks(q.view(groups, k, k), b.view(groups, k), tables)


def jlcm_learn(w: torch.Tensor, stats: LayerStats, idx: torch.Tensor, row_group: torch.Tensor,
               tables: torch.Tensor, unit: torch.Tensor, config: JLCMConfig, shared: bool = False,
               history: list[float] | None = None,
               max_basis: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Joint learning of codebooks and mapping for one layer.

    w [R, C] float weights; idx [R, C] initial mapping; row_group [R]; tables: per-group codebooks [G, K]
    (or, shared: the shared codebook [1, K] in units of `unit`); unit [G] the group's weight std. Each step:
    Adam on the codebooks (exact gradients), then the mapping moves against the new codebooks (proximal,
    plain STE or frozen, per `config.mapping`). W^ H comes from the basis B (`_basis`) when K R C <=
    `max_basis`, else from a matmul each step. Returns (idx, codebooks, scales or None, relative output
    error) of the best state seen; `history`, when given, receives the loss of every step.
    """
    learner = _JointLearner(w, stats, idx, row_group, tables, unit, config, shared, max_basis)
    best_loss, best = float("inf"), learner.snapshot()
    bests: list[float] = []  # best loss so far, after every step
    for step in range(config.calib_steps):
        loss = learner.loss()
        if history is not None:
            history.append(loss)
        if loss < best_loss:
            best_loss, best = loss, learner.snapshot()
        bests.append(best_loss)
        patience = config.converge_steps
        if patience and step >= patience and bests[-1 - patience] - best_loss <= config.converge_tol * best_loss:
            break  # converged: the best loss moved less than converge_tol over the last converge_steps steps
        learner.codebook_step(learner.grad())
        if learner.basis is not None and step % 50 == 49:
            learner.basis = _basis(learner.idx, learner.h, learner.k)  # drop the drift of incremental updates
        learner.refresh()  # the mapping moves against the new codebooks
        if config.mapping == "proximal":
            learner.proximal_moves()
        elif config.mapping == "ste":
            learner.ste_moves()
    final = learner.loss()
    if final <= best_loss:
        best_loss, best = final, learner.snapshot()
    idx, theta, scale = best
    tables_out = theta if shared else theta * unit[:, None]
    scales_out = None if scale is None else scale * unit
    if config.refit and not shared and (learner.basis is not None or learner.rows * learner.cols ** 2 * learner.k <= 5e10):
        refit = learner.refit(idx, tables_out)
        sorted_refit, perm = torch.sort(refit, dim=1)
        idx_refit = torch.gather(torch.argsort(perm, dim=1)[row_group], 1, idx)
        refit_loss = _exact_loss(learner, torch.gather(sorted_refit[row_group], 1, idx_refit))
        if refit_loss < best_loss:
            best_loss, idx, tables_out = refit_loss, idx_refit, sorted_refit
    return idx, tables_out, scales_out, best_loss


def _exact_loss(learner: _JointLearner, wq: torch.Tensor) -> float:
    wq_g = wq.reshape(learner.g_in, learner.per_in, learner.cols)
    quad = (wq_g * torch.bmm(wq_g, learner.h)).sum()
    return float((quad - 2 * (wq * learner.target).sum() + learner.energy) / learner.energy)


def quantize_jlcm_widths(weight: torch.Tensor, widths: list[int], config: JLCMConfig,
                         stats: LayerStats | None = None) -> dict[int, Encoded]:
    """`quantize_jlcm` of one weight at several widths ({bits: encoded}, each exactly what `quantize_jlcm`
    gives): the rows are grouped, and each group's values sorted and summarised for k-means, once for all
    widths (the sensitivity measurement quantizes every layer at every width)."""
    out = {bits: encode_8bit(weight) for bits in widths if bits >= 8}
    low = sorted({bits for bits in widths if bits < 8})
    if not low:
        return out
    rows, cols = matrix_shape(weight.shape)
    w = weight.detach().float().reshape(rows, cols)
    column_scale = None
    if stats is not None and config.column_scale > 0 and (config.column_scale_layers == "all" or weight.dim() == 2):
        column_scale, scale = activation_column_scales(stats, config.column_scale)
        w, stats = w * scale[None, :], stats.scaled_columns(scale)
    groups = min(config.groups, rows)
    row_group, order = group_rows(row_statistic(w, config.statistic), groups)
    col_w = column_weights(stats, rows) if config.init_weighting == "hessian" else None
    members = [row_group == g for g in range(groups)]
    sizes = torch.bincount(row_group, minlength=groups).tolist()  # one read back to the host for all groups
    unit = torch.stack([w[m].std(unbiased=False) if n * cols > 1 else w[m].abs().mean() for m, n in zip(members, sizes)])
    unit = unit.clamp_min(float(w.abs().max()) * 1e-6 + 1e-12)
    shared = config.variant == "shared-codebook-scale"
    ks = [1 << bits for bits in low]
    if shared:
        normalised = w / unit[row_group][:, None]
        shared_tables = kmeans_1d_widths(normalised, ks, col_w, max_points=config.init_points)
    else:
        group_tables = [kmeans_1d_widths(w[m], ks, None if col_w is None else col_w[m], max_points=config.init_points)
                        for m in members]
    for bits, k in zip(low, ks):
        if shared:
            tables = shared_tables[k][None]  # [1, K] in group std units
            row_tables = tables[0][None, :] * unit[row_group][:, None]
        else:
            tables = torch.stack([by_k[k] for by_k in group_tables])
            row_tables = tables[row_group]
        out[bits] = _learn_and_encode(weight, w, stats, bits, config, tables, row_tables, row_group, order, unit,
                                      groups, shared, column_scale)
    return out


def activation_column_scales(stats: LayerStats, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored, scale): scale_j = rms(x_j)^alpha over the calibration inputs (geometric mean 1), and the float16
    factor 1 / scale_j the artifact stores per column; `scale` is recomputed from the stored factor so that the
    weight learned for W * scale decodes exactly."""
    diag = torch.diagonal(stats.H, dim1=1, dim2=2).mean(0).double()  # [C] E[x_j^2]
    diag = diag.clamp_min(float(diag.max()) * 1e-8 + 1e-30)
    log_s = 0.5 * alpha * diag.log()
    stored = torch.exp(-(log_s - log_s.mean())).clamp(1e-4, 6e4).to(torch.float16)
    return stored, 1.0 / stored.float()


def _learn_and_encode(weight: torch.Tensor, w: torch.Tensor, stats: LayerStats | None, bits: int, config: JLCMConfig,
                      tables: torch.Tensor, row_tables: torch.Tensor, row_group: torch.Tensor, order: torch.Tensor,
                      unit: torch.Tensor, groups: int, shared: bool,
                      column_scale: torch.Tensor | None = None) -> Encoded:
    """From the k-means init: nearest mapping, joint learning on `stats` (if any), then the stored layout."""
    rows = w.shape[0]
    idx = nearest_rows(w, row_tables)
    scales = unit if shared else None
    if stats is not None and config.scale_underdetermined_steps and 0 < stats.samples < w.shape[1]:
        config = config.model_copy(update={"calib_steps": max(1, round(config.calib_steps * stats.samples / w.shape[1]))})
    if stats is not None and config.calib_steps > 0:
        idx, tables, learned_scales, _ = jlcm_learn(w, stats.damped(config.damp), idx, row_group, tables, unit, config,
                                                    shared=shared)
        if shared:
            scales = learned_scales
    row_map = "none" if groups in (1, rows) and config.row_map == "group-ids" else config.row_map
    if groups == rows and row_map == "none":
        # G == R: group g is the row of rank g; renumber groups as rows so no map is stored
        tables = tables[row_group] if not shared else tables
        scales = scales[row_group] if scales is not None else None
        row_group = torch.arange(rows, device=w.device)
    return encode_codebook(weight.shape, bits, idx, row_group, groups, tables if not shared else tables[0],
                           kind="shared" if shared else "per-group", scale=scales, row_map=row_map, order=order,
                           column_scale=column_scale)


@register_method("jlcm", JLCMConfig, widths=quantize_jlcm_widths)
def quantize_jlcm(weight: torch.Tensor, stats: LayerStats | None, bits: int, config: JLCMConfig) -> Encoded:
    """Group rows, k-means init per group, then joint learning on the layer's input statistics."""
    return quantize_jlcm_widths(weight, [bits], config, stats)[bits]
