"""Factors between our per-sample regularizer values and the original papers' and code's terms.

Our regularizers (:mod:`robustreg.regularizers`) return per-sample values with the
normalizations of book/notation.md, and a training loss adds ``lam * values.mean()``. The papers that
introduced them add other multiples to their losses. :func:`to_original` turns a batch of our
values ``R[B]`` into the term the original method adds to its loss for that batch (a scalar, for
weight ``lam``); :data:`CONVENTIONS` states each conversion with its source. Let B be the batch
size, K the number of classes and ``mean`` the batch average.

=======================  ==================  ========================================================
``name``                 our regularizer     the original term, in our values
=======================  ==================  ========================================================
``hoffman2019``          jacobian_frobenius  (λ/2)·mean R_J   (in expectation over their projections)
``jakubovitz2018``       jacobian_frobenius  λ·mean √R_J   (the paper)
``jakubovitz2018_code``  jacobian_frobenius  λ·√R_J of the batch's first sample (their public code)
``ross2018``             input_gradient      λ·(1/(2B))·mean R_IG = λ·Σ_b R_IG,b / (2B²)
``ross2018_l1``          input_gradient l1   λ·mean ‖∇ₓℓ‖₁   (one factor 1/B, cancelled by the sum)
``hein2017``             cross_lipschitz     λ·mean R_CL   (identical)
``cure2019``             curvature           λ·mean √R_CURE   (their public code)
``gradalign2020``        grad_align          λ·mean R_GA   (when no sample's gradient vanishes)
``llr2019``              local_linearity     λ·mean R_LLR   (their released configuration: λ = 4, μ = 0.3,
                                             beside 2·ce)
=======================  ==================  ========================================================

So a loss ``ce + lam_ours * R.mean()`` matches Hoffman et al. with λ_JR = 2·lam_ours, Ross &
Doshi-Velez with λ = 2B·lam_ours (their ℓ1 variant with λ = lam_ours), and Hein &
Andriushchenko with λ = lam_ours (:func:`factor` gives these factors). Jakubovitz & Giryes and
the CURE code penalize the unsquared norm, which no constant factor converts: its gradient is
that of ours divided by 2√R per sample, so samples with a small value weigh relatively more.
The CURE code's defaults are h = 3 and λ = 4 (:func:`robustreg.regularizers.curvature`
discusses h), and it evaluates the regularizer with the model in eval mode, whereas our
regularizers run the model in whatever mode the caller set (training mode in a training step).
Jakubovitz & Giryes' public code penalizes the first sample of each batch only
(``jakubovitz2018_code``), where their paper averages over the batch (``jakubovitz2018``). Each entry's ``relation`` gives the derivation; ``tests/test_conventions.py``
checks every conversion against a direct transcription of the original formula or code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._lookup import lookup

__all__ = ["CONVENTIONS", "Convention", "factor", "get", "names", "to_original"]


@dataclass(frozen=True)
class Convention:
    """One original normalization: where it comes from and how our values map to it.

    ``convert(values, lam)`` takes our per-sample values ``R[B]`` (one batch) and returns the term
    the original method adds to its loss for that batch, as a 0-dim tensor.
    """

    name: str  #: key for :func:`get` / :func:`to_original`
    regularizer: str  #: our regularizer (robustreg.regularizers name, with options)
    citation: str  #: bibliography key (book/references.bib)
    source: str  #: paper and code the original formula is taken from
    original: str  #: the original term, in the original's words and symbols
    relation: str  #: the conversion, derived
    convert: Callable[[Tensor, float], Tensor]

    def __call__(self, values: Tensor, lam: float = 1.0) -> Tensor:
        return self.convert(_check_values(values), lam)


def _check_values(values) -> Tensor:
    if not isinstance(values, Tensor) or values.dim() != 1 or values.numel() == 0:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a non-empty 1-D tensor of per-sample values; got {shape}")
    return values


def _batch(values: Tensor) -> int:
    return values.shape[0]


_LIST = [
    Convention(
        name="hoffman2019",
        regularizer="jacobian_frobenius",
        citation="hoffman2019",
        source=(
            "Hoffman, Roberts & Yaida (2019), Robust learning with Jacobian regularization, "
            "arXiv:1908.02729, Algorithm 1; code: facebookresearch/jacobian_regularizer, "
            "JacobianReg.forward"
        ),
        original=(
            "loss = L_super + λ_JR · R with R = ½ · Σ_b C‖J_bᵀ v̂_b‖² / (n_proj · B), "
            "v̂_b uniform on the unit sphere S^{C−1} (C = K classes), one draw per sample "
            "and projection; n = −1 uses the C basis vectors instead (exact)"
        ),
        relation=(
            "E[v̂ v̂ᵀ] = I/K, so E[K‖Jᵀv̂‖²] = tr(J Jᵀ)·K/K = ‖J‖_F² = R_J: each sample's "
            "projection term K‖Jᵀv̂‖² is an unbiased estimate of R_J, and with the basis "
            "vectors it equals R_J exactly. Hence R = ½·mean R_J (in expectation) and the "
            "added term is (λ_JR/2)·mean R_J; their λ_JR is 2× our λ. Their unit-norm "
            "projection (scaled by √K) has variance (2K/(K+2))(‖JJᵀ‖_F² − R_J²/K) per draw, "
            "below the 2‖JJᵀ‖_F² of our Gaussian v; both are unbiased"
        ),
        convert=lambda v, lam: 0.5 * lam * v.mean(),
    ),
    Convention(
        name="jakubovitz2018",
        regularizer="jacobian_frobenius",
        citation="jakubovitz2018",
        source=(
            "Jakubovitz & Giryes (2018), Improving DNN robustness to adversarial attacks using "
            "Jacobian regularization, ECCV"
        ),
        original=(
            "per training example λ·‖J(x)‖_F, J the Jacobian of the last layer before the "
            "softmax (our logits), unsquared; averaged over the batch like the data loss"
        ),
        relation="‖J‖_F = √R_J per sample, so the term is λ·mean √R_J",
        convert=lambda v, lam: lam * v.sqrt().mean(),
    ),
    Convention(
        name="jakubovitz2018_code",
        regularizer="jacobian_frobenius",
        citation="jakubovitz2018",
        source=(
            "Jakubovitz & Giryes (2018); code: danieljakubovitz/Jacobian_Regularization, "
            "MNIST_JacobianRegularization.py (TensorFlow 1)"
        ),
        original=(
            "λ · tf.norm(Jacobian), Jacobian = concat_i tf.gradients(y_flat[i], x) for "
            "i < K, y_flat = reshape(logits, (−1,)): the K logits of the *first* sample of the "
            "batch; λ = 0.1 in the post-processing phase (batches of 500)"
        ),
        relation=(
            "y_flat[i] for i < K are the logits of sample 1, whose gradients vanish on every "
            "other sample, so the Frobenius norm is ‖J(x_1)‖_F = √R_J,1: the term is λ·√R_J of "
            "the first sample, not a batch mean (12 % from λ·mean √R_J on a test batch). With "
            "shuffled batches the first sample is a uniform draw, so it is an unbiased one-sample "
            "estimate of λ·E√R_J, with B times its variance"
        ),
        convert=lambda v, lam: lam * v[0].sqrt(),
    ),
    Convention(
        name="ross2018",
        regularizer="input_gradient",
        citation="ross2018",
        source=(
            "Ross & Doshi-Velez (2018), Improving the adversarial robustness and "
            "interpretability of deep neural networks by regularizing their input gradients, "
            "AAAI; code: dtak/adversarial-robustness-public, NeuralNetwork.l2_double_backprop"
        ),
        original=(
            "λ · tf.nn.l2_loss(tf.gradients(reduce_mean(cross-entropy), X)) "
            "= λ·½‖∇_X (1/B) Σ_b ℓ_b‖²"
        ),
        relation=(
            "the gradient of the batch-mean loss w.r.t. sample b is ∇ℓ_b / B (samples are "
            "independent), so ½‖·‖² = Σ_b R_IG,b / (2B²) = mean R_IG / (2B): each sample "
            "carries 1/B² and the term shrinks with the batch size; their λ is 2B× our λ"
        ),
        convert=lambda v, lam: lam * v.sum() / (2 * _batch(v) ** 2),
    ),
    Convention(
        name="ross2018_l1",
        regularizer="input_gradient(norm='l1')",
        citation="ross2018",
        source=(
            "Ross & Doshi-Velez (2018); code: dtak/adversarial-robustness-public, "
            "NeuralNetwork.l1_double_backprop"
        ),
        original="λ · reduce_sum(|tf.gradients(reduce_mean(cross-entropy), X)|)",
        relation="Σ_b ‖∇ℓ_b / B‖₁ = mean ‖∇ℓ‖₁ (one factor 1/B, the ℓ1 norm is 1-homogeneous)",
        convert=lambda v, lam: lam * v.mean(),
    ),
    Convention(
        name="hein2017",
        regularizer="cross_lipschitz",
        citation="hein2017",
        source=(
            "Hein & Andriushchenko (2017), Formal guarantees on the robustness of a classifier "
            "against adversarial manipulation, NeurIPS (cross-Lipschitz regularization)"
        ),
        original="λ · (1/(nK²)) Σ_i Σ_{l,m} ‖∇f_l(x_i) − ∇f_m(x_i)‖₂²",
        relation="our R_CL is the inner (1/K²) Σ_{l,m}; the average over the n samples is mean",
        convert=lambda v, lam: lam * v.mean(),
    ),
    Convention(
        name="cure2019",
        regularizer="curvature",
        citation="moosavi2019",
        source=(
            "Moosavi-Dezfooli, Fawzi, Uesato & Frossard (2019), Robustness via curvature "
            "regularization, and vice versa, CVPR; code: F-Salehi/CURE_robustness, "
            "CURE.regularizer (PyTorch 1.0)"
        ),
        original=(
            "λ · Σ_b ‖grad_diff_b‖₂ / B with grad_diff = autograd.grad(mean ℓ(x + z) − "
            "mean ℓ(x), x, grad_outputs=ones(B)), z = h·(sign(g) + 1e-7)/(‖sign(g)‖₂ + 1e-7), "
            "g = ∇ₓ of the batch loss; its train() computes the regularizer with the model in "
            "eval mode (batch norm with running statistics, no dropout) and a constant h = 3, "
            "λ = 4; the warm-up schedule of h (0.1, 0.4, 0.8, 1.8, 3) is in its example notebook"
        ),
        relation=(
            "the norm is unsquared: ‖grad_diff_b‖ = √R_CURE,b, so the term is λ·mean √R_CURE. "
            "The loss is a batch mean (nn.CrossEntropyLoss()), but grad_outputs=ones(B) for "
            "that scalar was summed to the cotangent B by the engine of PyTorch 1.0, which "
            "accepted any grad_outputs the output's shape expands to and summed it back "
            "(pytorch/pytorch#17893; rejected since #25349, PyTorch 1.3). That cancels the 1/B "
            "of the mean: grad_diff_b = ∇ℓ(x_b + z_b) − ∇ℓ(x_b). Were it read as the cotangent "
            "1 instead, the term would be (λ/B)·mean √R_CURE. "
            "Their h is the same ℓ2 step length as ours; their z differs from ours only by the "
            "1e-7 terms (coordinates with a zero gradient move by ≈ h·1e-7/‖sign(g)‖)"
        ),
        convert=lambda v, lam: lam * v.sqrt().mean(),
    ),
    Convention(
        name="gradalign2020",
        regularizer="grad_align(clean_gradient='detached')",
        citation="andriushchenko2020gradalign",
        source=(
            "Andriushchenko & Flammarion (2020), Understanding and improving fast adversarial "
            "training, NeurIPS; code: tml-epfl/understanding-fast-adv-training, train.py "
            "(FGSM recipe) and utils.get_input_grad"
        ),
        original=(
            "λ · (1 − mean_{i∈S} cos(g1_i, g2_i)), g1 = ∇ₓ mean ce(x) (detached), g2 = ∇ₓ mean "
            "ce(x + η) (create_graph), η ~ U[−ε, ε]^d unclipped, S the samples whose two "
            "gradients are nonzero; λ = 0.2 for ε = 8/255 on CIFAR-10"
        ),
        relation=(
            "the 1/B of the batch means cancels in each cosine, so with S the whole batch the "
            "term is λ·mean R_GA with our clean_gradient='detached' (value and gradient); a "
            "sample with a zero gradient has R_GA = 0 here and is left out of their mean"
        ),
        convert=lambda v, lam: lam * v.mean(),
    ),
    Convention(
        name="llr2019",
        regularizer="local_linearity(mu=0.3)",
        citation="qin2019",
        source=(
            "Qin et al. (2019), Adversarial robustness through local linearization, NeurIPS; "
            "code: deepmind/local_linearity_regularizer, regularizers.local_linearity, config.py"
        ),
        original=(
            "loss = 2·mean ce + 4·mean_i [|ℓ_i(x+δ*) − ℓ_i(x) − δ*ᵀG_i| + 0.3·|δ*ᵀG_i|], "
            "G_i = ∇ₓ Σ_j ℓ_j (per sample), δ* from 10 Adam steps (lr 0.1) on the batch mean of "
            "|·| from a uniform start in the ε-ball ∩ [0, 1]^d, ε = 8/255"
        ),
        relation=(
            "the bracket is our R_LLR with μ = 0.3 for the same δ*, so their term is λ·mean "
            "R_LLR with λ = 4; relative to a unit-weight cross-entropy (their 2·ce) our λ is 2. "
            "Their δ* comes from Adam, ours from signed-gradient steps: the same objective, "
            "another approximate maximizer"
        ),
        convert=lambda v, lam: lam * v.mean(),
    ),
]

#: name → :class:`Convention`
CONVENTIONS: dict[str, Convention] = {c.name: c for c in _LIST}


def names() -> tuple[str, ...]:
    """The convention names accepted by :func:`get` and :func:`to_original`."""
    return tuple(CONVENTIONS)


def get(name: str) -> Convention:
    """The :class:`Convention` called ``name``; unknown names raise ``ValueError`` listing the valid."""
    return lookup(CONVENTIONS, name, "convention")


def to_original(name: str, values: Tensor, lam: float = 1.0) -> Tensor:
    """The term convention ``name`` adds to its loss for a batch with our per-sample ``values``.

    ``values`` is one batch of our regularizer values (``R[B]``, as returned by
    :mod:`robustreg.regularizers`); ``lam`` is the original method's weight. Returns a 0-dim
    tensor, differentiable like ``values``. Example: ``to_original("ross2018", R, lam=10.0)``.
    """
    return get(name)(values, lam)


def factor(name: str, batch_size: int) -> float:
    """For the conventions linear in our values: the term per unit of ``lam * values.mean()``.

    ``hoffman2019``: 1/2; ``ross2018``: 1/(2B); ``ross2018_l1`` and ``hein2017``: 1. The
    square-root conventions (``jakubovitz2018``, ``jakubovitz2018_code``, ``cure2019``) are not
    linear and raise.
    """
    conv = get(name)
    if name in ("jakubovitz2018", "jakubovitz2018_code", "cure2019"):
        raise ValueError(f"convention {name!r} is not linear in our values ({conv.relation})")
    ones = torch.ones(int(batch_size), dtype=torch.float64)
    return float(conv(ones, 1.0))
