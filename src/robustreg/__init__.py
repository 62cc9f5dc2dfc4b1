"""robustreg: regularizers for robust piecewise-affine networks, and the identities that connect them.

Modules, from the bottom up: ``models`` (rectified networks), ``geometry`` (Jacobians, linear
regions, certified radii), ``regularizers`` (input gradient, Jacobian, cross-Lipschitz, curvature,
Hessian trace), ``conventions`` (the original papers' normalizations), ``reference`` (autograd
references), ``attacks`` (FGSM, PGD, minimal perturbations), ``art_attacks`` (ART's PGD and
AutoAttack), ``training`` (the training loop), ``runs`` (one run named by its configuration, cached
on disk), ``profiles`` and ``experiments`` (grids of runs, result files, published models),
``evaluation`` (metrics and tables), ``data``, ``files`` (atomic writes), ``extras`` (optional
dependencies), ``plotting``, ``cases`` (random architectures for checks) and ``notebook`` (the
chapters' parameter contract and checks). Only torch and numpy are required; the experiment stack
is the extra ``robustreg[experiments]``.
"""

__version__ = "0.1.0"
