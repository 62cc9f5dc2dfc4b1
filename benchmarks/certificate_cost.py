"""Cost of the certified radius (fact T12) relative to one forward-and-backward pass.

For the published plain MLP 784-256-256-10 (``results/default/plain_seed0``) on the first 100
MNIST test images, float64, one thread: the median wall time of
:func:`robustreg.geometry.certified_radius` (ℓ2, ℓ∞, ℓ1) and, for comparison, of the
forward-mode computation it replaced (``--with-forward-mode``), each with its ratio to one
forward-and-backward pass of the same batch measured in the same run. ``--random`` measures a
randomly initialised network on uniform noise instead (half of its ReLU units are on, against
three quarters for the trained network on MNIST digits; the layer-wise pass multiplies only the
columns of the units that are on). Timings are interleaved round-robin so that load from other
processes hits all variants alike. No timing is asserted anywhere; the target of issue 26 is
≤ 0.15 s per 100 images (ratio ≤ 30). Measured (2026-12-05, this 2-core machine, quiet): 0.124,
0.134 and 0.144 s for ℓ2, ℓ∞ and ℓ1, 24, 26 and 28 passes; the forward-mode path 4.1 s.

    python benchmarks/certificate_cost.py [--rounds 5] [--with-forward-mode] [--random] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from robustreg import data, geometry, models, study

N_IMAGES = 100
ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "results" / "default" / "plain_seed0.json"


def forward_backward(model, x):
    xg = x.clone().requires_grad_(True)
    model(xg).logsumexp(1).sum().backward()


def forward_mode_certificate(model, x, norm):
    """The radius as the forward-mode path computes it (for the comparison only)."""
    q = {"l2": 2.0, "linf": 1.0, "l1": float("inf")}[norm]
    c, valid, gnorm = geometry._constraints_forward(model, x, 2**22, q)
    dist = torch.where(valid & (gnorm > 0), c.abs() / gnorm, torch.full_like(c, float("inf")))
    return torch.minimum(geometry.margin_radius(model, x, norm), dist.min(1).values)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--with-forward-mode", action="store_true")
    parser.add_argument("--random", action="store_true", help="random weights, uniform inputs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.random:
        model = models.mlp(784, 10, hidden=(256, 256)).double().eval()
        x = torch.rand(N_IMAGES, 1, 28, 28, dtype=torch.float64)
        what = "random MLP 784-256-256-10, uniform inputs"
    else:
        model = study.load_model(PUBLISHED).double()
        x = data.load("mnist5k", "test", dtype=torch.float64)[0][:N_IMAGES]
        what = "published plain MLP 784-256-256-10, MNIST test images"
    on = geometry.activation_pattern(model, x).double().mean().item()
    variants = {"forward+backward": lambda: forward_backward(model, x)}
    for norm in ("l2", "linf", "l1"):
        variants[f"certified_radius {norm}"] = lambda n=norm: geometry.certified_radius(model, x, n)
    if args.with_forward_mode:
        variants["forward-mode l2 (before)"] = lambda: forward_mode_certificate(model, x, "l2")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["forward+backward"])
    rows = {}
    print(f"{N_IMAGES} images, {what}, float64, {args.threads} thread(s)")
    print(f"ReLU units on: {on:.0%}")
    print(f"{'variant':28s} {'median s':>10s} {'÷ fwd+bwd':>10s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_s": med, "ratio": med / base}
        print(f"{name:28s} {med:10.4f} {med / base:10.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
