"""Closed-form weight updates, one function per equation (docs/method.md, step 4).

Shapes: K (d_in, n) keys of this batch, R (d_out, n) residuals, C (d_in, d_in) = E[k kᵀ],
KpKpT (d_in, d_in) = Σ over earlier batches of Kp Kpᵀ, P (d_in, d_in) null-space projector, U (d_in, r) its
orthonormal basis (P = U Uᵀ), V (d_in, d_in − r) the orthonormal basis of its complement (P = I − V Vᵀ),
Kn (d_in, m) keys of this batch's prompts asked about other names (neighbours.py), held like previous keys:
‖ΔW Kn‖² joins the objective, so the same questions about other subjects keep their answers.
All arithmetic in float64 with `torch.linalg.solve`; no explicit inverse is formed.
The solves are written for ΔWᵀ, using symmetry of the bracketed matrices:
R Kᵀ A⁻¹ = (A⁻¹ K Rᵀ)ᵀ.
"""

from __future__ import annotations

import torch

from ..atomic import kill_point


def _f64(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(torch.float64) for t in ts]


def _neighbour_term(Kn: torch.Tensor | None, P: torch.Tensor | None = None) -> torch.Tensor | float:
    """Kn Knᵀ (or P Kn Knᵀ, formed as (P Kn) Knᵀ); 0 without neighbour keys."""
    if Kn is None or not Kn.numel():
        return 0.0
    Kn = Kn.to(torch.float64)
    return (P @ Kn if P is not None else Kn) @ Kn.T


def memit_update(
    K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lambda_p: float, Kn: torch.Tensor | None = None
) -> torch.Tensor:
    """MEMIT:  ΔW = R Kᵀ (λ_p C + Kn Knᵀ + K Kᵀ)⁻¹   (no Kn in the paper)."""
    kill_point("solve")
    K, R, C = _f64(K, R, C)
    A = lambda_p * C + _neighbour_term(Kn) + K @ K.T
    return torch.linalg.solve(A, K @ R.T).T


def encore_update(
    K: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor,
    KpKpT: torch.Tensor,
    lambda_p: float,
    lambda_n: float,
    Kn: torch.Tensor | None = None,
) -> torch.Tensor:
    """ENCORE:  ΔW = R Kᵀ (λ_p C + λ_n I + Kp Kpᵀ + Kn Knᵀ + K Kᵀ)⁻¹  (λ_n‖ΔW‖²_F keeps the norm from
    growing; no Kn in the paper)."""
    kill_point("solve")
    K, R, C, KpKpT = _f64(K, R, C, KpKpT)
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    A = lambda_p * C + lambda_n * eye + KpKpT + _neighbour_term(Kn) + K @ K.T
    return torch.linalg.solve(A, K @ R.T).T


def alphaedit_update(
    K: torch.Tensor,
    R: torch.Tensor,
    P: torch.Tensor,
    KpKpT: torch.Tensor,
    alpha: float,
    C: torch.Tensor | None = None,
    lambda_null: float = 0.0,
    D: torch.Tensor | None = None,
    Kn: torch.Tensor | None = None,
) -> torch.Tensor:
    """AlphaEdit:  ΔW = R Kᵀ P (Kp Kpᵀ P + Kn Knᵀ P + K Kᵀ P + λ_∅ P C P + α I)⁻¹   (λ_∅ = 0, no Kn in the paper).

    Transposed: ΔWᵀ = (P Kp Kpᵀ + P K Kᵀ + λ_∅ P C P + α I)⁻¹ P K Rᵀ, so ΔW = ΔW P (ΔW k = 0 for preserved k).
    λ_∅ P C P = λ_∅ Σ_{null} λ_i u_i u_iᵀ when P is C's eigenprojector (then P C P = P C): the preserved keys'
    energy that the threshold lets into the null space, penalised as MEMIT's λ_p C does everywhere. (With
    preserved facts P is the eigenprojector of C plus their covariance, and the sandwich is needed.)
    `D` (d_out, d_in): the earlier batches' drift W − W0; the λ_∅ penalty then counts the whole drift on the
    preserved keys, λ_∅ tr((D + ΔW) C (D + ΔW)ᵀ), which adds −λ_∅ D C P to R Kᵀ P: each batch pulls part of
    what earlier ones moved on the preserved keys back, against ‖ΔW Kp‖ which keeps earlier edits.
    The paper's form, with d_in × d_in matrices; the editor solves the same ΔW as `alphaedit_null_update`.
    """
    kill_point("solve")
    K, R, P, KpKpT = _f64(K, R, P, KpKpT)
    PK = P @ K  # (d_in, n): P K Kᵀ as (P K) Kᵀ is n/d_in of the work of P (K Kᵀ)
    # A is summed in place, in the order of the formula: one d_in² matrix besides the solve's own LU copy
    A = PK @ K.T
    A.diagonal().add_(alpha)  # + α I (adding α·0 elsewhere changes nothing)
    A += _neighbour_term(Kn, P)
    if KpKpT.any():  # the first batch has no previous keys
        A += P @ KpKpT
    if lambda_null:
        if C is None:
            raise ValueError("lambda_null needs the key covariance C")
        P_C = P @ C.to(torch.float64)
        A += lambda_null * (P_C @ P)
    B = PK @ R.T
    if lambda_null and D is not None:
        B = B - lambda_null * (P_C @ D.to(torch.float64).T)  # P C Dᵀ = (D C P)ᵀ
    return torch.linalg.solve(A, B).T


def alphaedit_null_update(
    K: torch.Tensor,
    R: torch.Tensor,
    U: torch.Tensor,
    U_KpKpT_U: torch.Tensor | None,
    alpha: float,
    lambda_null: float = 0.0,
    U_C_U: torch.Tensor | None = None,
    U_C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    Kn: torch.Tensor | None = None,
) -> torch.Tensor:
    """`alphaedit_update` in the null space's own coordinates:

        ΔW = R Kᵀ U (Uᵀ (Kp Kpᵀ + Kn Knᵀ + K Kᵀ + λ_∅ C) U + α I_r)⁻¹ Uᵀ

    The same ΔW: with ΔW = X Uᵀ (every update with ΔW = ΔW P is one), the objective is a ridge regression in X, and
    U times its solution solves `alphaedit_update`'s system (P U = U). It needs no d_in² matrix (neither P nor a
    d_in × d_in system): an r × r one, r = rank of P, with the earlier batches' keys as `U_KpKpT_U` = Uᵀ Kp Kpᵀ U
    (None: there are none).
    With λ_∅: `U_C_U` = Uᵀ C U, and `U_C` = Uᵀ C (r, d_in) for the drift `D` (the right side less λ_∅ Uᵀ C Dᵀ).
    """
    kill_point("solve")
    K, R, U = _f64(K, R, U)
    UK = U.T @ K  # (r, n)
    # A is summed in place: one r² matrix besides the solve's own LU copy
    A = UK @ UK.T
    A.diagonal().add_(alpha)
    if Kn is not None and Kn.numel():
        UKn = U.T @ Kn.to(torch.float64)
        A += UKn @ UKn.T
    if U_KpKpT_U is not None:  # None: no earlier batches
        A += U_KpKpT_U.to(torch.float64)
    B = UK @ R.T  # (r, d_out)
    if lambda_null:
        if U_C_U is None:
            raise ValueError("lambda_null needs Uᵀ C U")
        A += lambda_null * U_C_U.to(torch.float64)
        if D is not None:
            if U_C is None:
                raise ValueError("the drift term needs Uᵀ C")
            B = B - lambda_null * (U_C.to(torch.float64) @ D.to(torch.float64).T)
    return (U @ torch.linalg.solve(A, B)).T


def null_projection(basis: torch.Tensor, complement: bool, X: torch.Tensor) -> torch.Tensor:
    """P X, P never formed: U (Uᵀ X) for a null-space basis U, X − V (Vᵀ X) for its complement V (`complement`)."""
    X = X.to(torch.float64)
    basis = basis.to(torch.float64)
    return X - basis @ (basis.T @ X) if complement else basis @ (basis.T @ X)


def alphaedit_kernel_update(
    K: torch.Tensor,
    R: torch.Tensor,
    basis: torch.Tensor,
    complement: bool,
    alpha: float,
    Kp: torch.Tensor | None = None,
    Kn: torch.Tensor | None = None,
) -> torch.Tensor:
    """`alphaedit_update` without λ_∅, in the keys' own coordinates:

        ΔW = R Eᵀ (Bᵀ P B + α I_m)⁻¹ (P B)ᵀ,   B = [K | Kn | Kp],   E = [I_n 0]

    The same ΔW as `alphaedit_null_update`: with G = Uᵀ B, its U (G Gᵀ + α I)⁻¹ G E Rᵀ equals U G (Gᵀ G + α I)⁻¹ E Rᵀ
    (push-through identity), and U G = P B, Gᵀ G = Bᵀ P B. The system is m × m (the m keys edited or held)
    instead of r × r, and P is applied through whichever basis is smaller (`null_projection`): no d_in² or r²
    matrix. `Kp` may be any factor F with F Fᵀ = Σ Kp Kpᵀ (`LayerState.previous_keys`).
    """
    kill_point("solve")
    K, R = _f64(K, R)
    B = torch.cat([K, *(x.to(torch.float64) for x in (Kn, Kp) if x is not None and x.numel())], dim=1)
    PB = null_projection(basis, complement, B)
    A = B.T @ PB  # (m, m), symmetric
    A.diagonal().add_(alpha)
    rhs = torch.zeros(B.shape[1], R.shape[0], dtype=torch.float64)
    rhs[: K.shape[1]] = R.T  # E Rᵀ
    return (PB @ torch.linalg.solve(A, rhs)).T


def _split_spectrum(C: torch.Tensor, tau: float, relative: bool) -> tuple[torch.Tensor, int]:
    """C's eigenvectors (float32, eigenvalues ascending) and how many of them are below the threshold.

    The decomposition runs in float32, as AlphaEdit's released code does: on SmolLM2's statistics it splits the
    spectrum where float64 does, with the same subspaces (principal cosines ≥ 0.99999), in half the time and with
    less memory (a 1.5B model's 5,632² C: 0.47 GiB beyond C instead of 0.71, measured)."""
    evals, evecs = torch.linalg.eigh(C.to(torch.float32))
    evals = evals.to(torch.float64)
    keep = (evals / evals.max() if relative else evals) < tau
    return evecs, int(keep.sum())


def _orthonormal(columns: torch.Tensor) -> torch.Tensor:
    """A float64 orthonormal basis of the float32 eigenvectors' span (reduced QR), so that U Uᵀ is a projector to
    float64 precision."""
    Q, _ = torch.linalg.qr(columns.to(torch.float64))
    return Q


def null_space_basis(C: torch.Tensor, tau: float, relative: bool = True) -> torch.Tensor:
    """Eigenvectors of C whose eigenvalue is < τ · λ_max (`relative`) or < τ (AlphaEdit's released code):
    the directions preserved knowledge barely uses."""
    evecs, k = _split_spectrum(C, tau, relative)
    return _orthonormal(evecs[:, :k])  # eigenvalues ascend, so the kept ones come first


def null_space_split(C: torch.Tensor, tau: float, relative: bool = True) -> tuple[torch.Tensor, bool]:
    """The null space as its smaller description: (U, False) as `null_space_basis`, or, when it holds more
    than half of the directions, (V, True) with V the other eigenvectors, P = I − V Vᵀ."""
    evecs, k = _split_spectrum(C, tau, relative)
    if 2 * k > evecs.shape[1]:
        return _orthonormal(evecs[:, k:]), True
    return _orthonormal(evecs[:, :k]), False


def complement_to_basis(V: torch.Tensor) -> torch.Tensor:
    """U from V (orthonormal columns): an orthonormal basis of V's orthogonal complement (a complete QR)."""
    Q, _ = torch.linalg.qr(V.to(torch.float64), mode="complete")
    return Q[:, V.shape[1] :].clone()


def mixed_covariance(C: torch.Tensor, Cx: torch.Tensor, weight: float) -> torch.Tensor:
    """C + w·(tr C / tr Cx)·Cx: extra keys' second moment Cx at `weight` times C's scale, for the null space."""
    C, Cx = _f64(C, Cx)
    return torch.add(C, Cx, alpha=weight * float(C.trace() / Cx.trace().clamp_min(1e-30)))  # one d_in² result


def projector(U: torch.Tensor) -> torch.Tensor:
    """P = U Uᵀ: orthogonal projector onto span(U)."""
    return U @ U.T
