"""robustreg: regularizers for robust piecewise-affine networks, and the identities that connect them.

Modules: ``models`` (rectified networks), ``geometry`` (Jacobians, linear regions, certified radii),
``regularizers`` (input gradient, Jacobian, cross-Lipschitz, curvature, Hessian trace),
``conventions`` (the original papers' normalizations), ``data``, ``training``, ``attacks``,
``evaluation``, ``experiments`` (the grid of training runs, its result files and published models), ``plotting``, ``cases`` (random architectures for checks) and ``notebook``
(the chapters' parameter contract and checks).
"""

__version__ = "0.1.0"
