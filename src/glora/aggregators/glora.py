"""GLoRA: gauge-aware low-rank server aggregation (arXiv 2605.06733; methods.md §3).

Not to be confused with PEFT's unrelated "Generalized LoRA" tuner (``peft.GloraConfig``).

Per module, with folded client factors ``B̃_i`` (d×r_i), ``A_i`` (r_i×k) and weights ``p_i``:

1. client bases ``U_i`` (d×r_i): thin QR of ``B̃_i`` (or, ``basis="svd"``, the left singular
   vectors of ``B̃_i A_i`` above ``basis_tol · σ_max``, computed in factored form);
2. consensus subspace ``U_ref`` = top-``R`` left singular vectors of the stack
   ``M = [√p_1 U_1, …, √p_n U_n]`` (d×S, ``S = Σ r_i``), i.e. the top eigenvectors of
   ``K = Σ p_i U_i U_iᵀ = M Mᵀ``, which is never formed;
3. shared coordinates ``C = Σ_i p_i (U_refᵀ B̃_i) A_i`` (R×k); the state ``(U_ref, C)``
   represents ``ΔW_srv = U_ref C = Π ΔW*`` (the exact average projected onto the consensus);
   two-sided: ``Z = Σ_i p_i (U_refᵀ B̃_i)(A_i V_ref)`` (R×R), ``ΔW_srv = U_ref Z V_refᵀ``;
4. readout at rank ``r``: thin SVD ``C = U_c Σ_c V_cᵀ``, ``B = U_ref U_c[:, :r] Σ_c^{1/2}``,
   ``A = Σ_c^{1/2} V_c[:, :r]ᵀ``, i.e. the truncated SVD of ``ΔW_srv`` (Eckart–Young).

With ``carry_tail=True`` (our extension of methods.md §3.12's "cumulative low-rank state") the
round also carries the part of the previous global update that the clients' truncated readouts
did not hold: ``ΔW* = Σ_i p_i B̃_i A_i + Σ_i p_i (ΔW_prev − T_{r_i}(ΔW_prev))``, where
``T_r`` is the rank-``r`` readout, so that the server applies FedAvg to the clients' *changes*
(``ΔW_prev + Σ p_i (B̃_i A_i − T_{r_i}(ΔW_prev))``) instead of shrinking every component beyond
a client's rank by that client's weight each round (the energy collapse of §3.12). The carried
tail is one more low-rank term, ``(B_prev diag(w), A_prev)`` with ``w_j = Σ_{i: r_i ≤ j} p_i``
over the components ``j`` of the previous readout, so the round stays in factored form.

No ``d×d`` or ``d×k`` matrix is formed; modules of equal shape are processed as one batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from glora.aggregators.base import Aggregator, fill_to_rank
from glora.linalg import factored_svd, thin_svd
from glora.types import LoRAFactors, ServerState
from glora.validation import RoundInput

__all__ = ["GLoRA"]

#: Most entries of S×S Gram matrices processed in one chunk (4 MiB in float32).
_GRAM_BUDGET = 1 << 20


class GLoRA(Aggregator):
    """Gauge-aware server aggregation with a rank-compatible readout.

    Args:
        server_rank: ``R``. ``None`` (default, the spec's suggestion) = the round's largest client
            rank ``r_max``; an int = that rank (capped at ``S = Σ r_i``); ``"sum"`` = ``S`` itself,
            every round (exact: the state then holds the weighted average, Prop. 1, at the size of
            all the round's client factors); ``"auto"`` = the smallest ``R`` whose consensus
            eigenvalues hold ``energy`` of ``tr K``, kept in ``[r_max, S]`` (our extension).
        energy: the energy threshold of ``server_rank="auto"``, in (0, 1].
        two_sided: also project the input side onto a consensus of the clients' row spaces.
        basis: ``"qr"`` (thin QR of ``B̃_i``) or ``"svd"`` (thresholded factored SVD of
            ``B̃_i A_i``: robust to rank-deficient clients).
        basis_tol: relative singular-value threshold of ``basis="svd"``.
        consensus: ``"gram"`` (default: eigendecomposition of the ``S×S`` Gram matrix of the
            ``d×S`` stack, top-``R`` vectors formed only; measured about 1.7× faster) or
            ``"svd"`` (thin SVD of the stack). Same subspace (tests check both to 1e-10).
        split: singular values in the readout: ``"sqrt"`` (``Σ^{1/2}`` on both factors) or ``"B"``
            (all of ``Σ`` in ``B``, FlexLoRA's convention).
        diagnostics: also compute the relative projection error ``‖ΔW* − ΔW_srv‖_F / ‖ΔW*‖_F``
            (``diagnostics["proj_error_rel"]``); costs a ``k·S²`` Gram per module (+8 to +23 %
            server time at the 7B-like benchmark shape in our runs), so it is off by default.
        chunk_size: modules processed per batch (bounds the extra memory); fewer when the
            round's total rank is large, so that a chunk's S×S Gram matrices stay small.
        carry_tail: add back the components of the previous global update beyond each
            participant's rank, which its readout did not contain (module docstring; from
            round 2 on when the initial adapter has ``B = 0``). The tail joins the consensus
            as one more member of weight ``Σ_{i: r_i < R_prev} p_i`` (the clients that did
            not receive all of it), and ``server_rank="sum"`` then covers its rank too (still
            exact). With equal client ranks and ``R = r`` nothing is truncated and the result
            equals ``carry_tail=False``. Off by default: the spec's "fresh each round".
    """

    name = "glora"
    mixed_ranks = True

    def __init__(
        self,
        *,
        server_rank: int | Literal["auto", "sum"] | None = None,
        energy: float = 0.9,
        two_sided: bool = False,
        basis: Literal["qr", "svd"] = "qr",
        basis_tol: float = 1e-6,
        consensus: Literal["svd", "gram"] = "gram",
        split: Literal["sqrt", "B"] = "sqrt",
        diagnostics: bool = False,
        chunk_size: int = 16,
        carry_tail: bool = False,
        **base: object,
    ) -> None:
        super().__init__(**base)  # type: ignore[arg-type]
        if server_rank not in (None, "auto", "sum") and (
            isinstance(server_rank, bool) or not isinstance(server_rank, int) or server_rank < 1
        ):
            raise ValueError(
                f"server_rank must be a positive integer, 'auto', 'sum' or None, "
                f"got {server_rank!r}"
            )
        if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
            raise ValueError(f"energy must be in (0, 1], got {energy!r}")
        if basis not in ("qr", "svd"):
            raise ValueError(f"basis must be 'qr' or 'svd', got {basis!r}")
        if consensus not in ("svd", "gram"):
            raise ValueError(f"consensus must be 'svd' or 'gram', got {consensus!r}")
        if split not in ("sqrt", "B"):
            raise ValueError(f"split must be 'sqrt' or 'B', got {split!r}")
        if not (isinstance(basis_tol, (int, float)) and 0 <= basis_tol < 1):
            raise ValueError(f"basis_tol must be in [0, 1), got {basis_tol!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        for flag, value in (
            ("two_sided", two_sided),
            ("diagnostics", diagnostics),
            ("carry_tail", carry_tail),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be true or false, got {value!r}")
        self.server_rank = server_rank
        self.energy = float(energy)
        self.two_sided = two_sided
        self.basis = basis
        self.basis_tol = float(basis_tol)
        self.consensus = consensus
        self.split = split
        self.diagnostics = diagnostics
        self.chunk_size = chunk_size
        self.carry_tail = carry_tail

    # ------------------------------------------------------------------ aggregation
    def _client_basis(self, B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """A client's product as ``B @ A = U @ F``, ``U`` with orthonormal columns spanning col(B).

        ``B`` (m, d, r), ``A`` (m, r, k) → ``U`` (m, d, q), ``F`` (m, q, k). QR basis:
        ``B = U T``, ``F = T A``. SVD basis: the factored SVD ``B A = U diag(s) Vᵀ`` with the
        directions below ``basis_tol · s_max`` set to zero, ``F = diag(s) Vᵀ``.
        """
        if self.basis == "qr":
            U, T = torch.linalg.qr(B, mode="reduced")
            return U, T @ A
        U, s, V = self._thresholded_svd(B, A)
        return U, s.unsqueeze(-1) * V.mT

    def _thresholded_svd(self, B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Factored thin SVD of ``B @ A`` (m, d, q), (m, q), (m, k, q), ``q = min(r, d, k)``, with
        the directions below ``basis_tol · s_max`` (and all of an all-zero product) set to zero.
        """
        U, s, V = factored_svd(B, A)
        smax = s[..., :1]
        keep = ((s > self.basis_tol * smax) & (smax > 0)).to(U.dtype)
        return U * keep.unsqueeze(-2), s * keep, V * keep.unsqueeze(-2)

    def _tails(
        self, rnd: RoundInput, prev: ServerState | None
    ) -> dict[str, tuple[LoRAFactors, float]]:
        """Per module, the previous update's components that the round's readouts left out.

        ``Σ_i p_i (T(ΔW_prev) − T_{r_i}(ΔW_prev))`` as factors ``(B_prev diag(w), A_prev)``
        (d×q, q×k) of the previous full readout, ``w_j = Σ_{i: r_i ≤ j} p_i`` (readouts are
        nested, so ``T_{r_i}`` is its first ``r_i`` components), with the tail's consensus weight
        ``max_j w_j``. A module has none when ``carry_tail`` is off, before round 1, or when its
        tail is zero (every participant received everything, or the initial ``B = 0``).
        """
        if not self.carry_tail or prev is None or not prev.tensors:
            return {}
        p = rnd.p()
        full = self.readout(prev)
        out = {}
        for m in rnd.modules:
            f = full.get(m)
            if f is None:
                continue
            ranks = torch.tensor(rnd.ranks[m])
            j = torch.arange(f.rank)
            w = ((ranks.unsqueeze(1) <= j.unsqueeze(0)).to(p.dtype) * p.unsqueeze(1)).sum(0)
            tail = LoRAFactors(A=f.A.to(rnd.dtype), B=f.B.to(rnd.dtype) * w.to(rnd.dtype))
            if not bool(tail.B.any()):
                continue
            out[m] = (tail, float(w.max()))
        return out

    def _stack_tail(
        self,
        chunk: list[str],
        tails: dict[str, tuple[LoRAFactors, float]],
        r_tail: int,
        M_t: Tensor,
        F_t: Tensor,
        row_spaces: list[Tensor],
    ) -> None:
        """Write the chunk's carried tails into the stack: ``M_t`` (c, d, q_t), ``F_t`` (c, q_t, k).

        The tail ``B_t A_t = U_t diag(s_t) V_tᵀ`` enters ``M`` as ``√ω U_t`` (its consensus weight
        ``ω``) and ``F`` as ``diag(s_t) V_tᵀ / √ω``, so that with a unit ``root`` its term of
        ``C`` is ``U_refᵀ B_t A_t`` (weight 1: the tail already carries the ``p_i``).
        """
        c, d, k = len(chunk), M_t.shape[-2], F_t.shape[-1]
        B = M_t.new_zeros(c, d, r_tail)
        A = M_t.new_zeros(c, r_tail, k)
        omega = M_t.new_ones(c)
        for j, m in enumerate(chunk):
            if m in tails:
                tail, w = tails[m]
                B[j, :, : tail.rank], A[j, : tail.rank], omega[j] = tail.B, tail.A, w
        U, s, V = self._thresholded_svd(B, A)
        root = omega.sqrt().view(c, 1, 1)
        M_t.copy_(U * root)
        F_t.copy_(s.unsqueeze(-1) * V.mT / root)
        if self.two_sided:
            row_spaces.append(V * root)

    def _consensus(self, M: Tensor) -> tuple[Tensor, Callable[[int], Tensor], Tensor]:
        """Eigenvalues of ``K = M Mᵀ`` for the stack ``M`` (m, d, S), never forming ``K``.

        Returns ``(lam, top, G)``: the eigenvalues (m, q) in descending order, ``q = min(d, S)``;
        ``top(R)`` = the top-``R`` eigenvectors of ``K`` (m, d, R), i.e. the first ``R`` left
        singular vectors of ``M``; and the Gram matrix ``G = MᵀM`` (m, S, S).
        ``consensus="svd"``: thin SVD of ``M``. ``"gram"``: eigendecomposition of ``G`` (in the
        input dtype: its eigenvalues are those of ``K``, in [0, 1], so squaring the condition
        number of ``M`` costs nothing for the top eigenvectors) and ``U_R = M V_R Λ_R^{-1/2}``,
        formed for the ``R`` columns needed only.
        """
        if self.consensus == "svd":
            U, sig, Vh = torch.linalg.svd(M, full_matrices=False)
            lam = sig * sig
            return lam, lambda R: U[..., :R], (Vh.mT * lam.unsqueeze(-2)) @ Vh
        G = M.mT @ M
        lam, V = torch.linalg.eigh(G)  # ascending; K's eigenvalues lie in [0, 1]
        q = min(M.shape[-2], M.shape[-1])
        lam, V = lam.flip(-1)[..., :q].clamp_min(0), V.flip(-1)[..., :q]
        floor = lam[..., :1] * (M.shape[-1] * torch.finfo(M.dtype).eps)

        def top(R: int) -> Tensor:
            lr = lam[..., :R]
            inv = torch.where(lr > floor, lr.rsqrt(), torch.zeros_like(lr))
            return M @ (V[..., :R] * inv.unsqueeze(-2)).to(M.dtype)

        return lam, top, G

    def _choose_rank(self, lam: Tensor, r_max: int, S: int) -> int:
        """Requested server rank of one module from its consensus eigenvalues ``lam`` (descending).

        Capped at ``S``; each side is further capped at its own dimension by the caller.
        """
        if self.server_rank is None:
            R = r_max
        elif self.server_rank == "sum":
            R = S
        elif self.server_rank == "auto":
            total = float(lam.sum())
            if total <= 0:
                R = r_max
            else:
                frac = torch.cumsum(lam.to(torch.float64), 0) / total
                R = int((frac < self.energy - 1e-12).sum()) + 1
                R = max(r_max, min(R, S))
        else:
            R = min(int(self.server_rank), S)
        return max(1, R)

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        p = rnd.p()
        tails = self._tails(rnd, prev)
        groups: dict[tuple, list[str]] = defaultdict(list)
        for m in rnd.modules:
            groups[(rnd.shapes[m], rnd.ranks[m])].append(m)

        state = ServerState(method=self.name)
        ranks_used: dict[str, int] = {}
        spectra: dict[str, list[float]] = {}
        err2_total = 0.0
        norm2_total = 0.0
        for ((d, k), ranks), names in groups.items():
            S = sum(ranks)
            r_max = max(ranks)
            qs = [min(d, k, r) if self.basis == "svd" else min(d, r) for r in ranks]
            # the carried tail (carry_tail): one more member of the stack, padded to the
            # group's largest previous rank (zero directions are dropped by its thresholded SVD)
            r_tail = max((tails[m][0].rank for m in names if m in tails), default=0)
            q_t = min(d, k, r_tail)
            S += q_t
            S_M = sum(qs) + q_t
            # modules per chunk: chunk_size, and at most _GRAM_BUDGET entries of S×S Gram matrices
            # (large rounds, e.g. 100 clients, would otherwise eigendecompose many at once)
            width = max(1, min(self.chunk_size, len(names), _GRAM_BUDGET // (S_M * S_M)))
            # buffers reused by every chunk of the group (no fresh pages per chunk)
            M_buf = torch.empty(width, d, S_M, dtype=rnd.dtype)
            F_buf = torch.empty(width, S_M, k, dtype=rnd.dtype)
            for start in range(0, len(names), width):
                chunk = names[start : start + width]
                c = len(chunk)
                # per client, over the chunk's modules: B̃_i A_i = U_i F_i. The weighted bases
                # side by side form M (c, d, S_M), the F_i stacked F (c, S_M, k).
                M, F = M_buf[:c], F_buf[:c]
                root = torch.cat(
                    [p[i].sqrt().expand(q) for i, q in enumerate(qs)] + [p.new_ones(q_t)]
                )  # (S_M,)
                row_spaces = []
                o = 0
                for i, q in enumerate(qs):
                    B_i = torch.stack([rnd.factors[m][i].B for m in chunk])  # (c, d, r_i)
                    A_i = torch.stack([rnd.factors[m][i].A for m in chunk])  # (c, r_i, k)
                    U_i, F_i = self._client_basis(B_i, A_i)
                    M[..., o : o + q] = U_i * p[i].sqrt()
                    F[:, o : o + q] = F_i
                    if self.two_sided:
                        row_spaces.append(torch.linalg.qr(A_i.mT, mode="reduced").Q * p[i].sqrt())
                    o += q
                if q_t:
                    self._stack_tail(chunk, tails, r_tail, M[..., o:], F[:, o:], row_spaces)
                lam, top, G = self._consensus(M)
                req = [self._choose_rank(lam[j], r_max, S) for j in range(c)]
                Rs = [min(R, lam.shape[-1]) for R in req]  # output side: at most min(d, S)
                Rb = max(Rs)
                U_ref = top(Rb).contiguous()
                # C = Σ_i p_i U_refᵀ U_i F_i = (U_refᵀ M) diag(√p) F   (c, R, k)
                core = ((U_ref.mT @ M) * root) @ F
                if self.two_sided:
                    V_all = thin_svd(torch.cat(row_spaces, -1))[0]  # input side: ≤ min(k, S)
                    Rvs = [min(R, V_all.shape[-1]) for R in req]
                    V_ref = V_all[..., : max(Rvs)].contiguous()
                    del row_spaces, V_all
                    core = core @ V_ref  # Z = U_refᵀ ΔW* V_ref: (c, R, R)
                else:
                    V_ref = None
                if self.diagnostics:
                    # ‖ΔW*‖² = ‖M diag(√p) F‖² = Σ G ∘ (DF)(DF)ᵀ: S_M×S_M blocks, no d×k matrix
                    DF = F * root.unsqueeze(-1)
                    total = (G * (DF @ DF.mT)).sum(dim=(-2, -1))  # (c,)
                    del DF
                svals = thin_svd(core)[1]  # (c, q): spectrum of C (or Z), all modules
                for j, m in enumerate(chunk):
                    R = Rs[j]
                    named = {"U_ref": U_ref[j, :, :R].clone()}
                    if V_ref is None:
                        named["C"] = core[j, :R].clone()
                    else:
                        named["V_ref"] = V_ref[j, :, : Rvs[j]].clone()
                        named["Z"] = core[j, :R, : Rvs[j]].clone()
                    state.tensors[m] = named
                    ranks_used[m] = R
                    cj = named["C"] if V_ref is None else named["Z"]
                    if Rb == R and (V_ref is None or Rvs[j] == V_ref.shape[-1]):
                        spectra[m] = svals[j].tolist()
                    else:  # this module keeps fewer rows than the batch: its own spectrum
                        spectra[m] = thin_svd(cj)[1].tolist()
                    if self.diagnostics:
                        kept = float((cj * cj).sum())
                        tot = float(total[j])
                        err2_total += max(tot - kept, 0.0)
                        norm2_total += tot
        state.info["server_rank"] = ranks_used
        diag: dict[str, object] = {
            "server_rank_mean": sum(ranks_used.values()) / len(ranks_used),
            "server_rank_max": max(ranks_used.values()),
            "c_spectrum": spectra,
        }
        if self.diagnostics:
            diag["proj_error_rel"] = math.sqrt(err2_total / norm2_total) if norm2_total > 0 else 0.0
        state.diagnostics = diag
        return state

    # ------------------------------------------------------------------ readout
    def _readout(self, state: ServerState, rank: int | None) -> dict[str, LoRAFactors]:
        groups: dict[tuple, list[str]] = defaultdict(list)
        for m, named in state.tensors.items():
            core = named["C"] if "C" in named else named["Z"]
            groups[(tuple(named["U_ref"].shape), tuple(core.shape), "V_ref" in named)].append(m)
        out: dict[str, LoRAFactors] = {}
        for (_, core_shape, two_sided), names in groups.items():
            U_ref = torch.stack([state.tensors[m]["U_ref"] for m in names])
            core = torch.stack([state.tensors[m]["Z" if two_sided else "C"] for m in names])
            Uc, sc, Vch = thin_svd(core)  # (m, R, q), (m, q), (m, q, k|R)
            if two_sided:
                V_ref = torch.stack([state.tensors[m]["V_ref"] for m in names])
                Vch = Vch @ V_ref.mT  # (m, q, k)
            R = core_shape[0]
            r = R if rank is None else rank
            q = min(r, sc.shape[-1])
            tol = torch.finfo(sc.dtype).eps * max(core_shape) * sc[..., :1]
            for j, m in enumerate(names):
                n_eff = min(q, int((sc[j] > tol[j]).sum()))
                s = sc[j, :n_eff]
                if self.split == "sqrt":
                    root = s.sqrt()
                    B = (U_ref[j] @ Uc[j, :, :n_eff]) * root
                    A = root.unsqueeze(-1) * Vch[j, :n_eff]
                else:
                    B = (U_ref[j] @ Uc[j, :, :n_eff]) * s
                    A = Vch[j, :n_eff].clone()
                f = LoRAFactors(A=A.contiguous(), B=B.contiguous())
                out[m] = fill_to_rank(f, r, seed=self.fresh_seed(state, m))
        return out
