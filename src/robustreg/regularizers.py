"""The five regularizers, and three later ones, as per-sample values for any PyTorch classifier.

Every regularizer has the signature ``(model, x, y, **options) -> Tensor[B]``: ``model`` maps a
batch ``x`` of shape ``[B, ...]`` to logits ``f(x)`` of shape ``[B, K]``, ``y`` holds int64 labels
in ``[0, K)``, and the result holds one value per sample with the normalizations of book/notation.md
(a training loss averages them: ``loss = ce + lam * R.mean()``). Symbols: ``J = ∂f/∂x`` (row k is
``∇f_k``), ``p = softmax(f)``, ``ℓ = -log p_y``, ``S = diag(p) - p pᵀ``, ``C = I - 11ᵀ/K``.

================================  ===============================================================
``input_gradient``                R_IG = ‖∇ₓℓ‖₂²  (``norm="l1"``: ‖∇ₓℓ‖₁)
``jacobian_frobenius``            R_J = ‖J‖_F²  (or the projection estimate, fact T4)
``cross_lipschitz``               R_CL = (1/K²) Σ_{l,m} ‖∇f_l − ∇f_m‖² = (2/K)‖CJ‖_F²  (T5)
``curvature``                     R_CURE = ‖∇ₓℓ(x + hz) − ∇ₓℓ(x)‖², z = sign(∇ₓℓ)/‖sign(∇ₓℓ)‖
``hessian_trace``                 R_H = tr ∇ₓ²ℓ = Σ_k p_k ‖∇f_k − Jᵀp‖²  (T7, T8; or E‖JᵀBv‖², BBᵀ = S)
================================  ===============================================================

Three later regularizers, functionals of the same logit gradients and region boundaries
(book chapter "Later regularizers through the same lens"; not in :func:`names`, which lists the
book's five, but found by :func:`get` and listed by :func:`later_names`):

================================  ===============================================================
``local_linearity``               R_LLR = g(δ*) + μ|δ*ᵀ∇ₓℓ|, g(δ) = |ℓ(x+δ) − ℓ(x) − δᵀ∇ₓℓ(x)|,
                                  δ* ≈ argmax_{‖δ‖∞≤ε} g (Qin et al. 2019)
``grad_align``                    R_GA = 1 − cos(∇ₓℓ(x), ∇ₓℓ(x + η)), η ~ U[−ε, ε]^d
                                  (Andriushchenko & Flammarion 2020)
``mmr``                           R_MMR = mean of the n_B smallest (1 − d_B,j/γ_B)₊ + mean of the
                                  n_D smallest (1 − d_D,k/γ_D)₊ (Croce, Andriushchenko & Hein 2019)
================================  ===============================================================

Common behaviour:

- Values are differentiable with respect to the model's parameters (double backpropagation through
  ``torch.autograd.grad(..., create_graph=True)``), so ``(ce + lam * R.mean()).backward()`` trains.
  Under ``torch.no_grad()`` the values are computed all the same and returned detached.
- The model's mode (``train``/``eval``) is never changed and no ``.grad`` is written: gradients are
  taken with ``torch.autograd.grad``. A model whose forward has side effects (batch norm in training
  mode updates running statistics; it also couples the samples of a batch) keeps them.
- ``return_logits=True`` returns ``(values, logits)``, where ``logits`` is the forward pass ``f(x)``
  used internally, still attached to the graph: a training step computes its data loss from it
  instead of running the model a second time (``benchmarks/regularizer_cost.py`` does so).
- Estimators (``n_proj``, ``n_samples``) take ``generator: torch.Generator | None`` for reproducible
  draws; by default every one is unbiased for the value *and* for its gradient with respect to the
  parameters (what training needs). The one exception is opt-in by name:
  ``hessian_trace(estimator="labels-pathwise")``, whose gradient is biased.
- A sample whose logits are NaN or infinite (a diverged network, NaN inputs) gets the value NaN,
  for every regularizer.
- Inputs are checked: ``x`` needs a batch dimension and a floating dtype, ``y`` must be int64 of
  shape ``[B]`` with values in ``[0, K)``; errors name the bad value and the valid range.
- Cost: one forward pass (two for ``curvature``) and one double-backpropagated input gradient per
  projection, sample or class. For a plain ``nn.Sequential`` whose first layer is Linear or Conv
  (after reshapes), the backward passes stop at that layer's output and its input-VJP is applied
  explicitly, which is exact and saves the unused gradient w.r.t. x in the training step; the
  exact Jacobian-type values use ``‖aW‖² = a(WWᵀ)aᵀ`` for a Linear first layer when cheaper.
  ``benchmarks/regularizer_cost.py`` measures the training-step cost against plain training.

``get(name)`` returns a regularizer by name and ``names()`` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._lookup import lookup
from .geometry import preactivations
from .models import check_piecewise_linear
from .validation import (
    check_batch,
    check_count,
    check_generator,
    check_labels,
    check_logits,
    check_nonnegative,
    check_norm,
    check_positive,
    dual_exponent,
    dual_norm,
)

__all__ = [
    "DEFAULT_H",
    "HESSIAN_ESTIMATORS",
    "cross_lipschitz",
    "curvature",
    "get",
    "hessian_trace",
    "input_gradient",
    "jacobian_frobenius",
    "later_names",
    "local_linearity",
    "grad_align",
    "mmr",
    "names",
]

#: Default finite-difference step of :func:`curvature`: the ℓ2 length of the step ``h z`` in input
#: units (``z`` has unit ℓ2 norm). See :func:`curvature` for the choice.
DEFAULT_H = 0.5

#: The norms of :func:`input_gradient` and of :func:`mmr` (names of :data:`robustreg.validation.NORMS`).
INPUT_GRADIENT_NORMS = ("l2", "l1")
MMR_NORMS = ("l2", "linf", "l1")


# ----------------------------------------------------------------------------------------------
# validation and the shared forward pass
# ----------------------------------------------------------------------------------------------


_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)
_CONV_TRANSPOSE = {
    nn.Conv1d: F.conv_transpose1d,
    nn.Conv2d: F.conv_transpose2d,
    nn.Conv3d: F.conv_transpose3d,
}

#: Use the fast paths of :class:`_Forward` (tests switch them off to compare with the generic path).
_FAST_PATHS = True


def _first_affine(model: nn.Module) -> int | None:
    """Index of the leading Linear/Conv layer of a plain ``nn.Sequential`` (only reshapes before)."""
    if type(model).forward is not nn.Sequential.forward:
        return None
    if model._forward_hooks or model._forward_pre_hooks:
        return None  # the model's own hooks expect model(x) to be called
    g = nn.modules.module
    if getattr(g, "_global_forward_hooks", None) or getattr(g, "_global_forward_pre_hooks", None):
        return None
    for i, m in enumerate(model):
        if type(m) in _RESHAPES:
            continue
        if type(m) is nn.Linear:
            return i
        if (
            type(m) in _CONV_TRANSPOSE
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
        ):
            return i
        return None
    return None


class _Forward:
    """A forward pass ``f = model(x)`` kept for input-gradient backward passes.

    Generic path: ``x`` requires grad and the backward passes run down to it (``wrt`` is x).

    Fast path, for a plain ``nn.Sequential`` that starts (after reshapes) with a Linear or Conv layer
    ``z₁ = W h + b`` when the caller's ``x`` does not itself require grad: the backward passes stop
    at ``wrt = z₁`` and the layer's input-VJP (``a W`` or a transposed convolution) is applied
    explicitly, which is exact. The training step then no longer computes an unused gradient
    w.r.t. x. For a Linear first layer and many cotangents (the exact Jacobian), squared norms
    ‖a W‖² are computed as ``a (W Wᵀ) aᵀ`` when that is cheaper (:meth:`sqnorm`).
    """

    def __init__(self, model: nn.Module, x: Tensor, create_graph: bool):
        self.create_graph = create_graph
        self.x_shape = x.shape
        k = None if (x.requires_grad or not _FAST_PATHS) else _first_affine(model)
        self.layer = None
        self._gram = None
        with torch.enable_grad():
            if k is None:
                self.wrt = x if x.requires_grad else x.detach().requires_grad_(True)
                self.logits = model(self.wrt)
                self.h_shape = x.shape
                return
            modules = list(model)
            h = x
            for m in modules[:k]:
                h = m(h)
            self.layer, self.h_shape = modules[k], h.shape
            f = self.wrt = self.layer(h)
            for m in modules[k + 1 :]:
                f = m(f)
            self.logits = f

    def grad(self, outputs: Tensor, grad_outputs: Tensor | None = None, batched=False) -> Tensor:
        """Gradient w.r.t. ``wrt`` of ``Σ grad_outputs · outputs`` (a stack when ``batched``)."""
        (a,) = torch.autograd.grad(
            outputs,
            self.wrt,
            grad_outputs=grad_outputs,
            create_graph=self.create_graph,
            retain_graph=True,
            is_grads_batched=batched,
        )
        return a

    def _input_vjp(self, a: Tensor) -> Tensor:
        """Map a gradient w.r.t. ``wrt`` (``[..., *wrt.shape]``) to one w.r.t. h (the layer input).

        Linear: ``a W``. Conv: the transposed convolution; a stack of n cotangents is folded into
        the channels of one grouped transposed convolution (n·groups groups), several times
        faster on CPU than a batch of n·B small-channel images.
        """
        layer = self.layer
        if layer is None:
            return a
        if isinstance(layer, nn.Linear):
            return a @ layer.weight
        lead = a.shape[: a.dim() - len(self.h_shape)]
        n, batch, c_out = math.prod(lead), a.shape[len(lead)], a.shape[len(lead) + 1]
        spatial_out = a.shape[len(lead) + 2 :]
        a = a.reshape(n, batch, c_out, *spatial_out).transpose(0, 1)
        a = a.reshape(batch, n * c_out, *spatial_out)
        weight = layer.weight
        if n > 1:
            weight = weight.repeat(n, *[1] * (weight.dim() - 1))
        expected = [
            (o - 1) * s - 2 * p + d * (k - 1) + 1
            for o, s, p, d, k in zip(
                spatial_out,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.kernel_size,
                strict=True,
            )
        ]
        spatial_in = self.h_shape[2:]
        g = _CONV_TRANSPOSE[type(layer)](
            a,
            weight,
            stride=layer.stride,
            padding=layer.padding,
            output_padding=[i - e for i, e in zip(spatial_in, expected, strict=True)],
            groups=layer.groups * n,
            dilation=layer.dilation,
        )
        g = g.reshape(batch, n, *self.h_shape[1:]).transpose(0, 1)
        return g.reshape(*lead, *self.h_shape)

    def to_input(self, a: Tensor) -> Tensor:
        """Gradient w.r.t. x, shaped ``[..., *x.shape]``, from one w.r.t. ``wrt``."""
        g = self._input_vjp(a)
        return g.reshape(*g.shape[: g.dim() - len(self.h_shape)], *self.x_shape)

    def sqnorm(self, a: Tensor) -> Tensor:
        """‖to_input(a)‖₂² per sample (over the input dimensions), leading dimensions kept."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            w, d = layer.weight.shape
            rows = a.numel() // w
            if 2 * w * w * d + 3 * rows * w * w < 3 * rows * w * d:  # cheaper via the Gram matrix
                if self._gram is None:
                    self._gram = layer.weight @ layer.weight.T
                return ((a @ self._gram) * a).sum(-1)
        g = self._input_vjp(a)
        return g.flatten(g.dim() - len(self.h_shape) + 1).pow(2).sum(-1)

    def loss_grad(self, y: Tensor) -> Tensor:
        """``a`` with ``to_input(a) = ∇ₓℓ(x, y) = Jᵀ(p − e_y)``: one backward pass (fact T2)."""
        with torch.enable_grad():
            residual = _residual(torch.softmax(self.logits, dim=1), y)
        return self.grad(self.logits, residual)

    def vjps(self, cotangents: Tensor) -> Tensor:
        """``a_j`` with ``to_input(a_j) = Jᵀ v_j`` for cotangents ``[n, B, K]``: ``[n, B, ...]``.

        One batched backward pass (``is_grads_batched``, i.e. ``vmap`` over the cotangents); a
        model whose backward vmap cannot batch falls back to ``n`` ordinary backward passes.
        """
        if cotangents.shape[0] == 1:
            return self.grad(self.logits, cotangents[0]).unsqueeze(0)
        try:
            return self.grad(self.logits, cotangents, batched=True)
        except RuntimeError:  # pragma: no cover - depends on the model's operators
            return torch.stack([self.grad(self.logits, v) for v in cotangents])


def _residual(p: Tensor, labels: Tensor) -> Tensor:
    """p − e_y, computed without cancellation: entry y is −Σ_{k≠y} p_k rather than p_y − 1.

    ``p``: [B, K] probabilities; ``labels``: [..., B] (a stack of label vectors gives a stack of
    residuals [..., B, K]). When the model is confident (p_y → 1), ``p_y − 1`` keeps only the
    absolute accuracy of p_y (in float32, p_y rounds to 1 once 1 − p_y < 6e-8 and the y-entry
    vanishes), whereas −Σ_{k≠y} p_k keeps full relative accuracy; so do ∇ₓℓ and the values.
    """
    mask = F.one_hot(labels, p.shape[-1]).bool()
    others = p.expand(mask.shape).masked_fill(mask, 0.0)
    return others - mask.to(p.dtype) * others.sum(-1, keepdim=True)


def _forward(model: nn.Module, x: Tensor, y: Tensor) -> _Forward:
    """Validate ``x`` and ``y``, evaluate ``f = model(x)`` (see :class:`_Forward`), validate ``f``."""
    check_batch(x)
    check_labels(y, x.shape[0])
    fw = _Forward(model, x, torch.is_grad_enabled())
    check_logits(fw.logits, x)
    check_labels(y, x.shape[0], fw.logits.shape[1])
    return fw


def _finish(fw: _Forward, values: Tensor, return_logits: bool):
    """Detach under no_grad; a sample with a non-finite logit gets the value NaN (every
    regularizer alike: ReLU's backward would otherwise pass NaN as active and some values stay
    finite)."""
    return _finish_values(fw.logits, fw.create_graph, values, return_logits)


def _finish_values(logits: Tensor, create_graph: bool, values: Tensor, return_logits: bool):
    finite = torch.isfinite(logits.detach()).all(-1)
    if not bool(finite.all()):
        values = torch.where(finite, values, torch.full_like(values, math.nan))
    if not create_graph:  # called under torch.no_grad()
        values, logits = values.detach(), logits.detach()
    return (values, logits) if return_logits else values


def _randn(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) draws on the generator's device, in float64 (the same draws for every dtype)."""
    device = generator.device if generator is not None else like.device
    v = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    return v.to(device=like.device, dtype=like.dtype)


def _sample_labels(p: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` labels per row of ``p`` [B, K], drawn from p by inverting its CDF: [n, B].

    ``y′ = #{k : c_k < u}`` with ``c = cumsum(p)`` and ``u ~ U[0, 1)`` (float64, on the generator's
    device), so P(y′ = k) = p_k; the last class absorbs the rounding of c_K. Four times cheaper
    than ``torch.multinomial`` for a training batch, and the same draws for every dtype.
    """
    device = generator.device if generator is not None else p.device
    u = torch.rand(n, p.shape[0], 1, generator=generator, device=device, dtype=torch.float64)
    cdf = p.to(dtype=torch.float64).cumsum(-1)
    labels = (cdf < u.to(p.device)).sum(-1)
    return labels.clamp_max(p.shape[-1] - 1)


def _require_piecewise_linear(model: nn.Module, what: str) -> None:
    try:
        check_piecewise_linear(model)
    except ValueError as err:
        raise ValueError(
            f"{what} needs a piecewise-linear model: it uses ∇ₓ²ℓ = Jᵀ S J (fact T7), which "
            f"holds only where every ∇²f_k = 0; {err}"
        ) from err


# ----------------------------------------------------------------------------------------------
# the regularizers
# ----------------------------------------------------------------------------------------------


def input_gradient(
    model: nn.Module, x: Tensor, y: Tensor, norm: str = "l2", *, return_logits: bool = False
):
    """Input-gradient regularizer (double backpropagation), per sample.

    ``norm="l2"``: R_IG = ‖∇ₓℓ(x, y)‖₂²; ``norm="l1"``: ‖∇ₓℓ(x, y)‖₁, the dual norm of ℓ∞, i.e.
    the first-order loss increase per unit of an ℓ∞ perturbation (fact T3). Here
    ∇ₓℓ = Jᵀ(p − e_y) (fact T2), obtained by one backward pass with ``create_graph=True`` of the
    cotangent p − e_y, whose y-entry is computed as −Σ_{k≠y} p_k: unlike autograd through the
    cross-entropy (p_y − 1), this keeps full relative accuracy for confident predictions.
    """
    check_norm(norm, INPUT_GRADIENT_NORMS)
    fw = _forward(model, x, y)
    with torch.enable_grad():
        a = fw.loss_grad(y)
        values = fw.sqnorm(a) if norm == "l2" else fw.to_input(a).flatten(1).abs().sum(-1)
    return _finish(fw, values, return_logits)


def jacobian_frobenius(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    n_proj: int | None = None,
    *,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
):
    """Jacobian regularizer R_J = ‖J‖_F² = Σ_k ‖∇f_k‖², per sample.

    ``n_proj=None``: exact, from the K vector–Jacobian products ``Jᵀe_k`` in one batched backward
    pass. ``n_proj=n``: the random-projection estimate (fact T4)

        (1/n) Σ_{j=1}^n ‖Jᵀ v_j‖²,   v_j ~ N(0, I_K) independent per sample,

    unbiased since E[v vᵀ] = I; its variance is (2/n)‖J Jᵀ‖_F². The draws do not depend on the
    parameters, so the gradient of the estimate is an unbiased estimate of ∇R_J as well. ``y`` is
    only validated (R_J does not depend on the label).
    """
    check_count("n_proj", n_proj, none="exact")
    check_generator(generator)
    fw = _forward(model, x, y)
    B, K = fw.logits.shape
    with torch.enable_grad():
        if n_proj is None:
            eye = torch.eye(K, dtype=fw.logits.dtype, device=fw.logits.device)
            cot = eye[:, None, :].expand(K, B, K)
            values = fw.sqnorm(fw.vjps(cot)).sum(0)
        else:
            v = _randn((n_proj, B, K), fw.logits, generator)
            values = fw.sqnorm(fw.vjps(v)).mean(0)
    return _finish(fw, values, return_logits)


def _helmert(K: int, like: Tensor) -> Tensor:
    """Columns: an orthonormal basis of 1^⊥ in R^K (so Q Qᵀ = C), shape [K, K-1]."""
    q = torch.zeros(K, K - 1, dtype=like.dtype, device=like.device)
    for j in range(1, K):
        q[:j, j - 1] = 1.0 / math.sqrt(j * (j + 1))
        q[j, j - 1] = -j / math.sqrt(j * (j + 1))
    return q


def cross_lipschitz(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    n_proj: int | None = None,
    *,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
):
    """Cross-Lipschitz regularizer R_CL = (1/K²) Σ_{l,m} ‖∇f_l − ∇f_m‖², per sample.

    Computed as a centered Jacobian (fact T5): R_CL = (2/K)‖CJ‖_F², C = I − 11ᵀ/K.

    ``n_proj=None``: exact. Since C = Q Qᵀ for an orthonormal basis Q ∈ R^{K×(K−1)} of 1^⊥,
    ‖CJ‖_F² = ‖QᵀJ‖_F², which needs K − 1 vector–Jacobian products instead of K² gradient
    differences (one batched backward pass).

    ``n_proj=n``: the centered-projection estimate (2/K)(1/n) Σ_j ‖Jᵀ C v_j‖², v_j ~ N(0, I_K),
    unbiased because E[C v vᵀ C] = C² = C; one backward pass per projection instead of K. The
    draws do not depend on the parameters, so the gradient is unbiased too. ``y`` is only
    validated.
    """
    check_count("n_proj", n_proj, none="exact")
    check_generator(generator)
    fw = _forward(model, x, y)
    B, K = fw.logits.shape
    with torch.enable_grad():
        if K == 1:
            values = fw.logits.sum(1) * 0
        elif n_proj is None:
            q = _helmert(K, fw.logits)  # [K, K-1]
            cot = q.T[:, None, :].expand(K - 1, B, K)
            values = (2.0 / K) * fw.sqnorm(fw.vjps(cot)).sum(0)
        else:
            v = _randn((n_proj, B, K), fw.logits, generator)
            v = v - v.mean(-1, keepdim=True)  # C v
            values = (2.0 / K) * fw.sqnorm(fw.vjps(v)).mean(0)
    return _finish(fw, values, return_logits)


def curvature(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    h: float = DEFAULT_H,
    *,
    return_logits: bool = False,
):
    """CURE curvature regularizer R_CURE = ‖∇ₓℓ(x + h z) − ∇ₓℓ(x)‖₂², per sample.

    z = sign(∇ₓℓ(x)) / ‖sign(∇ₓℓ(x))‖₂ is computed from the gradient at x and held constant
    (detached), as in CURE; a sample whose gradient vanishes gets z = 0 and R_CURE = 0. For small h,
    R_CURE ≈ h² ‖∇ₓ²ℓ z‖² (fact T10), and for σ_a networks the difference splits into a softmax term
    J(x)ᵀ(p′ − p) and an activation-change term that vanishes while x + hz stays in the region of x.

    The step: z has unit ℓ2 norm, so ``h`` is the ℓ2 length of the step ``h z`` in input units,
    and each coordinate moves by ±h/√d. The default ``h = 0.5`` (:data:`DEFAULT_H`) is for inputs
    in [0, 1]. CURE's public code uses h = 3 (after a warm-up schedule 0.1, 0.4, 0.8, 1.8, 3) on
    CIFAR-10 standardized per channel (std ≈ 0.2), i.e. an ℓ2 step of ≈ 0.6 in [0, 1] units
    (≈ 2.8/255 per pixel of a 32×32×3 image); we round it to 0.5, which on 28×28 inputs moves
    each pixel by 0.5/28 ≈ 0.018 ≈ 4.6/255, well inside the ℓ∞ budgets used on MNIST. The finite
    difference then probes the loss on the scale of small attacks rather than its infinitesimal
    Hessian; pass a smaller ``h`` to approach h² ‖∇ₓ²ℓ z‖². Our z has no 1e-7 fudge and our norm
    is squared: see :mod:`robustreg.conventions` for the conversion to the public code.

    Cost: one forward pass at x (shared with the data loss when ``return_logits=True``), one at
    x + hz, and two double-backpropagated input gradients.
    """
    check_positive("h", h)
    fw = _forward(model, x, y)
    with torch.enable_grad():
        a0 = fw.loss_grad(y)
        with torch.no_grad():
            s = torch.sign(fw.to_input(a0))
            count = s.flatten(1).abs().sum(1).clamp_min(1.0)
            z = s / count.sqrt().view(-1, *([1] * (s.dim() - 1)))
        # z is a constant: x + hz requires grad only if the caller's x does, so both passes take
        # the same path and the same linear map to_input, and ∇ℓ(x+hz) − ∇ℓ(x) = to_input(a1 − a0)
        fw1 = _Forward(model, x + h * z, fw.create_graph)
        a1 = fw1.loss_grad(y)
        values = fw.sqnorm(a1 - a0)
    return _finish(fw, values, return_logits)


#: The one-backward estimators of R_H (``hessian_trace(n_samples=n, estimator=...)``).
HESSIAN_ESTIMATORS = ("gaussian", "labels", "labels-pathwise")


def hessian_trace(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    n_samples: int | None = None,
    *,
    estimator: str = "gaussian",
    generator: torch.Generator | None = None,
    return_logits: bool = False,
):
    """Trace of the loss Hessian R_H = tr ∇ₓ²ℓ, per sample, for piecewise-linear models.

    For σ_a networks ∇ₓ²ℓ = Jᵀ S J (fact T7), so R_H = tr(S J Jᵀ) = Σ_k p_k ‖∇f_k − Jᵀp‖²
    (fact T8; it does not depend on y, which is only validated). ``model`` must be piecewise
    linear (``robustreg.models.check_piecewise_linear``); otherwise a ``ValueError`` says which
    module breaks it.

    ``n_samples=None``: exact, as Σ_k p_k ‖Jᵀ(p − e_k)‖² = Σ_k p_k ‖∇ₓℓ(x, k)‖² from K
    vector–Jacobian products in one batched backward pass.

    ``n_samples=n``: the mean of n one-backward draws ‖Jᵀu‖² with E[uuᵀ] = S, by ``estimator``:

    - ``"gaussian"`` (default): u = B v, v ~ N(0, I_K), B = (I − p1ᵀ) diag(√p), so BBᵀ = S.
      v does not depend on θ, so both the value and its gradient are unbiased (the gradient
      flows through B(p) and J); the relative variance of one draw is at most 2.
    - ``"labels"``: the Fisher estimate (fact T9) ‖∇ₓℓ(x, y′)‖², y′ ~ p (u = p − e_{y′}),
      plus the score-function (REINFORCE) term (‖g_{y′}‖² − b)·∇_θ log p_{y′} through a
      surrogate whose value is exactly zero: value and gradient unbiased. The baseline b is the
      mean of the other n − 1 draws (none when n = 1). Its variance explodes on confident inputs
      (ch. 07).
    - ``"labels-pathwise"``: the same labels without the score term. The value is unbiased but
      the gradient is not: with the labels held fixed autograd returns E[∇_θ ‖g_{y′}‖²], which
      misses Σ_k ‖g_k‖² ∇_θ p_k of ∇_θ R_H = Σ_k (p_k ∇_θ‖g_k‖² + ‖g_k‖² ∇_θ p_k), g_k =
      ∇ₓℓ(x, k) — it trains tr(Jᵀ stopgrad(S) J). Kept, under this explicit name, to reproduce
      runs that used it.

    The labels are drawn from ``p`` detached (sampling is not differentiable).
    """
    check_count("n_samples", n_samples, none="exact")
    check_generator(generator)
    if estimator not in HESSIAN_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(HESSIAN_ESTIMATORS)}")
    _require_piecewise_linear(model, "hessian_trace")
    fw = _forward(model, x, y)
    B, K = fw.logits.shape
    with torch.enable_grad():
        p = torch.softmax(fw.logits, dim=1)
        if n_samples is None:
            labels = torch.arange(K, device=p.device)[:, None].expand(K, B)
            cot = _residual(p, labels)  # p − e_k (the sign does not matter), [K, B, K]
            sq = fw.sqnorm(fw.vjps(cot))  # ‖∇f_k − Jᵀp‖², [K, B]
            values = (p.T * sq).sum(0)
        elif estimator == "gaussian":
            v = _randn((n_samples, B, K), p, generator)
            sqrt_p = torch.exp(
                0.5 * torch.log_softmax(fw.logits, dim=1)
            )  # finite derivative at p → 0
            cot = sqrt_p * v - p * (sqrt_p * v).sum(-1, keepdim=True)  # B v, [n, B, K]
            values = fw.sqnorm(fw.vjps(cot)).mean(0)
        else:
            labels = _sample_labels(p.detach(), n_samples, generator)  # [n, B]
            cot = _residual(p, labels)  # p − e_{y′}, [n, B, K]
            sq = fw.sqnorm(fw.vjps(cot))  # [n, B]
            values = sq.mean(0)
            if estimator == "labels":
                logp = torch.log_softmax(fw.logits, dim=1).gather(1, labels.T).T  # [n, B]
                reward = sq.detach()
                if n_samples > 1:
                    reward = reward - (reward.sum(0, keepdim=True) - reward) / (n_samples - 1)
                values = values + (reward * (logp - logp.detach())).mean(0)
    return _finish(fw, values, return_logits)


# ----------------------------------------------------------------------------------------------
# later regularizers
# ----------------------------------------------------------------------------------------------


def _uniform(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[−1, 1) draws on the generator's device, in float64 (the same draws for every dtype)."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return (2 * u - 1).to(device=like.device, dtype=like.dtype)


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def grad_align(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 0.1,
    *,
    clean_gradient: str = "differentiated",
    generator: torch.Generator | None = None,
    return_logits: bool = False,
):
    """GradAlign (Andriushchenko & Flammarion 2020), per sample:

        R_GA = 1 − cos(∇ₓℓ(x, y), ∇ₓℓ(x + η, y)),   η ~ U([−ε, ε]^d), one draw per sample,

    x + η not clipped to the input box (as in the public code). A sample where either gradient
    is 0 gets R_GA = 0 (the public code drops it from its batch mean). Inside the linear region
    of x the two gradients differ only through the softmax: ∇ₓℓ(x + η) − ∇ₓℓ(x) = Jᵀ(p(x + η) −
    p(x)), fact T10's softmax term with the step η.

    ``clean_gradient``: ``"differentiated"`` (default; the paper's Ω, whose one-draw value and
    parameter gradient are unbiased for E_η) or ``"detached"`` (the public code's FGSM recipe,
    which backpropagates through the gradient at x + η only: a biased gradient of Ω).
    """
    check_positive("eps", eps)
    if clean_gradient not in ("differentiated", "detached"):
        raise ValueError(
            f"unknown clean_gradient {clean_gradient!r}; valid: 'differentiated', 'detached'"
        )
    check_generator(generator)
    fw = _forward(model, x, y)
    with torch.enable_grad():
        g0 = fw.to_input(fw.loss_grad(y)).flatten(1)
        if clean_gradient == "detached":
            g0 = g0.detach()
        eta = eps * _uniform(x.shape, x, generator)
        fw1 = _Forward(model, x + eta, fw.create_graph)
        g1 = fw1.to_input(fw1.loss_grad(y)).flatten(1)
        cos, ok = _cosine(g0, g1)
        values = torch.where(ok, 1 - cos, torch.zeros_like(cos))
    return _finish(fw, values, return_logits)


def _cosine(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(cos(a_i, b_i) per row, whether both rows are nonzero; cos = 0 where not), finite with a finite gradient however
    small the rows: each row is divided by its largest |entry| (a constant of the graph; the
    cosine is scale-invariant, so its value and gradient are unchanged) before any square is
    formed. Squares of the raw rows underflow in float32 below ≈ 1e-19 (‖a‖ rounds to 0 while a
    does not, and a/‖a‖ is then inf in the backward pass) — as the loss gradients of a confident
    network do. A row whose largest entry is below tiny/ε of its dtype (≈ 1e-31 in float32, where
    dividing by it could overflow the backward pass) counts as 0."""
    # below this 1/s, times the gradients that flow back through it, can overflow: the row is 0
    tiny = torch.finfo(a.dtype).tiny / torch.finfo(a.dtype).eps
    sa = a.detach().abs().amax(1, keepdim=True)
    sb = b.detach().abs().amax(1, keepdim=True)
    ok = ((sa >= tiny) & (sb >= tiny)).squeeze(1)
    ua = torch.where(sa >= tiny, a / torch.where(sa >= tiny, sa, 1.0), 0.0)
    ub = torch.where(sb >= tiny, b / torch.where(sb >= tiny, sb, 1.0), 0.0)
    na, nb = ua.norm(dim=1), ub.norm(dim=1)
    cos = (ua * ub).sum(1) / torch.where(ok, na * nb, torch.ones_like(na))
    return torch.where(ok, cos, torch.zeros_like(cos)), ok


def local_linearity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 0.1,
    *,
    mu: float = 0.3,
    steps: int = 10,
    box: bool = True,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
):
    """Local linearity regularizer (Qin et al. 2019), per sample:

        R_LLR = g(δ*) + μ |δ*ᵀ∇ₓℓ(x)|,   g(δ) = |ℓ(x + δ) − ℓ(x) − δᵀ∇ₓℓ(x)|,

    δ* an approximate maximizer of g over ‖δ‖∞ ≤ ε (and x + δ ∈ [0, 1]^d when ``box``): from a
    uniform random start, ``steps`` signed-gradient ascent steps of size 2.5ε/steps on g with
    ∇ₓℓ(x) held fixed, projected after each, keeping the iterate with the largest g. δ* is then a
    constant (Danskin's theorem: at the exact, unique maximizer the gradient of the maximum is
    the gradient of g there; δ* is an approximation of it);
    ℓ(x + δ*), ℓ(x) and ∇ₓℓ(x) are differentiated. g is the remainder of the first-order
    expansion of fact T3: inside the linear region of x it is ∫₀¹ (1 − t) δᵀ Jᵀ S(x + tδ) J δ dt
    with the Hessian of fact T7. The public code finds δ* with 10 Adam steps (learning rate 0.1)
    and weights its terms as 2·ce + 4·(g + 0.3·|δᵀ∇ℓ|); ``mu = 0.3`` is its μ.
    """
    check_positive("eps", eps)
    check_nonnegative("mu", mu)
    check_count("steps", steps, minimum=0)
    check_generator(generator)
    fw = _forward(model, x, y)
    with torch.enable_grad():
        loss0 = _ce(fw.logits, y)
        g0 = fw.to_input(fw.loss_grad(y))
    x0, l0, grad0 = x.detach(), loss0.detach(), g0.detach()

    def remainder(delta: Tensor) -> Tensor:
        lin = (delta * grad0).flatten(1).sum(1)
        return (_ce(model(x0 + delta), y) - l0 - lin).abs()

    def project(delta: Tensor) -> Tensor:
        delta = delta.clamp(-eps, eps)
        return (x0 + delta).clamp(0, 1) - x0 if box else delta

    delta = project(eps * _uniform(x.shape, x, generator))
    with torch.no_grad():
        best, best_g = delta, remainder(delta)
    alpha = 2.5 * eps / max(steps, 1)
    for _ in range(steps):
        with torch.enable_grad():
            d = delta.detach().requires_grad_(True)
            (step,) = torch.autograd.grad(remainder(d).sum(), d)
        delta = project(delta + alpha * step.sign())
        with torch.no_grad():
            g_new = remainder(delta)
            better = (g_new > best_g).view(-1, *[1] * (x.dim() - 1))
            best, best_g = torch.where(better, delta, best), torch.maximum(g_new, best_g)
    with torch.enable_grad():
        lin = (best * g0).flatten(1).sum(1)
        values = (_ce(model(x + best), y) - loss0 - lin).abs() + mu * lin.abs()
    return _finish(fw, values, return_logits)


def _hinge_of_smallest(dist: Tensor, n: int, gamma: float) -> Tensor:
    """Mean over the n smallest distances per row of (1 − d/γ)₊ (inf distances give 0)."""
    smallest = torch.topk(dist, min(n, dist.shape[1]), dim=1, largest=False).values
    return F.relu(1 - smallest / gamma).sum(1) / n


def mmr(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str = "l2",
    gamma_b: float = 1.0,
    gamma_d: float = 1.0,
    n_b: int = 1,
    n_d: int = 1,
    return_logits: bool = False,
):
    """Maximum margin regularizer MMR (Croce, Andriushchenko & Hein 2019), per sample:

        R_MMR = (1/n_B) Σ_{n_B smallest j} (1 − d_B,j/γ_B)₊ + (1/n_D) Σ_{n_D smallest k≠y} (1 − d_D,k/γ_D)₊,

    d_B,j = |z_j(x)| / ‖∇ₓz_j‖_q the ℓp distance to the hyperplane of rectifier unit j (z_j its
    pre-activation) and d_D,k = (f_y − f_k) / ‖∇f_y − ∇f_k‖_q the *signed* ℓp distance to the
    decision hyperplane of class k of the local affine map (negative when k outscores y), q the
    dual exponent of ``norm`` ("l2" → 2, "linf" → 1, "l1" → ∞). Units with ∇z_j = 0 (never met
    inside the region) have d = inf; a class k with ∇f_k = ∇f_y has d = +inf if it is behind y
    and −inf if it is ahead. With n_B = n_D = 1 and y the predicted class, the two distances are
    the two terms of fact T12 (in ℓp): R_MMR = 0 iff the region radius is ≥ γ_B and the margin
    radius ≥ γ_D, so the certified radius is ≥ min(γ_B, γ_D). Max-pool boundaries are not counted (MMR's networks
    have none). The public code sums over the n_D closest classes *including* y (hinge 0) and
    divides by n_D = K; here y is excluded. Cost: one backward pass per unit and per class
    (∇ₓz_j for every j), for small networks.
    """
    q = dual_exponent(norm, MMR_NORMS)
    check_positive("gamma_b", gamma_b)
    check_positive("gamma_d", gamma_d)
    check_count("n_b", n_b)
    check_count("n_d", n_d)
    _require_piecewise_linear(model, "mmr")
    check_batch(x)
    check_labels(y, x.shape[0])
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        logits, z = preactivations(model, xg)
        if z.shape[1] == 0:
            raise ValueError("mmr needs rectifier modules (nn.ReLU, nn.LeakyReLU, nn.PReLU)")
        check_logits(logits, x)
        check_labels(y, x.shape[0], logits.shape[1])
        k, u = logits.shape[1], z.shape[1]

        def grads(out: Tensor, n: int) -> Tensor:  # [n, B, d]: ∇ₓ out[:, j] for every j
            eye = torch.eye(n, dtype=out.dtype, device=out.device)
            cot = eye[:, None, :].expand(n, out.shape[0], n)
            (g,) = torch.autograd.grad(
                out, xg, cot, create_graph=create_graph, retain_graph=True, is_grads_batched=True
            )
            return g.flatten(2)

        gz, gf = grads(z, u), grads(logits, k)
        nz = dual_norm(gz, q, dim=-1).T  # [B, U]
        d_b = torch.where(nz > 0, z.abs() / torch.where(nz > 0, nz, 1.0), math.inf)
        rows = torch.arange(len(y), device=y.device)
        diff = gf[y, rows][None] - gf  # ∇f_y − ∇f_k, [K, B, d]
        nd = dual_norm(diff, q, dim=-1).T  # [B, K]
        margin = logits[rows, y][:, None] - logits
        # ∇f_y = ∇f_k on the region: the pair never crosses there; a class already ahead by a
        # constant is at distance −inf (full penalty), one behind at +inf
        unreachable = torch.where(margin < 0, -math.inf, math.inf)
        d_d = torch.where(nd > 0, margin / torch.where(nd > 0, nd, 1.0), unreachable)
        d_d = d_d.masked_fill(F.one_hot(y, k).bool(), math.inf)
        values = _hinge_of_smallest(d_b, n_b, gamma_b) + _hinge_of_smallest(d_d, n_d, gamma_d)
    return _finish_values(logits, create_graph, values, return_logits)


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Tensor]] = {
    "input_gradient": input_gradient,
    "jacobian_frobenius": jacobian_frobenius,
    "cross_lipschitz": cross_lipschitz,
    "curvature": curvature,
    "hessian_trace": hessian_trace,
}


_LATER: dict[str, Callable[..., Tensor]] = {
    "local_linearity": local_linearity,
    "grad_align": grad_align,
    "mmr": mmr,
}


def later_names() -> tuple[str, ...]:
    """The three later regularizers, also accepted by :func:`get`."""
    return tuple(_LATER)


def names() -> tuple[str, ...]:
    """The regularizer names accepted by :func:`get`, in the order of the table of book/notation.md."""
    return tuple(_REGISTRY)


def get(name: str) -> Callable[..., Tensor]:
    """The regularizer called ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    return lookup({**_REGISTRY, **_LATER}, name, "regularizer")
