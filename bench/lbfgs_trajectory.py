#!/usr/bin/env python3
"""Records torch.optim.LBFGS's trajectory on small problems, for the engine's L-BFGS test.

    bench/pytorch-env.sh python bench/lbfgs_trajectory.py > engine/tests/fixtures/lbfgs_torch_trajectory.json

Two functions, float32: "quartic", f(x) = sum((A x - 1)^2) + 0.1 sum(x^4) (convex: pairs are left out only
once it has converged, their curvature under 1e-10), and "cauchy", f(x) = sum(log(1 + (A x - 1)^2)) + 0.01
sum(x^2) (not convex: the cases chosen have pairs of negative curvature, which L-BFGS leaves out of its
history). LBFGS(lr=1, history_size, line_search_fn=None, tolerance_grad=-1, tolerance_change=-1), one step()
of max_iter evaluations; every evaluated x is recorded, and how many pairs were left out.
"""
import json

import torch


FUNCTIONS = {
    "quartic": lambda a, x: ((a @ x - 1) ** 2).sum() + 0.1 * (x ** 4).sum(),
    "cauchy": lambda a, x: torch.log1p((a @ x - 1) ** 2).sum() + 0.01 * (x ** 2).sum(),
}


def case(name, n, history_size, iterations, seed, function="quartic"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    x0 = torch.randn(n, generator=g)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, history_size=history_size, max_iter=iterations,
                            tolerance_grad=-1, tolerance_change=-1, line_search_fn=None)
    iterates, gradients = [], []

    def closure():
        opt.zero_grad()
        iterates.append(x.detach().double().tolist())
        f = FUNCTIONS[function](a, x)
        f.backward()
        gradients.append(x.grad.detach().clone())
        return f

    opt.step(closure)
    # the pairs (s, y) of consecutive evaluations whose curvature y^T s torch's test (> 1e-10) refuses
    left_out = sum(
        float((g1 - g0) @ (torch.tensor(x1) - torch.tensor(x0)).float()) <= 1e-10
        for (x0, x1), (g0, g1) in zip(zip(iterates, iterates[1:]), zip(gradients, gradients[1:])))
    return {"name": name, "function": function, "history_size": history_size, "a": a.flatten().tolist(),
            "x0": x0.tolist(), "iterates": iterates, "pairs_left_out": left_out}


print(json.dumps({
    "torch": torch.__version__,
    "cases": [case("n8_history100", 8, 100, 25, 1), case("n12_history3", 12, 3, 30, 2),
              case("n8_history3_cauchy", 8, 3, 12, 4, "cauchy"),
              case("n8_history3_cauchy_first_left_out", 8, 3, 12, 29, "cauchy")],
}, indent=1))
