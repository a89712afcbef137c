"""Editing: the closed-form solves (each equals a direct least-squares minimisation of its objective),
AlphaEdit's null-space guarantee, subject-token location, batched z-optimisation with MPES, the Editor's
batch atomicity, and the `edit` command's usage errors. Ends with one real edit of SmolLM2 (slow)."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch
from conftest import COUNTERFACT_VAL, ROOT, run_cli, tree_digest

from edit2deploy.errors import NonFiniteUpdateError, UsageError
from edit2deploy.forward import frozen_linears_on_onednn, onednn_available
from edit2deploy.methods import METHODS, EditConfig, Editor
from edit2deploy.methods import values as values_mod
from edit2deploy.methods.keys import (
    KeyPasses,
    context_templates,
    keys_and_outputs,
    locate_in_template,
    locate_subject,
)
from edit2deploy.methods.solves import (
    alphaedit_kernel_update,
    alphaedit_null_update,
    alphaedit_update,
    encore_update,
    memit_update,
    null_space_basis,
    null_space_split,
    projector,
)
from edit2deploy.methods.values import ValueHParams, optimise_values
from edit2deploy.models import open_model
from edit2deploy.requests import EditRequest

D_IN, D_OUT, N, N_PREV, N_OLD = 12, 7, 5, 4, 30


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spectrum_covariance(d: int, large: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C = Q diag(λ) Qᵀ with `large` eigenvalues in [1, 10] and the rest in [1e-5, 1e-4] (a clear gap).

    Returns (C, Q_large, Q_small)."""
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [
            1 + 9 * torch.rand(large, generator=g, dtype=torch.float64),
            1e-5 + 9e-5 * torch.rand(d - large, generator=g, dtype=torch.float64),
        ]
    )
    C = Q @ torch.diag(lam) @ Q.T
    return (C + C.T) / 2, Q[:, :large], Q[:, large:]


# ================================================================ null space (AlphaEdit's guarantee)
def test_null_space_basis_is_the_small_eigenvalue_eigenspace():
    C, Q_large, Q_small = spectrum_covariance(D_IN, large=8)
    U = null_space_basis(C, tau=2e-2)
    assert U.shape == (D_IN, D_IN - 8) and U.dtype == torch.float64
    assert torch.allclose(U.T @ U, torch.eye(D_IN - 8, dtype=torch.float64), atol=1e-12)  # orthonormal
    P = projector(U)
    # the same subspace, to the float32 decomposition's accuracy (ε · λ_max / gap ≈ 1e-6 here)
    assert torch.allclose(P, Q_small @ Q_small.T, atol=1e-5)
    assert torch.allclose(P @ P, P, atol=1e-12) and torch.allclose(P, P.T)  # a projector to float64 precision
    assert torch.allclose(P @ Q_large, torch.zeros_like(Q_large), atol=1e-5)
    # τ is relative to λ_max: scaling C does not change the basis
    assert torch.allclose(projector(null_space_basis(1e6 * C, tau=2e-2)), P, atol=1e-5)
    # τ above every eigenvalue ratio keeps everything; τ below the smallest keeps nothing
    assert null_space_basis(C, tau=1.01).shape == (D_IN, D_IN)
    assert null_space_basis(C, tau=1e-9).shape == (D_IN, 0)
    # absolute τ (AlphaEdit's released code): the eigenvalue itself is compared, so scale matters
    evals = torch.linalg.eigvalsh(C)
    cut = float(evals[D_IN - 8 - 1] + evals[D_IN - 8]) / 2  # between the small and the large eigenvalues
    assert torch.allclose(projector(null_space_basis(C, tau=cut, relative=False)), P, atol=1e-5)
    assert null_space_basis(1e6 * C, tau=cut, relative=False).shape == (D_IN, 0)


def test_alphaedit_update_leaves_preserved_keys_unchanged():
    C, Q_large, _ = spectrum_covariance(D_IN, large=8, seed=1)
    P = projector(null_space_basis(C, tau=2e-2))
    g = _gen(2)
    K = torch.randn(D_IN, N, generator=g, dtype=torch.float64)
    R = torch.randn(D_OUT, N, generator=g, dtype=torch.float64)
    Kp = torch.randn(D_IN, N_PREV, generator=g, dtype=torch.float64)
    W = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    dW = alphaedit_update(K, R, P, Kp @ Kp.T, alpha=10.0)
    assert dW.shape == (D_OUT, D_IN) and dW.dtype == torch.float64
    assert dW.norm() > 1e-2  # a real update...
    preserved = Q_large @ torch.randn(8, 50, generator=g, dtype=torch.float64)  # keys C's big directions span
    assert (dW @ preserved).abs().max() < 1e-5 * preserved.norm(dim=0).max()  # ...that does not touch them
    assert torch.allclose((W + dW) @ preserved, W @ preserved, atol=1e-5)
    assert torch.allclose(dW @ P, dW, atol=1e-12)  # ΔW = ΔW P


# ================================================================ closed forms = least squares of the objective
def _problem(seed: int = 0):
    g = _gen(seed)
    K = torch.randn(D_IN, N, generator=g, dtype=torch.float64)
    R = torch.randn(D_OUT, N, generator=g, dtype=torch.float64)
    K0 = torch.randn(D_IN, N_OLD, generator=g, dtype=torch.float64)  # "old" keys: C = E[k kᵀ] over them
    C = K0 @ K0.T / N_OLD
    Kp = torch.randn(D_IN, N_PREV, generator=g, dtype=torch.float64)  # keys of earlier edits
    return K, R, K0, C, Kp


def _lstsq_rows(blocks_A: list[torch.Tensor], blocks_B: list[torch.Tensor]) -> torch.Tensor:
    """The minimum-norm X minimising Σ ‖X A_i − B_i‖², by lstsq on the stacked system Aᵀ Xᵀ = Bᵀ."""
    A = torch.cat(blocks_A, dim=1)
    B = torch.cat(blocks_B, dim=1)
    return torch.linalg.lstsq(A.T, B.T, driver="gelsd").solution.T


@pytest.mark.parametrize("lambda_p", [0.5, 15_000.0])
def test_memit_equals_least_squares(lambda_p):
    """MEMIT: min ‖ΔW K − R‖² + λ_p tr(ΔW C ΔWᵀ), with C = K0 K0ᵀ / n0 so the penalty is ‖ΔW K0‖²·λ_p/n0."""
    K, R, K0, C, _ = _problem()
    ref = _lstsq_rows(
        [K, math.sqrt(lambda_p / N_OLD) * K0], [R, torch.zeros(D_OUT, N_OLD, dtype=torch.float64)]
    )
    dW = memit_update(K, R, C, lambda_p)
    assert torch.allclose(dW, ref, rtol=1e-8, atol=1e-10 * ref.abs().max())

    def objective(X):
        return ((X @ K - R) ** 2).sum() + lambda_p * torch.trace(X @ C @ X.T)

    # and it is a minimum: any perturbation is worse
    for s in range(3):
        E = torch.randn(D_OUT, D_IN, generator=_gen(10 + s), dtype=torch.float64) * 1e-3 * dW.abs().max()
        assert objective(dW + E) > objective(dW)


@pytest.mark.parametrize(("lambda_p", "lambda_n"), [(0.5, 2.0), (15_000.0, 15.0)])
def test_encore_equals_least_squares(lambda_p, lambda_n):
    """ENCORE: MEMIT's objective + λ_n ‖ΔW‖² + ‖ΔW Kp‖² (earlier edits' keys keep their values)."""
    K, R, K0, C, Kp = _problem(1)
    z = torch.zeros
    ref = _lstsq_rows(
        [K, math.sqrt(lambda_p / N_OLD) * K0, math.sqrt(lambda_n) * torch.eye(D_IN, dtype=torch.float64), Kp],
        [
            R,
            z(D_OUT, N_OLD, dtype=torch.float64),
            z(D_OUT, D_IN, dtype=torch.float64),
            z(D_OUT, N_PREV, dtype=torch.float64),
        ],
    )
    dW = encore_update(K, R, C, Kp @ Kp.T, lambda_p, lambda_n)
    assert torch.allclose(dW, ref, rtol=1e-8, atol=1e-10 * ref.abs().max())
    # with no earlier keys and λ_n = 0 it is MEMIT
    zero = torch.zeros(D_IN, D_IN, dtype=torch.float64)
    assert torch.allclose(
        encore_update(K, R, C, zero, lambda_p, 0.0), memit_update(K, R, C, lambda_p), rtol=1e-10
    )


@pytest.mark.parametrize(
    ("alpha", "lambda_null", "with_drift"),
    [(0.3, 0.0, False), (10.0, 0.0, False), (10.0, 50.0, False), (10.0, 50.0, True)],
)
def test_alphaedit_equals_least_squares(alpha, lambda_null, with_drift):
    """AlphaEdit: min over Δ of ‖(W + Δ P) K − V‖² + α‖Δ P‖² + ‖Δ P Kp‖² (+ λ_∅ tr(Δ P C P Δᵀ)), R = V − W K.
    With earlier drift D (`null_drift`) the λ_∅ term is λ_∅ tr((D + Δ P) C (D + Δ P)ᵀ).

    Only the update X = Δ P matters (Δ is free on the complement of P), and X ranges over {X : X = X P}.
    Writing X = Y Uᵀ (P = U Uᵀ, U orthonormal) makes this an ordinary least-squares problem in Y:
    Y [Uᵀ K, Uᵀ Kp, √α I] ≈ [R, 0, 0], strictly convex, so X is unique. The paper's closed form
    X = R Kᵀ P (Kp Kpᵀ P + K Kᵀ P + α I)⁻¹ must give the same X."""
    K, R, K0, C, Kp = _problem(2)
    C_spec, _, _ = spectrum_covariance(D_IN, large=7, seed=3)
    U = null_space_basis(C_spec, tau=2e-2)
    r = U.shape[1]
    assert 0 < r < D_IN
    P = projector(U)
    z = torch.zeros
    D = torch.randn(D_OUT, D_IN, generator=_gen(7), dtype=torch.float64) if with_drift else None
    s0 = math.sqrt(lambda_null / N_OLD)
    # λ_∅ tr(X C Xᵀ) with C = K0 K0ᵀ / n0 is ‖√(λ_∅/n0) · Y Uᵀ K0‖² (any C, not only P's own covariance);
    # with drift it is ‖√(λ_∅/n0) · (Y Uᵀ + D) K0‖², i.e. the target of that block is −√(λ_∅/n0) D K0
    old_target = -s0 * D @ K0 if with_drift else z(D_OUT, N_OLD, dtype=torch.float64)
    Y = _lstsq_rows(
        [U.T @ K, U.T @ Kp, math.sqrt(alpha) * torch.eye(r, dtype=torch.float64), s0 * U.T @ K0],
        [R, z(D_OUT, N_PREV, dtype=torch.float64), z(D_OUT, r, dtype=torch.float64), old_target],
    )
    ref = Y @ U.T
    dW = alphaedit_update(K, R, P, Kp @ Kp.T, alpha, C, lambda_null, D=D)
    assert torch.allclose(dW, ref, rtol=1e-8, atol=1e-10 * ref.abs().max())
    assert torch.allclose(dW @ P, dW, atol=1e-12)
    if with_drift:  # the drift term changes the answer
        assert not torch.allclose(dW, alphaedit_update(K, R, P, Kp @ Kp.T, alpha, C, lambda_null), rtol=1e-3)
    # The same X from the min-norm lstsq over Δ itself on [P K, P Kp, √α P] (the min-norm Δ lies in range(P)).
    ref2 = _lstsq_rows(
        [P @ K, P @ Kp, math.sqrt(alpha) * P, s0 * P @ K0],
        [R, z(D_OUT, N_PREV, dtype=torch.float64), z(D_OUT, D_IN, dtype=torch.float64), old_target],
    )
    assert torch.allclose(dW, ref2 @ P, rtol=1e-7, atol=1e-9 * ref.abs().max())

    def objective(X):
        X = X @ P
        fit = ((X @ K - R) ** 2).sum() + alpha * (X**2).sum() + ((X @ Kp) ** 2).sum()
        total = X if D is None else X + D
        return fit + lambda_null * torch.trace(total @ C @ total.T)

    for s in range(3):
        E = torch.randn(D_OUT, D_IN, generator=_gen(20 + s), dtype=torch.float64) * 1e-3 * dW.abs().max()
        assert objective(dW + E) > objective(dW)


def test_neighbour_keys_are_held_like_previous_keys():
    """Kn (the batch's prompts about other names) enters each objective as ‖ΔW Kn‖², exactly as earlier
    edits' Kp do: passing Kn equals adding Kn Knᵀ to Σ Kp Kpᵀ (ENCORE, AlphaEdit) or ENCORE with λ_n 0 (MEMIT)."""
    K, R, _, C, Kp = _problem(4)
    Kn = torch.randn(D_IN, 7, generator=_gen(5), dtype=torch.float64)
    P = projector(null_space_basis(spectrum_covariance(D_IN, large=7, seed=3)[0], tau=2e-2))
    KnKnT = Kn @ Kn.T
    got = alphaedit_update(K, R, P, Kp @ Kp.T, 10.0, C, 5.0, Kn=Kn)
    assert torch.allclose(got, alphaedit_update(K, R, P, Kp @ Kp.T + KnKnT, 10.0, C, 5.0), rtol=1e-9)
    got = encore_update(K, R, C, Kp @ Kp.T, 50.0, 2.0, Kn=Kn)
    assert torch.allclose(got, encore_update(K, R, C, Kp @ Kp.T + KnKnT, 50.0, 2.0), rtol=1e-9)
    got = memit_update(K, R, C, 50.0, Kn=Kn)
    assert torch.allclose(got, encore_update(K, R, C, KnKnT, 50.0, 0.0), rtol=1e-9)
    # and it does what it is for: a heavy Kn pulls ΔW Kn towards 0
    free = alphaedit_update(K, R, P, Kp @ Kp.T, 10.0)
    held = alphaedit_update(K, R, P, Kp @ Kp.T, 10.0, Kn=1e3 * Kn)
    assert (held @ Kn).norm() < 1e-3 * (free @ Kn).norm()
    # no neighbour keys (or an empty set) is the published update
    assert torch.equal(alphaedit_update(K, R, P, Kp @ Kp.T, 10.0, Kn=Kn[:, :0]), free)


def test_alphaedit_with_full_projector_is_ridge_regression():
    """P = I: the update is R Kᵀ (Kp Kpᵀ + K Kᵀ + α I)⁻¹ — ENCORE without the C term."""
    K, R, _, C, Kp = _problem(3)
    eye = torch.eye(D_IN, dtype=torch.float64)
    dW = alphaedit_update(K, R, eye, Kp @ Kp.T, 10.0)
    assert torch.allclose(dW, encore_update(K, R, C, Kp @ Kp.T, 0.0, 10.0), rtol=1e-10)


def test_alphaedit_with_full_projector_and_lambda_null_is_encore():
    """P = I, λ_∅ = λ_p: the bracket is Kp Kpᵀ + K Kᵀ + λ_p C + α I — ENCORE's with λ_n = α."""
    K, R, _, C, Kp = _problem(3)
    eye = torch.eye(D_IN, dtype=torch.float64)
    dW = alphaedit_update(K, R, eye, Kp @ Kp.T, 10.0, C, 7.0)
    assert torch.allclose(dW, encore_update(K, R, C, Kp @ Kp.T, 7.0, 10.0), rtol=1e-10)


def test_lambda_null_reaches_the_registered_solves():
    """The default method's and alphaedit's solves read `lambda_null` and C from the config."""
    from edit2deploy.methods.editor import LayerState

    K, R, _, C, Kp = _problem(5)
    C_spec, _, _ = spectrum_covariance(D_IN, large=7, seed=6)
    state = LayerState(D_IN, previous=[Kp], null_basis=null_space_basis(C_spec, tau=2e-2))
    P = projector(state.null_basis)
    for name in ("default", "alphaedit"):
        cfg = EditConfig(method=name, lambda_null=40.0)
        dW = METHODS[name].solve(K, R, C, state, cfg)
        assert torch.allclose(dW, alphaedit_update(K, R, P, Kp @ Kp.T, cfg.alpha, C, 40.0), rtol=1e-9)
        assert not torch.allclose(dW, alphaedit_update(K, R, P, Kp @ Kp.T, cfg.alpha), rtol=1e-3)
    # Uᵀ C U is formed once and reused by later solves of the same layer
    U = state.null_basis
    cached = state.null_covariance(C)
    assert torch.allclose(cached, U.T @ C @ U, rtol=1e-12)
    assert state.null_covariance(C) is cached


def test_null_coordinates_solve_is_the_papers_update():
    """`alphaedit_null_update` (r × r system in U's coordinates) gives `alphaedit_update`'s ΔW with every term:
    previous keys, neighbour keys, λ_∅ C and the drift D."""
    K, R, _, C, Kp = _problem(6)
    C_spec, _, _ = spectrum_covariance(D_IN, large=7, seed=8)
    U = null_space_basis(C_spec, tau=2e-2)
    P = projector(U)
    Kn = torch.randn(D_IN, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    D = torch.randn(R.shape[0], D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    paper = alphaedit_update(K, R, P, Kp @ Kp.T, 10.0, C, 5.0, D=D, Kn=Kn)
    ours = alphaedit_null_update(
        K, R, U, U.T @ Kp @ Kp.T @ U, 10.0, 5.0, U_C_U=U.T @ C @ U, U_C=U.T @ C, D=D, Kn=Kn
    )
    assert torch.allclose(ours, paper, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ours @ P, ours, atol=1e-10)  # ΔW = ΔW P: preserved keys untouched
    plain = alphaedit_null_update(K, R, U, torch.zeros(U.shape[1], U.shape[1]), 10.0)
    assert torch.allclose(
        plain, alphaedit_update(K, R, P, torch.zeros(D_IN, D_IN), 10.0), rtol=1e-9, atol=1e-12
    )


def test_kernel_solve_is_the_papers_update():
    """`alphaedit_kernel_update` (m × m system in the keys' coordinates) gives `alphaedit_update`'s ΔW (λ_∅ = 0)
    with previous and neighbour keys, through U or through its complement V, and with the previous keys as any
    factor of Σ Kp Kpᵀ."""
    K, R, _, _, Kp = _problem(6)
    Kn = torch.randn(D_IN, 4, dtype=torch.float64, generator=_gen(9))
    for large in (3, 9):  # a null space of 9 directions (held as U) and of 3 (held as V)
        C_spec, _, _ = spectrum_covariance(D_IN, large=large, seed=8)
        basis, complement = null_space_split(C_spec, tau=2e-2)
        assert complement == (large < D_IN / 2)
        assert basis.shape[1] == min(large, D_IN - large)
        eye = torch.eye(D_IN, dtype=torch.float64)
        P = eye - projector(basis) if complement else projector(basis)
        # the same null space as `null_space_basis` (each orthonormalised from the float32 decomposition apart)
        assert torch.allclose(P, projector(null_space_basis(C_spec, tau=2e-2)), atol=1e-5)
        paper = alphaedit_update(K, R, P, Kp @ Kp.T, 10.0, Kn=Kn)
        ours = alphaedit_kernel_update(K, R, basis, complement, 10.0, Kp, Kn)
        assert torch.allclose(ours, paper, rtol=1e-9, atol=1e-12)
        many = torch.randn(D_IN, 3 * D_IN, dtype=torch.float64, generator=_gen(11))  # more keys than rows
        factor = torch.linalg.qr(many.T, mode="r")[1].T
        assert torch.allclose(
            alphaedit_kernel_update(K, R, basis, complement, 10.0, factor),
            alphaedit_update(K, R, P, many @ many.T, 10.0),
            rtol=1e-8,
            atol=1e-11,
        )
        first = alphaedit_kernel_update(K, R, basis, complement, 10.0)
        assert torch.allclose(
            first, alphaedit_update(K, R, P, torch.zeros(D_IN, D_IN), 10.0), rtol=1e-9, atol=1e-12
        )


def test_layer_state_keeps_the_previous_keys_current():
    """The default solve reads the earlier batches' keys from the layer state (`previous_keys`, kept current
    by `add_keys`, compressed to a d_in-column factor once there are more); λ_∅'s solve reads Uᵀ Kp Kpᵀ U, which
    `add_keys` grows by (Uᵀ K)(Uᵀ K)ᵀ, and forms U from a held complement. Each equals the formula evaluated on the
    grown Σ Kp Kpᵀ from scratch."""
    from edit2deploy.methods.editor import LayerState

    K, R, _, C, Kp = _problem(5)
    C_spec, _, _ = spectrum_covariance(D_IN, large=3, seed=6)
    V, complement = null_space_split(C_spec, tau=2e-2)
    assert complement
    state = LayerState(D_IN, null_basis=V, complement=True)
    P = torch.eye(D_IN, dtype=torch.float64) - projector(V)
    cfg = EditConfig()
    first = METHODS["default"].solve(K, R, C, state, cfg)
    assert torch.allclose(first, alphaedit_update(K, R, P, torch.zeros(D_IN, D_IN), cfg.alpha), rtol=1e-9)
    assert state.previous_keys() is None  # no earlier batches
    state.add_keys(Kp[:, :3])
    assert torch.equal(state.previous_keys(), Kp[:, :3])
    state.add_keys(Kp[:, 3:])  # grows the matrix formed above
    assert torch.equal(state.previous_keys(), Kp)
    later = METHODS["default"].solve(K, R, C, state, cfg)
    assert torch.allclose(later, alphaedit_update(K, R, P, Kp @ Kp.T, cfg.alpha), rtol=1e-9)
    assert not torch.allclose(later, first, rtol=1e-3)
    many = torch.randn(D_IN, 2 * D_IN, dtype=torch.float64, generator=_gen(12))
    state.add_keys(many)  # past d_in columns: a (d_in, d_in) factor of the same Σ Kp Kpᵀ
    all_keys = torch.cat([Kp, many], dim=1)
    assert state.previous_keys().shape == (D_IN, D_IN)
    assert torch.allclose(state.previous_keys() @ state.previous_keys().T, all_keys @ all_keys.T, rtol=1e-10)
    # λ_∅ works in U's coordinates: U is formed from V, Uᵀ Kp Kpᵀ U from the keys
    lam = EditConfig(lambda_null=5.0)
    dW = METHODS["default"].solve(K, R, C, state, lam)
    assert not state.complement and torch.allclose(projector(state.null_basis), P, atol=1e-10)
    U = state.null_basis
    assert torch.allclose(state.null_previous(), U.T @ all_keys @ all_keys.T @ U, rtol=1e-10, atol=1e-12)
    assert torch.allclose(dW, alphaedit_update(K, R, P, all_keys @ all_keys.T, lam.alpha, C, 5.0), rtol=1e-9)
    state.add_keys(Kp)  # grows the r × r product formed above
    grown = torch.cat([all_keys, Kp], dim=1)
    assert torch.allclose(state.null_previous(), U.T @ grown @ grown.T @ U, rtol=1e-10, atol=1e-12)
    # a state read back from a ledger (the batches' keys) solves the same
    fresh = LayerState(D_IN, previous=[Kp[:, :3], Kp[:, 3:]], null_basis=V, complement=True)
    assert torch.allclose(METHODS["default"].solve(K, R, C, fresh, cfg), later, rtol=1e-10)


def test_solves_accept_float32_inputs_and_compute_in_float64():
    K, R, _, C, _ = _problem(4)
    dW32 = memit_update(K.float(), R.float(), C.float(), 3.0)
    assert dW32.dtype == torch.float64
    assert torch.allclose(dW32, memit_update(K.float().double(), R.float().double(), C.float().double(), 3.0))


# ================================================================ subject location
@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    """SmolLM2's tokenizer without BOS (as shipped) and with BOS prepended (like Llama's or Gemma's)."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    bos = AutoTokenizer.from_pretrained(tiny_model_dir("llama"), add_bos_token=True)
    assert plain("x")["input_ids"][0] != plain.bos_token_id
    assert bos("x")["input_ids"][0] == bos.bos_token_id
    return {"plain": plain, "bos": bos}


LOCATE_CASES = [
    # (prompt, subject, the text the subject's last token decodes to)
    ("{} is located in the city of", "The Eiffel Tower", " Tower"),  # start, leading "The"
    ("Where is {} located? In", "the Eiffel Tower", " Tower"),  # middle
    ("The mother tongue of {} is", "Danielle Darrieux", "ux"),  # middle, word split into pieces
    ("My favourite city to visit is {}", "Paris", " Paris"),  # end
    ("{}", "Paris", "Paris"),  # the whole prompt
    ("{}'s capital is", "France", "France"),  # a suffix right after the subject
]


@pytest.mark.parametrize("kind", ["plain", "bos"])
@pytest.mark.parametrize(("prompt", "subject", "last_piece"), LOCATE_CASES)
def test_locate_subject_last_token(tokenizers, kind, prompt, subject, last_piece):
    tok = tokenizers[kind]
    req = EditRequest(prompt=prompt, subject=subject, target_new="x")
    loc = locate_in_template(tok, "{}", req)
    assert loc.ids == tok(req.text)["input_ids"]
    assert tok.decode(loc.ids[loc.subject_last]) == last_piece
    # Everything up to and including that token spells the text up to the end of the subject
    head = tok.decode(loc.ids[: loc.subject_last + 1], skip_special_tokens=True)
    assert head == req.text[: prompt.index("{}") + len(subject)]
    # MEMIT's way (tokenize the text up to the subject's end; no merge across the boundary here)
    start = prompt.index("{}")
    assert loc.subject_last == len(tok(req.text[: start + len(subject)])["input_ids"]) - 1
    # BOS shifts the index by exactly one
    other = tokenizers["plain" if kind == "bos" else "bos"]
    shift = 1 if kind == "bos" else -1
    assert locate_in_template(other, "{}", req).subject_last == loc.subject_last - shift


@pytest.mark.parametrize("kind", ["plain", "bos"])
def test_locate_in_prefixed_template(tokenizers, kind):
    tok = tokenizers[kind]
    req = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome")
    bare = locate_in_template(tok, "{}", req)
    for prefix in ("Because it rained all day", "The Eiffel Tower is old"):  # the subject also in the prefix
        template = prefix + ". {}"
        loc = locate_in_template(tok, template, req)
        text = template.replace("{}", req.text)
        assert loc.ids == tok(text)["input_ids"]
        assert tok.decode(loc.ids[loc.subject_last]) == " Tower"
        # the occurrence in the prompt, not the one in the prefix
        assert tok.decode(loc.ids[loc.subject_last + 1 :]) == " is located in"
        head = tok.decode(loc.ids[: loc.subject_last + 1], skip_special_tokens=True)
        assert head == prefix + ". The Eiffel Tower"
        # same tokens after the subject as in the bare prompt
        assert loc.ids[loc.subject_last + 1 :] == bare.ids[bare.subject_last + 1 :]


def test_locate_subject_merged_with_neighbour(tokenizers):
    """A token that straddles the subject's end ("Par|iser" for the subject "Paris") is its last token."""
    tok = tokenizers["plain"]
    loc = locate_subject(tok, "Pariser Platz", 0, len("Paris"))
    spans = tok("Pariser Platz", return_offsets_mapping=True)["offset_mapping"]
    s, e = spans[loc.subject_last]
    assert s < len("Paris") < e  # the straddling token ("iser")
    assert tok.decode(loc.ids[: loc.subject_last + 1]) == "Pariser"
    assert locate_subject(tok, "Parisians love", 0, len("Paris")).subject_last == 0  # clean boundary
    with pytest.raises(ValueError, match="not found"):
        locate_subject(tok, "abc", 10, 12)


# ================================================================ target values z (batched, MPES)
REQUESTS = [
    EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", id="a"),
    EditRequest(
        prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English", id="b"
    ),
    EditRequest(prompt="{} plays the sport of", subject="Lionel Messi", target_new="ice hockey", id="c"),
]
PREFIXES = ["Because it rained all day", "The weather"]
RETRY_CASES = 12  # CounterFact val cases of the real-model retry test


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    """A shared tiny llama (2 layers). Tests that change weights use `fresh_llama` instead."""
    return open_model(tiny_model_dir("llama"))


@pytest.fixture
def fresh_llama(tiny_model_dir):
    return open_model(tiny_model_dir("llama"))


def _z(lm, reqs, templates, hp, z_layer=0):
    return optimise_values(lm, reqs, templates, z_layer, hp, quiet=True)


def _target_logprob(lm, req: EditRequest, z_layer: int, delta: torch.Tensor | None) -> float:
    """Mean log p(target_new | bare prompt) with `delta` added to block z_layer's output at the subject."""
    tok, model = lm.tokenizer, lm.model
    loc = locate_in_template(tok, "{}", req)
    target = tok(" " + req.target_new, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([loc.ids + target[:-1]])

    def hook(_m, _i, out):
        if delta is None:
            return out
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[0, loc.subject_last] += delta.float()
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.get_submodule(lm.arch.block_name(z_layer)).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    finally:
        handle.remove()
    first = len(loc.ids) - 1
    return float(sum(logp[first + j, t] for j, t in enumerate(target)) / len(target))


def test_bf16_autocast_values_close_to_float32(tiny_llama):
    """bf16 autocast (the default on CPUs with native bf16) finds nearly the float32 δ."""
    templates = context_templates(PREFIXES)
    base = {"lr": 0.05, "max_steps": 3, "mpes": False, "loss_stop": 0.0}
    f32 = _z(tiny_llama, REQUESTS, templates, ValueHParams(**base, dtype="float32"))
    bf16 = _z(tiny_llama, REQUESTS, templates, ValueHParams(**base, dtype="bfloat16"))
    rel = (f32.delta - bf16.delta).norm() / f32.delta.norm()
    assert 0 < rel < 0.1, rel


@pytest.mark.parametrize("lr", [0.5, 0.05])  # δ on the clamp sphere after one step / inside the ball
def test_batched_values_equal_one_request_at_a_time(tiny_llama, lr):
    """All requests share one padded forward/backward per step; Adam is per element, so the result must be
    what optimising each request alone gives (same steps, MPES off). float32 matmuls: this is an exactness
    check of the batching; bf16 autocast is checked separately below."""
    templates = context_templates(PREFIXES)
    hp = ValueHParams(lr=lr, max_steps=3, mpes=False, loss_stop=0.0, dtype="float32")
    batched = _z(tiny_llama, REQUESTS, templates, hp)
    assert batched.z.shape == (64, 3) and batched.z.dtype == torch.float64
    assert batched.steps == [3, 3, 3]
    for i, r in enumerate(REQUESTS):
        alone = _z(tiny_llama, [r], templates, hp)
        assert alone.steps == [3]
        assert torch.allclose(batched.z[:, i], alone.z[:, 0], atol=1e-4, rtol=1e-4), r.id
    # z = h + δ with 0 < ‖δ‖ ≤ clamp·‖h‖, and δ raises p(target_new)
    _, h = keys_and_outputs(tiny_llama, REQUESTS, templates, 0, 0)
    delta = batched.z - h
    for i, r in enumerate(REQUESTS):
        assert 0 < delta[:, i].norm() <= hp.clamp * h[:, i].norm() * (1 + 1e-5)
        assert (
            _target_logprob(tiny_llama, r, 0, delta[:, i]) > _target_logprob(tiny_llama, r, 0, None) + lr / 5
        )


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("z_layer", [0, 2])
def test_prefix_cache_steps_equal_whole_rows(tiny_model_dir, family, z_layer):
    """Each step runs only the tokens from the subject on, attending to cached keys/values of the tokens
    before it. That is exact: δ, steps and convergence equal whole-row steps (float32, MPES on)."""
    lm = open_model(tiny_model_dir(family, layers=4))
    templates = context_templates(PREFIXES)
    hp = ValueHParams(lr=0.05, max_steps=4, mpes=True, dtype="float32")
    cached = _z(lm, REQUESTS, templates, hp, z_layer)
    whole = _z(lm, REQUESTS, templates, dataclasses.replace(hp, prefix_cache=False), z_layer)
    assert cached.steps == whole.steps and cached.converged == whole.converged
    assert cached.delta.abs().max() > 1e-3
    assert torch.allclose(cached.z, whole.z, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_frozen_linears_on_onednn_match_the_stock_path(tiny_llama):
    """Inside the context every frozen fp32 linear goes through oneDNN (packed weights) with the stock
    outputs and input gradients; trainable linears and subclasses (own forward) keep the stock path; leaving
    restores every forward."""
    torch.manual_seed(0)
    block = tiny_llama.model.get_submodule(tiny_llama.arch.block_name(1))
    trainable = torch.nn.Linear(64, 64)
    subclass = type("OwnForwardLinear", (torch.nn.Linear,), {})(64, 64).requires_grad_(False)
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) >= 7
    x = torch.randn(3, 9, 64, requires_grad=True)
    stock = linears[0](x)
    (g_stock,) = torch.autograd.grad(stock.pow(2).sum(), x)
    mlp = block.mlp
    y_stock = mlp(x)
    with frozen_linears_on_onednn([block, trainable, subclass]):
        assert all("forward" in vars(m) for m in linears)
        assert "forward" not in vars(trainable) and "forward" not in vars(subclass)
        fast = linears[0](x)
        (g_fast,) = torch.autograd.grad(fast.pow(2).sum(), x)
        y_fast = mlp(x)
    assert not any("forward" in vars(m) for m in linears)
    assert torch.allclose(fast, stock, atol=1e-5) and torch.allclose(g_fast, g_stock, atol=1e-5)
    assert torch.allclose(y_fast, y_stock, atol=1e-5)


@pytest.mark.skipif(not onednn_available(torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_bf16_packed_linears_match_fp32_to_bf16_precision(tiny_llama):
    """With bf16 packs the frozen linears take and return float32 and agree with the fp32 product (forward and
    input gradient) to bf16 precision, as autocast's bf16 linears do."""
    torch.manual_seed(0)
    block = tiny_llama.model.get_submodule(tiny_llama.arch.block_name(1))
    lin = block.mlp.down_proj
    x = torch.randn(4, 7, lin.in_features, requires_grad=True)
    ref = lin(x)
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lin(x).float()
    with frozen_linears_on_onednn([block], torch.bfloat16):
        fast = lin(x)
        (g_fast,) = torch.autograd.grad(fast.pow(2).sum(), x)
    assert fast.dtype == torch.float32 and g_fast.dtype == torch.float32

    def rel(a, b):
        return float((a - b).detach().norm() / b.detach().norm())

    assert 0 < rel(fast, ref) < 1e-2 and rel(g_fast, g_ref) < 2e-2
    assert rel(fast, ref) < 2 * rel(auto, ref) + 1e-3  # no worse than autocast's bf16


@pytest.mark.skipif(not onednn_available(torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_bf16_values_through_packed_linears_match_autocast(tiny_model_dir):
    """bf16 z-optimisation through bf16-packed oneDNN linears reaches the δ of bf16 autocast (same precision of
    the products, the rest in float32) and of float32 to bf16 precision."""
    lm = open_model(tiny_model_dir("llama", layers=4))
    templates = context_templates(PREFIXES)
    hp = ValueHParams(lr=0.05, max_steps=4, mpes=False, loss_stop=0.0, dtype="bfloat16")
    packed = _z(lm, REQUESTS, templates, hp, 1)
    auto = _z(lm, REQUESTS, templates, dataclasses.replace(hp, onednn=False), 1)
    fp32 = _z(lm, REQUESTS, templates, dataclasses.replace(hp, dtype="float32"), 1)
    assert packed.steps == auto.steps == fp32.steps
    assert fp32.delta.abs().max() > 1e-3
    for other in (auto, fp32):
        assert float((packed.delta - other.delta).norm() / other.delta.norm()) < 5e-2


def test_bf16_values_fall_back_to_autocast_without_onednn_bf16(tiny_model_dir, monkeypatch):
    """On a CPU where oneDNN has no bf16 (AVX2 only), bf16 z-optimisation runs under autocast: the same δ as
    with oneDNN turned off."""
    import edit2deploy.methods.values as values_mod

    lm = open_model(tiny_model_dir("llama", layers=4))
    templates = context_templates(PREFIXES)
    hp = ValueHParams(lr=0.05, max_steps=3, mpes=False, loss_stop=0.0, dtype="bfloat16")
    stock = _z(lm, REQUESTS, templates, dataclasses.replace(hp, onednn=False), 1)
    monkeypatch.setattr(values_mod, "onednn_available", lambda dtype=torch.float32: dtype == torch.float32)
    fallback = _z(lm, REQUESTS, templates, hp, 1)
    assert stock.delta.abs().max() > 1e-3
    assert torch.equal(fallback.delta, stock.delta) and fallback.steps == stock.steps


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_onednn_values_equal_the_stock_path(tiny_model_dir, family):
    """z-optimisation through oneDNN's linears takes the same steps to the same δ as the stock matmuls."""
    lm = open_model(tiny_model_dir(family, layers=4))
    templates = context_templates(PREFIXES)
    hp = ValueHParams(lr=0.05, max_steps=4, mpes=True, dtype="float32")
    fast = _z(lm, REQUESTS, templates, hp, 1)
    stock = _z(lm, REQUESTS, templates, dataclasses.replace(hp, onednn=False), 1)
    assert fast.steps == stock.steps and fast.converged == stock.converged
    assert stock.delta.abs().max() > 1e-3
    assert torch.allclose(fast.z, stock.z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_key_passes_resume_where_the_last_update_was(tiny_model_dir, family):
    """Each key pass of a spread resumes at the block the previous layer's update first changed: after an
    update there, its keys and z-layer outputs equal a fresh pass from the embeddings."""
    lm = open_model(tiny_model_dir(family, layers=4))
    templates = context_templates(PREFIXES)
    passes = KeyPasses(lm, REQUESTS, templates, z_layer=3)
    gen = torch.Generator().manual_seed(0)
    for li in (1, 2, 3):
        K, h = passes(li)
        K0, h0 = keys_and_outputs(lm, REQUESTS, templates, li, 3)
        assert torch.allclose(K, K0, atol=1e-6) and torch.allclose(h, h0, atol=1e-6), li
        W = lm.arch.get_weight(lm.model, li)
        with torch.no_grad():
            W.add_(0.5 * torch.randn(W.shape, generator=gen) * W.std())
    with pytest.raises(ValueError, match="ascending"):
        passes(1)


def _easy_request(lm) -> EditRequest:
    """A request whose target is already the model's top-1 after the bare prompt (converged at step 0)."""
    tok = lm.tokenizer
    for subject in ("Paris", "Rome", "Berlin", "Tokyo", "Madrid", "Oslo", "Cairo", "Lima"):
        text = f"The city of {subject}"
        with torch.no_grad():
            top = int(lm.model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0, -1].argmax())
        piece = tok.decode([top])
        if (
            piece.startswith(" ")
            and piece.strip()
            and tok(piece, add_special_tokens=False)["input_ids"] == [top]
        ):
            return EditRequest(prompt="The city of {}", subject=subject, target_new=piece[1:], id="easy")
    pytest.skip("no prompt whose top-1 is a round-tripping word")


def test_mpes_stops_each_request_on_its_own_and_freezes_it(tiny_llama):
    templates = context_templates([])  # the bare prompt only: the easy request is converged from the start
    easy = _easy_request(tiny_llama)
    hard = [REQUESTS[1], REQUESTS[2]]
    # a small lr keeps δ inside the clamp ball, where momentum alone would visibly move a finished request
    hp = ValueHParams(lr=0.05, max_steps=4, mpes=True, mpes_extra=1, dtype="float32")
    res = _z(tiny_llama, [easy, *hard], templates, hp)
    assert res.converged == [True, False, False]
    assert res.steps == [1, 4, 4]  # the easy one: converged at step 0, then `mpes_extra` more steps
    # Its δ stayed frozen while the others went on: the same z as optimising it alone (which stops after 1 step)
    alone = _z(tiny_llama, [easy], templates, hp)
    assert alone.steps == [1]
    _, h = keys_and_outputs(tiny_llama, [easy], templates, 0, 0)
    assert 0 < (alone.z - h).norm() < 0.5 * hp.clamp * h.norm()
    assert torch.allclose(res.z[:, 0], alone.z[:, 0], atol=1e-5)
    # ...and not what 4 steps would have given it (Adam's momentum alone would have moved it)
    longer = _z(tiny_llama, [easy], templates, dataclasses.replace(hp, mpes=False, loss_stop=0.0))
    assert longer.steps == [4]
    assert (longer.z[:, 0] - res.z[:, 0]).norm() > 1e-3
    # the hard ones are unaffected by the easy one's early exit
    for j, r in enumerate(hard, start=1):
        assert torch.allclose(res.z[:, j], _z(tiny_llama, [r], templates, hp).z[:, 0], atol=1e-4)
    # mpes_extra = 0: stops at once, δ = 0
    res0 = _z(tiny_llama, [easy], templates, dataclasses.replace(hp, mpes_extra=0))
    assert res0.steps == [0] and res0.converged == [True]
    assert torch.allclose(res0.z, h, atol=1e-6)


def test_a_finished_request_runs_no_forward_after_its_last_step(tiny_llama, monkeypatch):
    """Once its `mpes_extra` steps are used up a request is done whatever the next forward says, so it is not
    in that forward: forwards per request = steps, plus the final one for requests that hit max_steps."""
    templates = context_templates([])
    easy = _easy_request(tiny_llama)
    seen: list[int] = []  # the owner of every row of every forward
    forward = values_mod._Batch.forward

    def counting(self, sel, delta):
        seen.extend(self.rows[i].owner for i in sel)
        return forward(self, sel, delta)

    monkeypatch.setattr(values_mod._Batch, "forward", counting)
    hp = ValueHParams(lr=0.05, max_steps=4, mpes=True, mpes_extra=1, dtype="float32")
    res = _z(tiny_llama, [easy, REQUESTS[1]], templates, hp)
    assert res.steps == [1, 4] and res.converged[0]
    rows_each = 2  # the bare prompt and the KL prompt
    assert [seen.count(o) / rows_each for o in (0, 1)] == [1, 5]


# ================================================================ Editor: solve wiring, null space, atomicity
def _identity_stats(lm, layers):
    d_in = lm.arch.to_out_in(lm.arch.get_weight(lm.model, 0)).shape[1]
    return {li: torch.eye(d_in, dtype=torch.float64) for li in layers}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_editor_reaches_the_target_values(tiny_model_dir, family):
    """MEMIT with a vanishing λ_p interpolates: after the last layer's solve, the z layer's output at the
    subject is z (checks transposes, the spread over layers and R = z − h)."""
    lm = open_model(tiny_model_dir(family))
    layers = (0, 1)
    hp = ValueHParams(max_steps=2, mpes=False, loss_stop=0.0, dtype="float32")
    cfg = EditConfig(method="memit", layers=layers, lambda_p=1e-8, values=hp)
    reqs = REQUESTS[:2]
    templates = context_templates([])
    z = _z(lm, reqs, templates, hp, z_layer=1).z
    w0 = {li: lm.arch.get_weight(lm.model, li).detach().clone() for li in layers}
    editor = Editor(lm, cfg, _identity_stats(lm, layers), prefixes=[], quiet=True)
    report = editor.apply_batch(reqs)
    _, h_after = keys_and_outputs(lm, reqs, templates, 1, 1)
    assert torch.allclose(h_after, z, atol=1e-3 * z.abs().max())
    for li in layers:
        W = lm.arch.get_weight(lm.model, li)
        assert torch.equal(W, w0[li] + report.deltas[li])  # the recorded delta is what was added
        assert report.deltas[li].shape == W.shape
        assert torch.allclose(editor.state[li].KpKpT(), report.keys[li] @ report.keys[li].T)


def test_editor_default_method_preserves_the_preserved_subspace(fresh_llama):
    """After a real batch with the default method, the edited layer's output on keys from C's dominant
    eigenspace is unchanged (to 1e-5), while keys in the null space do see the edit."""
    lm = fresh_llama
    layers = (0, 1)
    d_ff = lm.arch.get_weight(lm.model, 0).shape[1]
    stats, preserved, free = {}, {}, {}
    for li in layers:
        C, Q_large, Q_small = spectrum_covariance(d_ff, large=96, seed=li)
        stats[li], preserved[li], free[li] = C, Q_large, Q_small
    cfg = EditConfig(method="default", layers=layers, values=ValueHParams(max_steps=3))
    editor = Editor(lm, cfg, stats, prefixes=PREFIXES, quiet=True)
    assert editor.cfg.values.mpes  # the default method is AlphaEdit's solve + MPES
    for li in layers:
        # the null space (d_ff − 96 of d_ff = 128 directions) is held as U, the smaller of U and V
        assert not editor.state[li].complement and editor.state[li].null_basis.shape == (d_ff, d_ff - 96)
    before = {li: lm.arch.get_weight(lm.model, li).detach().clone() for li in layers}
    editor.apply_batch(REQUESTS)
    g = _gen(5)
    for li in layers:
        down = lm.model.get_submodule(lm.arch.mlp_out_name(li))
        W_after = down.weight.detach().clone()
        assert (W_after - before[li]).norm() > 1e-3  # the edit did something
        keys = (preserved[li] @ torch.randn(96, 40, generator=g, dtype=torch.float64)).float().T
        with torch.no_grad():
            out_after = down(keys)
            down.weight.copy_(before[li])
            out_before = down(keys)
            down.weight.copy_(W_after)
        assert (out_after - out_before).abs().max() < 1e-5, li
        free_keys = (free[li] @ torch.randn(32, 5, generator=g, dtype=torch.float64)).float().T
        assert ((W_after - before[li]) @ free_keys.T).abs().max() > 1e-3


def test_editor_batch_with_non_finite_solve_changes_nothing(fresh_llama, monkeypatch):
    """A NaN at the second layer's solve: the first layer (already updated) is restored bit for bit."""
    lm = fresh_llama
    layers = (0, 1)
    spec = METHODS["memit"]
    calls = []

    def solve(K, R, C, state, cfg, drift=None, Kn=None):
        calls.append(1)
        dW = spec.solve(K, R, C, state, cfg, drift, Kn)
        return dW * float("nan") if len(calls) == 2 else dW

    monkeypatch.setitem(METHODS, "memit", dataclasses.replace(spec, solve=solve))
    cfg = EditConfig(method="memit", layers=layers, values=ValueHParams(max_steps=1))
    editor = Editor(lm, cfg, _identity_stats(lm, layers), prefixes=[], quiet=True)
    before = {li: lm.arch.get_weight(lm.model, li).detach().clone() for li in layers}
    with pytest.raises(NonFiniteUpdateError, match="layer 1"):
        editor.apply_batch(REQUESTS[:1])
    assert len(calls) == 2
    for li in layers:
        assert torch.equal(lm.arch.get_weight(lm.model, li), before[li])
        assert not editor.state[li].previous  # the failed batch's keys did not join the state


def test_editor_retry_resolves_failed_edits_from_the_pre_batch_weights(tiny_model_dir):
    """`retry_rounds`: edits that fail after the solve get more δ (optimised on the edited model) and the batch
    is solved again from the pre-batch weights: what is applied is that last solve alone and the method state
    holds the batch's keys once (that it makes edits take is checked on SmolLM2, below)."""
    from edit2deploy.methods.retry import failed_edits

    layers = (0, 1)
    # a heavy λ_p and few steps: the solve reaches only part of each target, so edits fail
    hp = ValueHParams(max_steps=3, mpes=True, dtype="float32")
    cfg = EditConfig(method="memit", layers=layers, lambda_p=30.0, values=hp)
    plain_lm = open_model(tiny_model_dir("llama"))
    plain = Editor(plain_lm, cfg, _identity_stats(plain_lm, layers), prefixes=PREFIXES, quiet=True)
    report = plain.apply_batch(REQUESTS)
    assert report.retry is None and "retry" not in report.timings
    failing = [REQUESTS[i].id for i in failed_edits(plain, REQUESTS)]
    assert failing  # the precondition: something to retry

    lm = open_model(tiny_model_dir("llama"))
    editor = Editor(
        lm,
        dataclasses.replace(cfg, retry_rounds=2),
        _identity_stats(lm, layers),
        prefixes=PREFIXES,
        quiet=True,
    )
    before = editor.weights()
    report = editor.apply_batch(REQUESTS)
    rounds = report.retry["rounds"]
    assert rounds and rounds[0]["retried"] == failing  # the same first solve, then the failed ones again
    assert len(rounds[0]["steps"]) == len(failing) and report.timings["retry"] > 0
    assert report.retry["failed"] == [REQUESTS[i].id for i in failed_edits(editor, REQUESTS)]
    for li in layers:
        W = lm.arch.get_weight(lm.model, li)
        assert torch.equal(W, before[li] + report.deltas[li])  # the last solve, from the pre-batch weights
        K = report.keys[li].double()
        assert torch.allclose(editor.state[li].KpKpT(), K @ K.T)  # the batch's keys counted once


def test_neighbour_requests_ask_the_same_question_about_other_names():
    from edit2deploy.methods.neighbours import neighbour_requests

    names = ["Ada Lovelace", "Danielle Darrieux", "Alan Turing", "Grace Hopper", "Kurt Gödel"]
    near = neighbour_requests(REQUESTS, names, 3)
    assert len(near) == 3 * len(REQUESTS)
    for i, r in enumerate(REQUESTS):
        mine = near[3 * i : 3 * i + 3]
        assert all(n.prompt == r.prompt and n.subject in names for n in mine)
        assert r.subject not in {n.subject for n in mine} and len({n.subject for n in mine}) == 3
    assert neighbour_requests(REQUESTS, names, 3) == near  # the same draw every time
    assert len(neighbour_requests(REQUESTS[:1], names, 10)) == len(names)  # never more than there are


def test_editor_neighbour_keys_hold_the_same_prompt_about_other_names(tiny_model_dir):
    """`neighbour_weight`: the solve holds each request's prompt asked about other names; a heavy weight
    keeps their keys' outputs (‖ΔW Kn‖ falls) while the edit's own keys still move. `neighbour_kept` adds
    them to the previous keys (and so to the ledger's batch keys); without names it is a usage error."""
    from edit2deploy.methods.keys import KeyPasses
    from edit2deploy.methods.neighbours import neighbour_requests

    layers = (0, 1)
    names = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Kurt Gödel", "Emmy Noether", "Paris Hilton"]
    hp = ValueHParams(max_steps=4, mpes=False, dtype="float32")
    # C = I: no null space; text contexts only (one key column per fact)
    base = EditConfig(method="memit", layers=layers, lambda_p=0.1, values=hp, chat_contexts="off")
    moved = {}
    for weight in (0.0, 1e4):
        lm = open_model(tiny_model_dir("llama"))
        cfg = dataclasses.replace(base, neighbour_weight=weight, neighbour_names=4)
        editor = Editor(lm, cfg, _identity_stats(lm, layers), prefixes=PREFIXES, quiet=True, names=names)
        report = editor.apply_batch(REQUESTS)
        near = neighbour_requests(REQUESTS, names, 4)
        Kn, _ = KeyPasses(lm, near, editor.templates, z_layer=1)(0)  # layer 0's input: unchanged by edits
        dW = lm.arch.to_out_in(report.deltas[0]).double()
        moved[weight] = (float((dW @ Kn).norm()), float((dW @ report.keys[0]).norm()))
        assert report.keys[0].shape[1] == len(REQUESTS)  # not kept: the batch's own keys only
    assert moved[1e4][0] < 0.05 * moved[0.0][0]
    assert moved[1e4][1] > 0.2 * moved[0.0][1]

    lm = open_model(tiny_model_dir("llama"))
    cfg = dataclasses.replace(base, neighbour_weight=1.0, neighbour_names=2, neighbour_kept=True)
    editor = Editor(lm, cfg, _identity_stats(lm, layers), prefixes=PREFIXES, quiet=True, names=names)
    report = editor.apply_batch(REQUESTS)
    K = report.keys[0].double()
    assert K.shape[1] == len(REQUESTS) * 3  # the requests' keys and two neighbours each
    assert torch.allclose(editor.state[0].KpKpT(), K @ K.T)
    with pytest.raises(UsageError, match="names"):
        Editor(lm, cfg, _identity_stats(lm, layers), prefixes=PREFIXES, quiet=True)
    with pytest.raises(UsageError, match="null space"):
        null = dataclasses.replace(cfg, neighbour_null=True)
        Editor(lm, null, _identity_stats(lm, layers), prefixes=PREFIXES, quiet=True, names=names)


def test_editor_neighbour_null_takes_the_neighbours_out_of_the_null_space(tiny_model_dir):
    """`neighbour_null`: the batch's null space is that of C plus the neighbours' covariance, so AlphaEdit's
    update barely moves the neighbour keys; the persisted basis stays C's own."""
    from edit2deploy.methods.keys import KeyPasses
    from edit2deploy.methods.neighbours import neighbour_requests

    layers = (0, 1)
    names = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Kurt Gödel", "Emmy Noether", "Paris Hilton"]
    hp = ValueHParams(max_steps=4, mpes=False, dtype="float32")
    moved, bases = {}, {}
    for weight in (0.0, 1.0):
        lm = open_model(tiny_model_dir("llama"))
        d_in = lm.arch.to_out_in(lm.arch.get_weight(lm.model, 0)).shape[1]
        stats = {li: torch.diag(torch.logspace(0, -4, d_in, dtype=torch.float64)) for li in layers}
        cfg = EditConfig(
            method="alphaedit",
            layers=layers,
            values=hp,
            neighbour_weight=weight,
            neighbour_names=4,
            neighbour_null=True,
            chat_contexts="off",
        )
        editor = Editor(lm, cfg, stats, prefixes=PREFIXES, quiet=True, names=names)
        basis = editor.state[0].null_basis.clone()
        report = editor.apply_batch(REQUESTS)
        assert torch.equal(editor.state[0].null_basis, basis)  # not persisted
        Kn, _ = KeyPasses(lm, neighbour_requests(REQUESTS, names, 4), editor.templates, z_layer=1)(0)
        dW = lm.arch.to_out_in(report.deltas[0]).double()
        moved[weight] = float((dW @ Kn).norm() / Kn.norm()), float(dW.norm())
        bases[weight] = basis
    assert torch.equal(bases[0.0], bases[1.0])
    assert moved[1.0][0] < 0.2 * moved[0.0][0] and moved[1.0][1] > 0  # neighbours held, still an update


PRESERVED = [
    EditRequest(prompt="{} is located in the city of", subject="Big Ben", target_new="Paris", id="p1"),
    EditRequest(prompt="The mother tongue of {} is", subject="Jean Gabin", target_new="German", id="p2"),
    EditRequest(prompt="{} plays the sport of", subject="Roger Federer", target_new="golf", id="p3"),
]


def test_preserved_keys_are_the_keys_an_edit_would_use(tiny_model_dir):
    """`preserved_keys` (every layer in one pass) gives the same ½ bare + ½ prefixed keys as the edit's
    own per-layer key passes."""
    from edit2deploy.methods.keys import KeyPasses, context_templates
    from edit2deploy.methods.preserved import preserved_keys

    lm = open_model(tiny_model_dir("llama"))
    templates = context_templates(PREFIXES)
    got = preserved_keys(lm, PRESERVED, templates, (0, 1), quiet=True)
    passes = KeyPasses(lm, PRESERVED, templates, z_layer=1)
    for li in (0, 1):
        want = passes(li)[0].cpu()
        assert got[li].shape == want.shape == (want.shape[0], len(PRESERVED))
        assert torch.allclose(got[li], want, rtol=1e-5, atol=1e-6)


def test_preserved_facts_leave_the_null_space(tiny_model_dir):
    """With preserved facts, AlphaEdit's null space is that of C plus their keys' covariance: the update
    barely moves their keys, still moves the edit's own, and the basis it was built with is the persisted one.
    Methods without a null space, or `neighbour_null` beside them, are usage errors."""
    from edit2deploy.methods.keys import context_templates
    from edit2deploy.methods.preserved import preserved_keys

    layers = (0, 1)
    hp = ValueHParams(max_steps=4, mpes=False, dtype="float32")
    moved = {}
    for weight in (0.0, 1.0):
        lm = open_model(tiny_model_dir("llama"))
        d_in = lm.arch.to_out_in(lm.arch.get_weight(lm.model, 0)).shape[1]
        stats = {li: torch.diag(torch.logspace(0, -4, d_in, dtype=torch.float64)) for li in layers}
        cfg = EditConfig(method="alphaedit", layers=layers, values=hp, preserve_weight=weight)
        templates = context_templates(PREFIXES)
        keys = preserved_keys(lm, PRESERVED, templates, layers, quiet=True)
        Kf = keys[0]  # layer 0's input: never edited
        editor = Editor(lm, cfg, stats, prefixes=PREFIXES, quiet=True, preserved=keys)
        basis = editor.state[0].null_basis.clone()
        report = editor.apply_batch(REQUESTS)
        assert torch.equal(editor.state[0].null_basis, basis)
        dW = lm.arch.to_out_in(report.deltas[0]).double()
        K = report.keys[0].double()
        moved[weight] = float((dW @ Kf).norm() / Kf.norm()), float((dW @ K).norm() / K.norm())
    assert moved[1.0][0] < 0.2 * moved[0.0][0], moved  # the preserved facts' keys held
    assert moved[1.0][1] > 0.2 * moved[0.0][1], moved  # the edit's keys still move

    lm = open_model(tiny_model_dir("llama"))
    keys = preserved_keys(lm, PRESERVED, context_templates(PREFIXES), layers, quiet=True)
    with pytest.raises(UsageError, match="null space"):
        Editor(
            lm,
            EditConfig(method="memit", layers=layers),
            _identity_stats(lm, layers),
            PREFIXES,
            preserved=keys,
        )
    with pytest.raises(UsageError, match="neighbour_null"):
        cfg = EditConfig(layers=layers, neighbour_weight=1.0, neighbour_null=True)
        Editor(lm, cfg, _identity_stats(lm, layers), PREFIXES, names=["Ada Lovelace"], preserved=keys)


def test_corpus_names_join_the_preserved_facts_unless_edited(tiny_model_dir, tmp_path, monkeypatch):
    """`preserve_names`: the statistics corpus's names are preserved facts when the null space is built, except
    names occurring in the texts being edited; they are recorded in the ledger and change the basis. Off, for a
    method without a null space, or for `alphaedit` (as published), none are read."""
    from edit2deploy.methods.preserved import facts_digest
    from edit2deploy.ops import edit as editing
    from edit2deploy.ops.edit import prepare_editor

    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "Ada Lovelace wrote the first program, and Alan Turing broke codes at Bletchley Park.\n\n" * 12
    )
    seen: list[list[str]] = []
    real = editing.preserved_keys

    def spy(lm, facts, *args, **kw):
        seen.append([f.subject for f in facts])
        return real(lm, facts, *args, **kw)

    monkeypatch.setattr(editing, "preserved_keys", spy)
    model_dir = tiny_model_dir("llama")
    avoid = ["Alan Turing was born in"]
    bases = {}
    for on in (True, False):
        cfg = EditConfig(layers=(0, 1), preserve_names=on)
        editor, ledger, _ = prepare_editor(open_model(model_dir), cfg, corpus, 200, quiet=True, avoid=avoid)
        bases[on] = editor.state[0].null_dim()
        if on:
            (subjects,) = seen
            assert "Ada Lovelace" in subjects and "Bletchley Park" in subjects
            assert not any(n in avoid[0] for n in subjects)  # "Alan Turing" (and "Alan", "Turing") are edited
            assert ledger.state["preserved"] == {
                "facts": 0,
                "sha256": facts_digest([]),
                "names": len(subjects),
                "weight": 0.1,
            }
        else:
            assert len(seen) == 1 and "preserved" not in ledger.state
    assert bases[True] < bases[False]  # the names took directions out of the null space
    for method in ("memit", "alphaedit"):  # no null space / AlphaEdit as published
        prepare_editor(
            open_model(model_dir), EditConfig(method=method, layers=(0, 1)), corpus, 200, quiet=True
        )
    assert len(seen) == 1


def test_editor_null_drift_passes_the_earlier_drift_to_the_solve(fresh_llama, monkeypatch):
    """`null_drift`: each layer's solve gets D = W − W0 as it is before this batch touches it (zero on a fresh
    model, the earlier batches' sum after them; W0 from `base` when the model was edited before), and the
    registered solve subtracts λ_∅ D C P."""
    lm = fresh_llama
    layers = (0, 1)
    spec = METHODS["default"]
    seen: list[torch.Tensor] = []

    def solve(K, R, C, state, cfg, drift=None, Kn=None):
        seen.append(drift.clone())
        return spec.solve(K, R, C, state, cfg, drift, Kn)

    monkeypatch.setitem(METHODS, "default", dataclasses.replace(spec, solve=solve))
    stats = {
        li: spectrum_covariance(lm.arch.get_weight(lm.model, 0).shape[1], large=96, seed=li)[0]
        for li in layers
    }
    cfg = EditConfig(layers=layers, lambda_null=20.0, null_drift=True, values=ValueHParams(max_steps=2))
    w0 = {li: lm.arch.get_weight(lm.model, li).detach().clone() for li in layers}
    editor = Editor(lm, cfg, stats, prefixes=[], quiet=True)
    first = editor.apply_batch(REQUESTS[:1])
    assert first.deltas[0].abs().max() > 1e-4
    assert all(not d.any() for d in seen)  # nothing drifted before the first batch
    seen.clear()
    w1 = {li: lm.arch.get_weight(lm.model, li).detach().clone() for li in layers}
    editor.apply_batch(REQUESTS[1:2])
    for li, d in zip(layers, seen):
        assert torch.equal(d, lm.arch.to_out_in(w1[li] - w0[li]))  # = the first batch's ΔW, up to rounding
        assert torch.allclose(d, lm.arch.to_out_in(first.deltas[li]), atol=1e-6)
    # a later run on the edited model: W0 comes from `base` (the ledger's originals), not the current weights
    seen.clear()
    later = Editor(lm, cfg, stats, prefixes=[], quiet=True, base=w0)
    now = {li: lm.arch.get_weight(lm.model, li).detach().clone() for li in layers}
    later.apply_batch(REQUESTS[2:])
    for li, d in zip(layers, seen):
        assert torch.equal(d, lm.arch.to_out_in(now[li] - w0[li]))
    # and the drift changes the solve (λ_∅ D C P is subtracted from R Kᵀ P)
    K = torch.randn(stats[0].shape[0], 2, dtype=torch.float64)
    R = torch.randn(seen[0].shape[0], 2, dtype=torch.float64)
    state = later.state[0]
    with_d = spec.solve(K, R, stats[0], state, cfg, seen[0])
    without = spec.solve(K, R, stats[0], state, dataclasses.replace(cfg, null_drift=False), seen[0])
    assert not torch.allclose(with_d, without, rtol=1e-3)


def test_editor_method_registry_and_layer_checks(tiny_llama):
    assert set(METHODS) == {"memit", "alphaedit", "encore", "default"}
    assert METHODS["default"].mpes and METHODS["encore"].mpes
    assert not METHODS["memit"].mpes and not METHODS["alphaedit"].mpes
    stats = _identity_stats(tiny_llama, (0, 1))
    with pytest.raises(UsageError, match="unknown method 'rome'"):
        Editor(tiny_llama, EditConfig(method="rome"), stats, prefixes=[])
    with pytest.raises(UsageError, match=r"\[5\] out of range"):
        Editor(tiny_llama, EditConfig(layers=(1, 5)), stats, prefixes=[])
    ed = Editor(
        tiny_llama, EditConfig(method="memit", layers=(1, 0), chat_contexts="off"), stats, prefixes=["x"]
    )
    assert ed.layers == (0, 1) and not ed.cfg.values.mpes
    assert ed.templates == ["{}", "x. {}"]


# ================================================================ configuration and the `edit` command's usage errors
def test_parse_layers():
    from edit2deploy.ops.settings import parse_layers

    assert parse_layers("4-8") == (4, 5, 6, 7, 8)
    assert parse_layers("6,4, 5") == (4, 5, 6)
    assert parse_layers("4-6,9,5") == (4, 5, 6, 9)
    for bad in ("x-y", "4-", "a", "1.5", "-1"):
        with pytest.raises(UsageError, match="not a layer list"):
            parse_layers(bad)
    for empty in ("", "8-4", ","):
        with pytest.raises(UsageError, match="empty layer list"):
            parse_layers(empty)


def test_edit_config_from_table():
    from edit2deploy.ops.settings import edit_config_from

    cfg = edit_config_from(
        {
            "method": "encore",
            "layers": [3, 1],
            "lambda_n": 20,
            "lambda_null": 500,
            "tau": 0.05,
            "max_steps": 7,
            "mpes_extra": 2,
        },
        "x.toml",
    )
    assert cfg.method == "encore" and cfg.layers == (1, 3)
    assert cfg.lambda_n == 20.0 and isinstance(cfg.lambda_n, float) and cfg.tau == 0.05
    assert cfg.lambda_null == 500.0 and isinstance(cfg.lambda_null, float)
    assert cfg.values.max_steps == 7 and cfg.values.mpes_extra == 2 and cfg.values.lr == 0.5
    assert edit_config_from({"layers": "2-3"}, "x").layers == (2, 3)
    for table, msg in [
        ({"method": "rome"}, "field 'method'"),
        ({"lambda_pp": 1.0}, "unknown field 'lambda_pp'"),
        ({"values": {}}, "unknown field 'values'"),
        ({"max_steps": 2.5}, "field 'max_steps': expected an integer"),
        ({"max_steps": True}, "field 'max_steps': expected an integer"),
        ({"alpha": "ten"}, "field 'alpha': expected a number"),
        ({"mpes": 1}, "field 'mpes': expected true or false"),
        ({"retry_rounds": -1}, "field 'retry_rounds': expected an integer ≥ 0, got -1"),
        ({"lambda_null": -5.0}, "field 'lambda_null': expected a number ≥ 0"),
    ]:
        with pytest.raises(UsageError, match=msg) as exc:
            edit_config_from(table, "x.toml")
        assert str(exc.value).startswith("x.toml: ")


@pytest.fixture
def cli_env(tmp_path, tiny_model_dir, monkeypatch, smollm2_dir):
    monkeypatch.setenv("EDIT2DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}\n')
    return {"model": tiny_model_dir("llama"), "edits": edits, "out": tmp_path / "out", "tmp": tmp_path}


def _edit_cli(env, *extra, out=None):
    from edit2deploy import cli

    return cli.main(
        [
            "edit",
            "--model",
            str(env["model"]),
            "--edits",
            str(env["edits"]),
            "--out",
            str(out or env["out"]),
            *extra,
        ]
    )


def _bad_toml(env, text):
    f = env["tmp"] / "cfg.toml"
    f.write_text(text)
    return ["--config", str(f)]


EDIT_USAGE_ERRORS = [
    (["--method", "rome"], "method"),
    (["--layers", "x-y"], "--layers: 'x-y' is not a layer list"),
    (["--layers", "0-7"], "--layers: [2, 3, 4, 5, 6, 7] out of range (model has 2 layers: 0-1)"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["--batch-size", "-3"], "--batch-size: expected a positive integer, got -3"),
    ("toml:[edit\nx = 1", "not valid TOML"),
    ("toml:[edit]\nlambda_pp = 1.0\n", "unknown field 'lambda_pp'"),
    ("toml:[edit]\nmax_steps = 'many'\n", "field 'max_steps': expected an integer"),
    ("toml:[editing]\nmethod = 'memit'\n", "unknown table"),
    (["--config", "/nonexistent/cfg.toml"], "file not found"),
    (["--method"], "expected one argument"),
    (["--retry-rounds", "-1"], "expected an integer ≥ 0, got -1"),
    ("toml:[edit]\nretry_rounds = -2\n", "field 'retry_rounds': expected an integer ≥ 0"),
    ("toml:[edit]\nalpha = -1.0\n", "field 'alpha': expected a number ≥ 0"),
    ("toml:[edit]\nlambda_p = inf\n", "field 'lambda_p': expected a finite number, got inf"),
    (["--set", "lr=nan"], "--set: field 'lr': expected a finite number, got nan"),
    (["--set", 'max_steps="20"'], "--set: field 'max_steps': expected an integer"),
    (["--set", "mpes=yes"], "--set: field 'mpes': expected true or false"),
    (["--set", "lambda_pp=1"], "--set: unknown field 'lambda_pp'"),
    (["--set", "=1"], "--set =1: expected KEY=VALUE"),
]


@pytest.mark.parametrize(("extra", "message"), EDIT_USAGE_ERRORS)
def test_edit_usage_errors_exit_2_with_one_line(cli_env, capsys, extra, message):
    if isinstance(extra, str):
        extra = _bad_toml(cli_env, extra.removeprefix("toml:"))
    t = time.perf_counter()
    assert _edit_cli(cli_env, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("edit2deploy: error: ") and message in err[0]
    assert not cli_env["out"].exists()
    assert not (cli_env["tmp"] / "cache").exists()  # refused before any statistics were computed
    assert time.perf_counter() - t < 10


def test_edit_out_equal_to_input_or_existing(cli_env, capsys, tmp_path):
    from shutil import copytree

    model = tmp_path / "model"
    copytree(cli_env["model"], model)
    before = tree_digest(model)
    env = {**cli_env, "model": model}
    assert _edit_cli(env, out=model) == 2
    assert "is the input model directory" in capsys.readouterr().err
    assert tree_digest(model) == before
    cli_env["out"].mkdir()
    (cli_env["out"] / "keep.txt").write_text("mine")
    assert _edit_cli(cli_env) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists (use --force" in err[0]
    assert (cli_env["out"] / "keep.txt").read_text() == "mine"


def test_edit_usage_error_in_a_real_process(cli_env):
    """The same through `python -m edit2deploy`: exit status 2 and exactly one line on stderr."""
    p = run_cli(
        "edit",
        "--model",
        str(cli_env["model"]),
        "--edits",
        str(cli_env["edits"]),
        "--out",
        str(cli_env["out"]),
        "--layers",
        "x-y",
    )
    assert p.returncode == 2
    expected = "edit2deploy: error: --layers: 'x-y' is not a layer list (expected e.g. 4-8 or 4,5,6)"
    assert p.stderr.strip().splitlines() == [expected]
    assert not cli_env["out"].exists()


# ================================================================ real model (slow)
@pytest.mark.slow
def test_smollm2_prefixes_are_prose(smollm2):
    """The context prefixes start a new document: sampled from a bare first word, SmolLM2 glues on code-like pieces
    ("The-the-key-to-be-", "I_no_remaining_items())"), which made half of every key come from such contexts."""
    from edit2deploy.methods.keys import generate_prefixes

    for seed in (0, 100):
        prefixes = generate_prefixes(smollm2, seed=seed)
        assert len(prefixes) == 5
        for p in prefixes:
            assert len(p.split()) >= 3 and not any(c in p for c in "_-"), prefixes


@pytest.mark.slow
def test_smollm2_counterfact_edits_take_effect(smollm2, smollm2_dir, tmp_path):
    """4 CounterFact cases, default method, layers 4-8, statistics from 20k tokens of WikiText: every edit
    prompt now prefers the new target over the true one, which the unedited model did not."""
    from edit2deploy.ops.edit import edit_model
    from edit2deploy.probes import probes_for, rates, run_probes
    from edit2deploy.requests import load_requests
    from edit2deploy.scoring import TorchScorer

    requests = load_requests(COUNTERFACT_VAL, limit=4)
    assert len(requests) == 4
    corpus = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    before_files = tree_digest(smollm2_dir)
    run = edit_model(
        "smollm2-135m",
        requests,
        tmp_path / "out",
        cfg=EditConfig(layers=(4, 5, 6, 7, 8)),
        corpus=corpus,
        n_tokens=20_000,
        quiet=True,
    )
    assert run.failed is None and len(run.batches) == 1
    assert tree_digest(smollm2_dir) == before_files
    probes = probes_for(requests, ["edit"])
    base = rates(run_probes(TorchScorer(smollm2.model, smollm2.tokenizer), probes))["edit"]
    edited_lm = open_model(run.out)
    results = run_probes(TorchScorer(edited_lm.model, edited_lm.tokenizer), probes)
    after = rates(results)["edit"]
    assert after == 100.0, [(r.probe.prompt, r.margin) for r in results]
    assert base < after
    rec = run.batches[0]
    # MPES stops a request once its target is top-1 in every context; with the reply context one of the four may
    # need the whole 25 steps, and a re-solve round then adds what is missing (ES above is 100 either way)
    assert sum(rec["converged"]) >= 3 and sum(s < 25 for s in rec["steps"]) >= 3, rec["steps"]


@pytest.mark.slow
def test_smollm2_preserved_facts_keep_their_keys_out_of_the_update(smollm2, tmp_path):
    """On the real model, 50 CounterFact train facts given as preserved: the first edited layer's update moves
    their keys (its input, which no edit changes) far less than without them, and the edits still take."""
    from edit2deploy.ledger import Ledger
    from edit2deploy.methods.keys import context_templates
    from edit2deploy.methods.preserved import preserved_keys
    from edit2deploy.ops.edit import edit_model
    from edit2deploy.probes import probes_for, rates, run_probes
    from edit2deploy.requests import load_requests
    from edit2deploy.scoring import TorchScorer

    requests = load_requests(COUNTERFACT_VAL, limit=4)
    facts = load_requests(COUNTERFACT_VAL.parent / "counterfact-train.json", limit=50, offset=1000)
    corpus = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    arch, w4 = smollm2.arch, smollm2.arch.get_weight(smollm2.model, 4).detach().double()
    moved = {}
    for name, preserved in (("plain", ()), ("preserved", facts)):
        run = edit_model(
            "smollm2-135m",
            requests,
            tmp_path / name,
            cfg=EditConfig(
                layers=(4, 5, 6, 7, 8), preserve_names=False, retry_rounds=0
            ),  # the facts alone; one solve
            corpus=corpus,
            n_tokens=20_000,
            quiet=True,
            preserved=preserved,
        )
        edited = open_model(run.out)
        prefixes = Ledger.load(run.out).state["prefixes"]
        Kf = preserved_keys(smollm2, facts, context_templates(prefixes), (4,), quiet=True)[4]
        dW = arch.to_out_in(arch.get_weight(edited.model, 4).detach().double() - w4)
        moved[name] = float((dW @ Kf).norm() / Kf.norm())
        results = run_probes(TorchScorer(edited.model, edited.tokenizer), probes_for(requests, ["edit"]))
        assert rates(results)["edit"] == 100.0, (name, [(r.probe.prompt, r.margin) for r in results])
    assert moved["preserved"] < 0.5 * moved["plain"], moved


@pytest.mark.slow
def test_smollm2_corpus_names_keep_their_keys_out_of_the_update(smollm2, tmp_path):
    """On the real model, the default preserves the statistics corpus's names: the first edited layer's update
    moves their keys less than with `preserve_names` off, and the edits still take."""
    from edit2deploy.ledger import Ledger
    from edit2deploy.methods.keys import context_templates
    from edit2deploy.methods.preserved import name_facts, preserved_keys
    from edit2deploy.models import weights_fingerprint
    from edit2deploy.ops.edit import edit_model
    from edit2deploy.probes import probes_for, rates, run_probes
    from edit2deploy.requests import load_requests
    from edit2deploy.scoring import TorchScorer
    from edit2deploy.stats import corpus_from_path, corpus_names

    requests = load_requests(COUNTERFACT_VAL, limit=4)
    corpus = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    arch, w4 = smollm2.arch, smollm2.arch.get_weight(smollm2.model, 4).detach().double()
    moved = {}
    for on in (False, True):
        run = edit_model(
            "smollm2-135m",
            requests,
            tmp_path / str(on),
            cfg=EditConfig(
                layers=(4, 5, 6, 7, 8), preserve_names=on, retry_rounds=0
            ),  # the null space, one solve
            corpus=corpus,
            n_tokens=20_000,
            quiet=True,
        )
        edited = open_model(run.out)
        state = Ledger.load(run.out).state
        names = corpus_names(
            smollm2, weights_fingerprint(smollm2.model_dir), corpus_from_path(corpus), 20_000
        )
        facts = name_facts(names, [t for r in requests for t in (r.text, *r.paraphrases)])[:200]
        assert len(facts) == 200 and (state["preserved"]["names"] > 200 if on else "preserved" not in state)
        Kn = preserved_keys(smollm2, facts, context_templates(state["prefixes"]), (4,), quiet=True)[4]
        dW = arch.to_out_in(arch.get_weight(edited.model, 4).detach().double() - w4)
        moved[on] = float((dW @ Kn).norm() / Kn.norm())
        results = run_probes(TorchScorer(edited.model, edited.tokenizer), probes_for(requests, ["edit"]))
        assert rates(results)["edit"] == 100.0, (on, [(r.probe.prompt, r.margin) for r in results])
    # thousands of names share the 0.1 weight, so each is held less than a few named facts (0.66x measured)
    assert moved[True] < 0.75 * moved[False], moved


@pytest.mark.slow
def test_smollm2_retry_makes_failed_edits_take(smollm2, tmp_path):
    """With a regulariser strong enough that some CounterFact edits do not take in one solve (λ_∅ 10,000), two
    retry rounds leave fewer failing, and the ledger's record of what still fails matches the edited model."""
    from edit2deploy.ops.edit import edit_model
    from edit2deploy.probes import probes_for, run_probes
    from edit2deploy.requests import load_requests
    from edit2deploy.scoring import TorchScorer

    requests = load_requests(COUNTERFACT_VAL, limit=RETRY_CASES)
    corpus = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    cfg = EditConfig(  # the teacher-forced check alone, as this test reads it
        layers=(4, 5, 6, 7, 8), lambda_null=10_000.0, retry_rounds=2, retry_chat=False, retry_completion=False
    )
    run = edit_model(
        "smollm2-135m", requests, tmp_path / "out", cfg=cfg, corpus=corpus, n_tokens=20_000, quiet=True
    )
    retry = run.batches[0]["retry"]
    first = retry["rounds"][0]["retried"]
    assert first, "precondition: some edits fail after the first solve"
    assert len(retry["failed"]) < len(first), retry
    edited = open_model(run.out)
    results = run_probes(TorchScorer(edited.model, edited.tokenizer), probes_for(requests, ["edit"]))
    assert sorted(r.probe.request_id for r in results if not r.success) == sorted(retry["failed"])


def test_edit_retry_rounds_flag_reaches_the_ledger(cli_env, capsys):
    """`edit --retry-rounds N` sets the config's retry_rounds; the batch summary and the ledger record say what
    the rounds did (on a tiny random model the edit rarely takes, so there is something to retry)."""
    from edit2deploy.ledger import Ledger

    rc = _edit_cli(cli_env, "--retry-rounds", "1", "--n-tokens", "2000", "--set", "kl_factor=0.125", "--json")
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    retry = summary["batches"][0]["retry"]
    assert set(retry) == {"rounds", "failed"} and len(retry["rounds"]) <= 1
    record = Ledger.load(cli_env["out"]).records[-1]
    assert record["config"]["retry_rounds"] == 1 and record["retry"] == retry
    assert record["config"]["values"]["kl_factor"] == 0.125  # --set reaches the recorded configuration


def test_edit_preserved_facts_are_kept_with_the_null_space(cli_env, capsys):
    """`edit --preserved F`: the ledger records which facts built the null space; a later edit of the output
    continues with them (same file or none) and refuses other facts, and preserved facts given only after a
    model's first edit are refused; a method without a null space refuses them at once (exit code 2)."""
    from edit2deploy.ledger import Ledger
    from edit2deploy.methods.preserved import facts_digest
    from edit2deploy.requests import load_requests

    facts = cli_env["tmp"] / "facts.jsonl"
    rows = [
        {"id": r.id, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new} for r in PRESERVED
    ]
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = cli_env["tmp"] / "other.jsonl"
    other.write_text(json.dumps(rows[0]) + "\n")
    common = ("--n-tokens", "2000", "--method", "alphaedit")
    assert _edit_cli(cli_env, *common, "--preserved", str(facts)) == 0
    state = Ledger.load(cli_env["out"]).state
    recorded = {k: v for k, v in state["preserved"].items() if k != "names"}  # corpus names: their own test
    assert recorded == {"facts": 3, "sha256": facts_digest(load_requests(facts)), "weight": 0.1}

    more = (
        cli_env["tmp"] / "more.jsonl"
    )  # a fact the edited model does not hold yet (a repeat would be skipped)
    more.write_text(
        json.dumps({"prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": "chess"})
    )
    env2 = {**cli_env, "model": cli_env["out"], "edits": more}
    assert _edit_cli(env2, *common, "--preserved", str(facts), out=cli_env["tmp"] / "o2") == 0
    assert _edit_cli(env2, *common, out=cli_env["tmp"] / "o3") == 0
    assert Ledger.load(cli_env["tmp"] / "o3").state["preserved"] == state["preserved"]
    capsys.readouterr()
    assert _edit_cli(env2, *common, "--preserved", str(other), out=cli_env["tmp"] / "o4") == 2
    assert "--preserved differs" in capsys.readouterr().err

    plain = cli_env["tmp"] / "plain"
    assert _edit_cli(cli_env, *common, out=plain) == 0
    capsys.readouterr()
    assert (
        _edit_cli(
            {**cli_env, "model": plain, "edits": more},
            *common,
            "--preserved",
            str(facts),
            out=cli_env["tmp"] / "o5",
        )
        == 2
    )
    assert "first edit" in capsys.readouterr().err
    assert _edit_cli(cli_env, "--method", "memit", "--preserved", str(facts), out=cli_env["tmp"] / "o6") == 2
    assert "null space" in capsys.readouterr().err
    assert not (cli_env["tmp"] / "o6").exists()
    assert _edit_cli(cli_env, "--preserved-n", "2", out=cli_env["tmp"] / "o7") == 2
    assert "--preserved-n needs --preserved" in capsys.readouterr().err


def test_hardening_after_retry_starts_from_the_retried_delta(tiny_model_dir, monkeypatch):
    """With both, hardening re-solves from the δ the retry rounds ended with, not the first optimisation's."""
    from edit2deploy.methods import retry as retry_mod

    layers = (0, 1)
    hp = ValueHParams(max_steps=3, mpes=True, dtype="float32")
    cfg = EditConfig(method="memit", layers=layers, lambda_p=30.0, retry_rounds=1, values=hp)
    lm = open_model(tiny_model_dir("llama"))
    editor = Editor(lm, cfg, _identity_stats(lm, layers), prefixes=PREFIXES, quiet=True)
    seen = {}
    resolve = retry_mod.resolve_failed

    def recording(*args, **kwargs):
        out = resolve(*args, **kwargs)
        seen["retried"] = out[2].clone()
        return out

    class Recorder:  # stands in for a Hardener: records the δ it is handed, changes nothing
        simulations = ()

        def run(self, editor, requests, values, originals, deltas, keys, timings):
            seen["hardened_from"] = values.delta.clone()
            return deltas, keys, {}

    import edit2deploy.methods.editor as editor_mod

    monkeypatch.setattr(editor_mod, "resolve_failed", recording)
    report = editor.apply_batch(REQUESTS, harden=Recorder())
    assert report.retry["rounds"]  # something was retried, so the δ differ from the first optimisation's
    assert torch.equal(seen["hardened_from"], seen["retried"])


def test_each_method_fills_in_its_own_choices_when_resolved():
    """`EditConfig` fields left None are the method's choice, filled in (and so recorded) by `resolve_config`: the
    default method edits for chat — λ_∅ 15000, up to 4 re-solves checked on the chat reply and the completion,
    both chat contexts —, the published methods get none of it, and a value given is kept."""
    from edit2deploy.arch import architecture_for
    from edit2deploy.methods.editor import DEFAULT_METHOD_CHOICES, UNCHOSEN, resolve_config
    from edit2deploy.ops.settings import check_edit_config, edit_config_from

    arch = architecture_for("llama")
    got = resolve_config(EditConfig(), arch, 30, has_chat_template=True)
    assert (got.lambda_null, got.retry_rounds, got.retry_chat, got.retry_completion, got.chat_kinds) == (
        15_000.0,
        4,
        True,
        True,
        "both",
    )
    assert {k: getattr(got, k) for k in DEFAULT_METHOD_CHOICES} == DEFAULT_METHOD_CHOICES
    for name in ("memit", "alphaedit", "encore"):
        published = resolve_config(EditConfig(method=name), arch, 30, has_chat_template=True)
        assert {k: getattr(published, k) for k in UNCHOSEN} == UNCHOSEN
    given = resolve_config(EditConfig(lambda_null=0.0, retry_rounds=1), arch, 30, has_chat_template=True)
    assert (given.lambda_null, given.retry_rounds, given.retry_chat) == (0.0, 1, True)
    assert None not in (got.to_json()[k] for k in UNCHOSEN)  # the ledger records what was applied
    # settings: a method's choice is typed like the field's value (no coercion), and None only from Python
    with pytest.raises(UsageError, match="field 'retry_chat': expected true or false"):
        edit_config_from({"retry_chat": "yes"}, "t.toml")
    with pytest.raises(UsageError, match="field 'chat_kinds'"):
        edit_config_from({"chat_kinds": "all"}, "t.toml")
    assert check_edit_config(EditConfig()).lambda_null is None
