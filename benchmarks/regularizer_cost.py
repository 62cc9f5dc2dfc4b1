"""Cost of one training step with each regularizer, relative to a plain cross-entropy step.

For the MLP 784-256-256-10 and LeNet on 28×28 inputs, batch 128, float32, 2 CPU threads: the
median wall time of one full training step (forward, regularizer, backward, SGD update) for every
regularizer and estimator, and its ratio to a plain cross-entropy step measured in the same run.

The steps are timed interleaved, round-robin (one step of each variant per round), so that load
from other processes on the machine hits all variants alike; the ratio is the median over rounds
of (variant time / plain time in the same round). A regularized step reuses the regularizer's
forward pass for the data loss (``return_logits=True``)::

    values, logits = regularizer(model, x, y, return_logits=True, **options)
    loss = F.cross_entropy(logits, y) + lam * values.mean()

Run ``python benchmarks/regularizer_cost.py`` (``--json PATH`` also writes the table;
``--rounds``, ``--models``, ``--threads`` adjust the run). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from robustreg import models
from robustreg import regularizers as R

BATCH = 128
LAM = 0.1
LR = 0.01

#: (label, regularizer name, options, target ratio on the MLP or None); K = 10 for both models.
VARIANTS = [
    ("input_gradient", "input_gradient", {}, 2.5),
    ("input_gradient(l1)", "input_gradient", {"norm": "l1"}, 2.5),
    ("jacobian_frobenius(n_proj=1)", "jacobian_frobenius", {"n_proj": 1}, 2.5),
    ("jacobian_frobenius(exact)", "jacobian_frobenius", {}, 12.0),
    ("cross_lipschitz(n_proj=1)", "cross_lipschitz", {"n_proj": 1}, 2.5),
    ("cross_lipschitz(exact)", "cross_lipschitz", {}, 12.0),
    ("curvature", "curvature", {}, 4.5),
    ("hessian_trace(n_samples=1)", "hessian_trace", {"n_samples": 1}, 2.5),
    ("hessian_trace(exact)", "hessian_trace", {}, None),
]

MODELS = {
    "mlp": lambda: models.mlp(28 * 28, 10, hidden=(256, 256)),
    "lenet": lambda: models.lenet(1, 10),
}


def _plain_step(model, opt, x, y, generator):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _make_step(name: str, options: dict):
    fn = R.get(name)
    random = "n_proj" in options or "n_samples" in options

    def step(model, opt, x, y, generator):
        opt.zero_grad(set_to_none=True)
        extra = {"generator": generator} if random else {}
        values, logits = fn(model, x, y, return_logits=True, **options, **extra)
        loss = F.cross_entropy(logits, y) + LAM * values.mean()
        loss.backward()
        opt.step()

    return step


def _time(step, *args) -> float:
    t0 = time.perf_counter()
    step(*args)
    return time.perf_counter() - t0


def bench_model(model_name: str, rounds: int, warmup: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    steps = [("plain cross-entropy", _plain_step, None)]
    steps += [(label, _make_step(name, opts), target) for label, name, opts, target in VARIANTS]
    times: dict[str, list[float]] = {label: [] for label, _, _ in steps}
    for r in range(warmup + rounds):
        for label, step, _ in steps:
            t = _time(step, model, opt, x, y, gen)
            if r >= warmup:
                times[label].append(t)
    plain = times["plain cross-entropy"]
    rows = []
    for label, _, target in steps:
        ratios = [t / p for t, p in zip(times[label], plain, strict=True)]
        rows.append(
            {
                "model": model_name,
                "variant": label,
                "median_ms": 1e3 * statistics.median(times[label]),
                "ratio": statistics.median(ratios),
                "target": target if model_name == "mlp" else None,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | step | median ms | × plain | target (MLP) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        target = "" if r["target"] is None else f"≤ {r['target']:g}×"
        if r["target"] is not None and r["ratio"] > r["target"]:
            target += " (missed)"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['median_ms']:.2f} | {r['ratio']:.2f} | {target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.rounds, args.warmup)
    header = (
        f"batch {BATCH}, float32, {args.threads} threads, {args.rounds} rounds, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(header)
    print()
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setup": header, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
