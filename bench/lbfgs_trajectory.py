#!/usr/bin/env python3
"""Records torch.optim.LBFGS's trajectory on small problems, for the engine's L-BFGS test.

    bench/pytorch-env.sh python bench/lbfgs_trajectory.py > engine/tests/fixtures/lbfgs_torch_trajectory.json

f(x) = sum((A x - 1)^2) + 0.1 sum(x^4), float32, LBFGS(lr=1, history_size, line_search_fn=None,
tolerance_grad=-1, tolerance_change=-1), one step() of max_iter evaluations; every evaluated x is recorded.
"""
import json

import torch


def case(name, n, history_size, iterations, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    x0 = torch.randn(n, generator=g)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, history_size=history_size, max_iter=iterations,
                            tolerance_grad=-1, tolerance_change=-1, line_search_fn=None)
    iterates = []

    def closure():
        opt.zero_grad()
        iterates.append(x.detach().double().tolist())
        f = ((a @ x - 1) ** 2).sum() + 0.1 * (x ** 4).sum()
        f.backward()
        return f

    opt.step(closure)
    return {"name": name, "history_size": history_size, "a": a.flatten().tolist(), "x0": x0.tolist(),
            "iterates": iterates}


print(json.dumps({
    "torch": torch.__version__,
    "function": "sum((A x - 1)^2) + 0.1 sum(x^4)",
    "cases": [case("n8_history100", 8, 100, 25, 1), case("n12_history3", 12, 3, 30, 2)],
}, indent=1))
