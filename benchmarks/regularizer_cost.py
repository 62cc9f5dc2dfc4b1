"""Cost of one training step with each regularizer, relative to a plain cross-entropy step.

For the MLP 784-256-256-10 and LeNet on 28×28 inputs, batch 128, float32, 2 CPU threads: the
median wall time of one full training step (forward, regularizer, backward, SGD update) for every
regularizer and estimator, and its ratio to a plain cross-entropy step measured in the same run.

The steps are timed interleaved, round-robin (a few steps of each variant per round), so that
load from other processes on the machine hits all variants alike. Two ratios are reported: the
median over rounds of (variant time / plain time in the same round), and the ratio of the
minimum times (the best case, which on a busy machine is the more stable of the two). A
regularized step reuses the regularizer's forward pass for the data loss
(``return_logits=True``)::

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


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _time(step, *args) -> float:
    t0 = _clock()
    step(*args)
    return _clock() - t0


def bench_model(model_name: str, rounds: int, reps: int, warmup: int, seed: int = 0) -> list[dict]:
    """Time every variant, interleaved: per round, ``reps`` consecutive steps of each variant."""
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    steps = [("plain cross-entropy", _plain_step, None)]
    steps += [(label, _make_step(name, opts), target) for label, name, opts, target in VARIANTS]
    times: dict[str, list[list[float]]] = {label: [] for label, _, _ in steps}
    for r in range(warmup + rounds):
        for label, step, _ in steps:
            block = [_time(step, model, opt, x, y, gen) for _ in range(reps)]
            if r >= warmup:
                times[label].append(block)
    plain = times["plain cross-entropy"]
    rows = []
    for label, _, target in steps:
        per_round = [
            statistics.median(b) / statistics.median(p)
            for b, p in zip(times[label], plain, strict=True)
        ]
        flat = [t for b in times[label] for t in b]
        rows.append(
            {
                "model": model_name,
                "variant": label,
                "median_ms": 1e3 * statistics.median(flat),
                "min_ms": 1e3 * min(flat),
                "ratio": statistics.median(per_round),
                "ratio_min": min(flat) / min(t for b in plain for t in b),
                "target": target if model_name == "mlp" else None,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | step | median ms | min ms | × plain (median) | × plain (min) | target (MLP) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        target = "" if r["target"] is None else f"≤ {r['target']:g}×"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} "
            f"| {r['ratio']:.2f} | {r['ratio_min']:.2f} | {target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--reps", type=int, default=3, help="steps per variant and round (3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time (default) or process CPU time (with --threads 1: robust to preemption "
        "by other processes on a busy machine)",
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run"
    )
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.rounds, args.reps, args.warmup)
    header = (
        f"batch {BATCH}, float32, {args.threads} threads, {args.clock} clock, "
        f"{args.rounds} rounds × {args.reps} steps, "
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
