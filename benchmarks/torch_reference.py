"""The PCD + MALA training loop the way PyTorch EBM code runs it: eager PyTorch, one kernel
launch per operation, autograd for every Langevin gradient.

    pip install torch                                   # not a dependency of numpyro_ebm
    python benchmarks/torch_reference.py                # cuda if available, else cpu
    python benchmarks/torch_reference.py --chains 1024 16384 65536 --dim 64 --hidden 512 512

The same work per step as `benchmarks/step_throughput.py`'s hand-written JAX loop without the
learned log Z (`fit` does that too, so the comparison is conservative for `fit`): an MLP energy
(SiLU, plus 0.01‖x‖²), `--chains` persistent chains with 10% restarted at data points, 20 MALA
steps (Metropolis-adjusted, temperature 1), a batch of 1024 rows drawn with replacement, the
loss mean E(data) − mean E(negatives) + 0.01 (mean E(data)² + mean E(negatives)²), Adam
(β₁ = 0.5) with gradient clipping at norm 1, a parameter moving average and a Robbins-Monro
step-size update. float32; TF32 matmuls are switched off so that the precision is float32 as in
JAX's default on the GPU (`--tf32` switches them on). Prints ms per training step (median of
`--repeats` timed blocks of `--steps` steps after a warm-up block), to be compared with the JAX
numbers from `step_throughput.py` run on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import platform
import statistics
import time

import torch


def make_energy(dim: int, hidden: tuple[int, ...]) -> torch.nn.Module:
    sizes = (dim, *hidden, 1)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.SiLU())
    mlp = torch.nn.Sequential(*layers)

    class Energy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x)[:, 0] + 0.01 * (x**2).sum(1)

    return Energy()


def mala(energy, x, h: float, num_steps: int):
    """``num_steps`` MALA steps at temperature 1 on every chain; returns (x, mean acceptance)."""

    def logp_and_grad(z):
        z = z.detach().requires_grad_(True)
        lp = -energy(z)
        (g,) = torch.autograd.grad(lp.sum(), z)
        return lp.detach(), g

    lp, g = logp_and_grad(x)
    acc = []
    for _ in range(num_steps):
        prop = x + h * g + math.sqrt(2 * h) * torch.randn_like(x)
        lp_prop, g_prop = logp_and_grad(prop)
        fwd = ((prop - x - h * g) ** 2).sum(1) / (4 * h)
        bwd = ((x - prop - h * g_prop) ** 2).sum(1) / (4 * h)
        log_ratio = lp_prop - lp - bwd + fwd
        accept = torch.log(torch.rand_like(lp)) < log_ratio
        x = torch.where(accept[:, None], prop, x)
        lp = torch.where(accept, lp_prop, lp)
        g = torch.where(accept[:, None], g_prop, g)
        acc.append(torch.clamp(torch.exp(log_ratio), max=1.0).mean())
    return x.detach(), torch.stack(acc).mean()


def run(args, num_chains: int, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    data = torch.randn(50_000, args.dim, device=device)
    energy = make_energy(args.dim, tuple(args.hidden)).to(device)
    average = copy.deepcopy(energy)
    optimizer = torch.optim.Adam(energy.parameters(), lr=5e-3, betas=(0.5, 0.999))
    bank = data[torch.randint(0, len(data), (num_chains,), device=device)]
    h, t = 0.05, 0

    def step():
        nonlocal bank, h, t
        batch = data[torch.randint(0, len(data), (args.batch_size,), device=device)]
        fresh = batch[torch.randint(0, args.batch_size, (num_chains,), device=device)]
        restart = torch.rand(num_chains, 1, device=device) < 0.1
        starts = torch.where(restart, fresh, bank)
        negatives, acceptance = mala(energy, starts, h, args.mcmc_steps)
        e_data, e_neg = energy(batch), energy(negatives)
        loss = e_data.mean() - e_neg.mean() + 0.01 * ((e_data**2).mean() + (e_neg**2).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(energy.parameters(), 1.0)
        optimizer.step()
        decay = min(0.995, (1.0 + t) / (10.0 + t))
        with torch.no_grad():
            for a, p in zip(average.parameters(), energy.parameters(), strict=True):
                a.mul_(decay).add_(p, alpha=1 - decay)
        # the step size is a Python float, as in PyTorch EBM code: one sync per step
        h = math.exp(min(max(math.log(h) + 0.2 * (acceptance.item() - 0.574), -13.8), 2.3))
        bank, t = negatives, t + 1

    def block():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    block()  # warm-up
    return [block() for _ in range(args.repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, nargs="+", default=[1024])
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128, 128])
    parser.add_argument("--mcmc-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (GPU)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(
        f"# torch_reference (eager): dim {args.dim}, MLP {tuple(args.hidden)}, "
        f"{args.mcmc_steps} MALA steps, batch {args.batch_size}; {device.type} ({name}), "
        f"torch {torch.__version__}, {'TF32' if args.tf32 else 'float32'}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print("| chains | ms / step (median) | range |")
    print("|---|---|---|")
    for num_chains in args.chains:
        times = run(args, num_chains, device)
        print(
            f"| {num_chains} | {1e3 * statistics.median(times):.2f} "
            f"| {1e3 * min(times):.2f}–{1e3 * max(times):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
