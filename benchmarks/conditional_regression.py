"""A conditional EBM p(y | x) ∝ exp(−E(y, x)) on a regression with a two-branch response.

    python benchmarks/conditional_regression.py                # 3000 steps
    python benchmarks/conditional_regression.py --steps 500
    python benchmarks/conditional_regression.py --negatives cd pt   # issue 17: CD against
                                                                    # parallel tempering

Data: x ~ U(−2, 2), y | x ~ ½ N(x, 0.2²) + ½ N(−x, 0.2²) (two branches crossing at 0); 5 000
training and 2 000 test points. The EBM is an MLP energy (hidden 64×2, SiLU) of (y, x), trained
by `MaximumLikelihood` on the NumPyro model

    with numpyro.plate("data", N, subsample_size=512):
        numpyro.sample("y", EnergyDistribution(energy, (1,), condition=x_batch), obs=y_batch)

with one MALA chain per point, started at the observed y (contrastive divergence, 20 steps).
The held-out NLL normalises the EBM per test condition by quadrature over y (1 024 points on
[−4, 4]): exact up to discretisation. Baselines on the same test points: the BEST Gaussian
conditional N(μ(x), σ(x)²) (the population optimum μ = E[y | x] = 0, σ² = Var(y | x) = x² +
0.04, more than any fitted Gaussian can reach) and the true conditional density.

Where the branches are far apart (|x| >= 1: 2|x| >= 10 noise standard deviations) a chain
started at its observed y cannot cross to the other branch, so contrastive divergence learns
each branch's shape but not how the mass is shared between them (issue 17). The branch
weight table gives the model's mass on y > 0 (the midpoint between the branches y = ±x), by
the same quadrature, at several x (truth 0.5 everywhere). ``--negatives pt`` trains with
``ParallelTempering(num_temperatures=--temps)`` instead: one ladder per batch row, started at
the observed y, between the Gaussian fitted to all responses and the model.
"""

from __future__ import annotations

import argparse
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro.contrib.module import eqx_module

import numpyro_ebm as ebm

NOISE = 0.2


GAP = None  # None: branches y = ±x (crossing at 0); a float g: parallel branches y = x ± g
Y_RANGE = 4.0  # quadrature over y in [−Y_RANGE, Y_RANGE] (6 for the parallel branches)


def branches(x):
    """The two branch means at ``x``: ``(x, −x)``, or ``(x + GAP, x − GAP)`` with ``--gap``."""
    return (x, -x) if GAP is None else (x + GAP, x - GAP)


def sample(key, n):
    k_x, k_branch, k_noise = jax.random.split(key, 3)
    x = jax.random.uniform(k_x, (n, 1), minval=-2.0, maxval=2.0)
    upper, lower = branches(x)
    mean = jnp.where(jax.random.bernoulli(k_branch, 0.5, (n, 1)), upper, lower)
    return x, mean + NOISE * jax.random.normal(k_noise, (n, 1))


def true_log_density(x, y):
    norm = jax.scipy.stats.norm
    upper, lower = branches(x)
    return jnp.logaddexp(
        norm.logpdf(y, upper, NOISE) + jnp.log(0.5), norm.logpdf(y, lower, NOISE) + jnp.log(0.5)
    )[:, 0]


def conditional_energy(net):
    return jax.tree_util.Partial(lambda net, y, c: net(jnp.concatenate([y, c])), net)


def heldout_nll(energy, x, y, num_points: int = 1024) -> np.ndarray:
    """Per-point −log p(y | x), with log Z(x) by the midpoint rule over y ∈ [−4, 4]
    (``Y_RANGE``)."""
    edges = jnp.linspace(-Y_RANGE, Y_RANGE, num_points + 1)
    grid = 0.5 * (edges[1:] + edges[:-1])[:, None]
    cell = float(edges[1] - edges[0])

    def one(c, v):
        neg = -jax.vmap(lambda g: energy(g, c))(grid)
        log_z = jax.nn.logsumexp(neg) + jnp.log(cell)
        return energy(v, c) + log_z

    return np.asarray(jax.jit(jax.vmap(one))(x, y), np.float64)


WEIGHT_X = (-2.0, -1.5, -1.0, 1.0, 1.5, 2.0)


def upper_mass(energy, x_values, num_points: int = 1024) -> np.ndarray:
    """The normalised model's mass above the midpoint between the branches (y > 0, or y > x
    with ``--gap``) at each condition, by the midpoint rule on [−Y_RANGE, Y_RANGE]."""
    edges = jnp.linspace(-Y_RANGE, Y_RANGE, num_points + 1)
    grid = 0.5 * (edges[1:] + edges[:-1])[:, None]

    def one(c):
        neg = -jax.vmap(lambda g: energy(g, c))(grid)
        w = jax.nn.softmax(neg)
        upper, lower = branches(c[0])
        return jnp.sum(jnp.where(grid[:, 0] > 0.5 * (upper + lower), w, 0.0))

    conditions = jnp.asarray(x_values, jnp.float32)[:, None]
    return np.asarray(jax.jit(jax.vmap(one))(conditions), np.float64)


def regression_model(template):
    """The NumPyro model: y | x an EBM site, 512 points per step."""

    def model(x, y):
        net = eqx_module("energy", template)
        with numpyro.plate("data", x.shape[0], subsample_size=512) as rows:
            numpyro.sample(
                "y",
                ebm.EnergyDistribution(conditional_energy(net), (1,), condition=x[rows]),
                obs=y[rows],
            )

    return model


def train(kind: str, args, template, x, y, key):
    model = regression_model(template)
    negatives = "persistent"  # a conditional site: contrastive divergence from the data
    if kind == "pt":
        negatives = ebm.negatives.ParallelTempering(num_temperatures=args.temps)
    schedule = optax.cosine_decay_schedule(3e-3, args.steps, alpha=0.1)
    learner = ebm.MaximumLikelihood(model, optax.adam(schedule, b1=0.5), negatives=negatives)
    start = time.perf_counter()
    res = learner.run(key, args.steps, x, y, progress_bar=False)
    seconds = time.perf_counter() - start
    static = eqx.partition(template, eqx.is_inexact_array)[1]
    return conditional_energy(eqx.combine(res.params["energy$params"], static)), seconds, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negatives", nargs="+", choices=("cd", "pt"), default=["cd"])
    parser.add_argument("--temps", type=int, default=8, help="replicas per ladder (pt)")
    parser.add_argument(
        "--gap", type=float, default=None, help="parallel branches y = x ± GAP (with --negatives)"
    )
    parser.add_argument(
        "--notebook-keys",
        action="store_true",
        help="split the seed's key as notebooks/conditional.ipynb does (with --negatives)",
    )
    args = parser.parse_args()
    global GAP, Y_RANGE
    if args.gap is not None:
        if args.negatives == ["cd"]:
            parser.error("--gap goes with the --negatives table (e.g. --negatives cd pt)")
        GAP, Y_RANGE = args.gap, 6.0
    if args.negatives != ["cd"]:
        tempering(args)
        return

    k_train, k_test, k_net, k_run = jax.random.split(jax.random.key(args.seed), 4)
    x, y = sample(k_train, 5000)
    x_test, y_test = sample(k_test, 2000)
    template = ebm.energies.MLPEnergy(2, hidden=(64, 64), key=k_net)

    model = regression_model(template)
    schedule = optax.cosine_decay_schedule(3e-3, args.steps, alpha=0.1)
    learner = ebm.MaximumLikelihood(model, optax.adam(schedule, b1=0.5))
    start = time.perf_counter()
    res = learner.run(k_run, args.steps, x, y, progress_bar=False)
    seconds = time.perf_counter() - start
    static = eqx.partition(template, eqx.is_inexact_array)[1]
    trained = conditional_energy(eqx.combine(res.params["energy$params"], static))

    ebm_nll = heldout_nll(trained, x_test, y_test)
    gauss_nll = -np.asarray(
        jax.scipy.stats.norm.logpdf(y_test[:, 0], 0.0, jnp.sqrt(x_test[:, 0] ** 2 + NOISE**2))
    )
    true_nll = -np.asarray(true_log_density(x_test, y_test), np.float64)

    def row(name, values):
        diff = values - ebm_nll
        se = values.std(ddof=1) / np.sqrt(values.size)
        paired = diff.std(ddof=1) / np.sqrt(values.size)
        return f"| {name} | {values.mean():.4f} ± {se:.4f} | {diff.mean():+.4f} ± {paired:.4f} |"

    print(
        f"# conditional EBM, {args.steps} steps, {seconds:.0f} s training on "
        f"{jax.devices()[0].platform} ({platform.machine()}), jax {jax.__version__}, float32"
    )
    print("| model | held-out NLL (nats / point) | minus EBM (paired) |")
    print("|---|---|---|")
    print(row("conditional EBM (grid-normalised per x)", ebm_nll))
    print(row("best Gaussian conditional N(0, x² + 0.04)", gauss_nll))
    print(row("true conditional density", true_nll))


def tempering(args) -> None:
    k_train, k_test, k_net, k_run = jax.random.split(jax.random.key(args.seed), 4)
    if args.notebook_keys:  # notebooks/conditional.ipynb's data, network and run keys
        k_train, k_test, k_net, k_run = jax.random.split(jax.random.key(args.seed), 6)[:4]
    x, y = sample(k_train, 5000)
    x_test, y_test = sample(k_test, 2000)
    template = ebm.energies.MLPEnergy(2, hidden=(64, 64), key=k_net)
    true_nll = -np.asarray(true_log_density(x_test, y_test), np.float64)
    data = "y = ±x" if GAP is None else f"y = x ± {GAP:g}"
    print(
        f"# conditional EBM, branches {data} (noise {NOISE}), {args.steps} steps, "
        f"seed {args.seed}{' (notebook keys)' if args.notebook_keys else ''}, on "
        f"{jax.devices()[0].platform} ({platform.machine()}), jax {jax.__version__}, float32"
    )
    rows, weights = [], []
    for kind in args.negatives:
        trained, seconds, res = train(kind, args, template, x, y, k_run)
        nll = heldout_nll(trained, x_test, y_test)
        diff = nll - true_nll
        name = "CD (chains from the observed y)" if kind == "cd" else f"PT, K = {args.temps}"
        h = res.history
        pt = ""
        if "y.barrier" in h:
            pt = (
                f"Λ {np.mean(h['y.barrier'][-100:]):.2f}, min swap acc. "
                f"{np.mean(h['y.swap_acceptance_min'][-100:]):.2f}, round trips / ladder / step "
                f"{np.mean(h['y.round_trips'][-100:]):.3f}"
            )
        rows.append(
            f"| {name} | {nll.mean():.4f} ± {nll.std(ddof=1) / np.sqrt(nll.size):.4f} | "
            f"{diff.mean():+.4f} ± {diff.std(ddof=1) / np.sqrt(diff.size):.4f} | "
            f"{seconds:.0f} | {pt} |"
        )
        w = upper_mass(trained, WEIGHT_X)
        dense = np.concatenate([np.linspace(-2, -1, 21), np.linspace(1, 2, 21)])
        if GAP is not None:
            dense = np.linspace(-2, 2, 41)
        off = np.abs(upper_mass(trained, dense) - 0.5)
        weights.append(
            f"| {name} | "
            + " | ".join(f"{v:.3f}" for v in w)
            + f" | {off.mean():.3f} | {off.max():.3f} |"
        )
    print("| negatives | held-out NLL | minus truth (paired) | training (s) | ladders |")
    print("|---|---|---|---|---|")
    print(*rows, sep="\n")
    print(
        f"| true conditional density | {true_nll.mean():.4f} ± "
        f"{true_nll.std(ddof=1) / np.sqrt(true_nll.size):.4f} | | | |"
    )
    print()
    print(
        "| negatives | "
        + " | ".join(f"upper mass at x = {v:+g}" for v in WEIGHT_X)
        + (
            " | mean abs(w − 0.5), abs(x) in [1, 2] | max |"
            if GAP is None
            else " | mean abs(w − 0.5), x in [−2, 2] | max |"
        )
    )
    print("|---" * (len(WEIGHT_X) + 3) + "|")
    print(*weights, sep="\n")


if __name__ == "__main__":
    main()
