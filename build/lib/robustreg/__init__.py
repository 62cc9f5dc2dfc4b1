"""robustreg: regularizers for robust piecewise-affine networks, and the identities that connect them.

Modules, from the bottom up: ``models`` (rectified networks), ``geometry`` (Jacobians, linear
regions, certified radii), ``regularizers`` (input gradient, Jacobian, cross-Lipschitz, curvature,
Hessian trace), ``conventions`` (the original papers' normalizations), ``reference`` (autograd
references), ``attacks`` (FGSM, PGD, minimal perturbations), ``art_attacks`` (ART's PGD and
AutoAttack), ``training`` (the training loop), ``evaluation`` (metrics and tables), ``data``, ``files`` (atomic writes), ``extras`` (optional
dependencies), ``plotting``, ``cases`` (random architectures for checks), ``checks`` (the one
tolerance rule of the chapters and the tests), ``tensors`` (joining per-case results) and
``notebook`` (the chapters' parameter contract and reproducibility). Only torch and numpy are
required. Above them, the experiment layer ``robustreg.study`` (grids of training runs, their
result files and published models, the matched-strength study) needs the extra
``robustreg[experiments]``.
"""

__version__ = "0.1.0"
