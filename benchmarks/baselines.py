"""Density-estimation baselines with exact likelihoods, to compare an EBM with on tabular data.

    python benchmarks/baselines.py --data wine|breast_cancer|digits [--quick] [--seed 0]

``fit_baselines(train, validation, test, seed=...)`` fits, on the arrays it is given:

- ``gaussian``: full-covariance Gaussian, ML mean and covariance of train (+ 1e-6 I).
- ``gmm``: scikit-learn ``GaussianMixture`` (full covariances, ``reg_covar=1e-4``), number of
  components k in (1, 2, 4, 8, 16) with at least D + 2 train points per component on average.
- ``kde``: scikit-learn ``KernelDensity``, Gaussian kernel, bandwidth on a log grid of 20 values
  from 0.05 to 2 times Scott's rule ``n ** (-1 / (D + 4))`` (the data are standardised).
- ``maf``: flowjax masked autoregressive flow (affine transformers).
- ``rqs``: the same flow with rational-quadratic spline transformers (8 knots on [-5, 5],
  identity outside). A coupling flow with these splines did worse on breast_cancer and digits
  (validation: -21 against -12 and -54 against -45 nats), so it is not used.

Selection rule: each model's settings are picked by the mean validation log-likelihood, and the
model fitted on train with those settings is reported on test; there is no refit on
train + validation. The flows are trained by our own optax loop (Adam, learning rate 1e-3,
gradients clipped to global norm 10, random mini-batches of 128 rows or the whole train set if
smaller) and early-stopped on OUR validation array: it is scored every 10 steps, training stops
after 300 steps without improvement or at 3000 steps, and the parameters with the best score are
kept. Sweeps: MAF nn_width (32, 128) x flow_layers (4, 8); RQS nn_width (32, 128),
4 layers (``quick``: one 32-wide, 2-layer flow, 200 steps). Flows need
``pip install numpyro-ebm[bench]`` (flowjax); ``flows=False`` skips them.

Units: log-likelihoods are exact, in nats per point, in the units of the arrays given (so, for
standardised data, of the standardised space). ``test_se`` is the standard error of the test
mean, ``std(ddof=1) / sqrt(n_test)``. The flows compute in float32 (float64 if JAX's x64 is on).

The command line loads a scikit-learn data set: wine and breast_cancer are split 60/20/20 at
random (``numpy.random.default_rng(seed)``), after U[0, 1) noise is added to their
integer-valued columns; digits is ``numpyro_ebm.datasets.digits()`` with the last fifth of its
train rows as validation. All are standardised with the train mean and std.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np

GMM_COMPONENTS = (1, 2, 4, 8, 16)
BATCH = 128
LEARNING_RATE = 1e-3
EVAL_EVERY = 10  # steps between validation scores
PATIENCE = 300  # steps without a better validation score before stopping
RQS_KNOTS = 8
RQS_INTERVAL = 5.0


@dataclass(frozen=True)
class Row:
    model: str
    test_ll: float  # mean test log-likelihood, nats per point
    test_se: float  # standard error of test_ll
    validation_ll: float  # mean validation log-likelihood of the chosen setting
    chosen: str  # the setting picked on validation
    seconds: float  # wall time of the fit, sweep included
    # per test point, in the reported units: what ``paired_difference`` compares
    test_points: tuple[float, ...] = ()
    log_z_se: float = 0.0  # standard error of a log Z shared by every test point (an EBM's AIS)


def paired_difference(first: Row, second: Row) -> tuple[float, float]:
    """``(mean, standard error)`` of ``first``'s test log-likelihood minus ``second``'s, paired
    on the same test points: the spread of the per-point differences (much smaller than the
    two rows' own standard errors when the models agree on which points are hard) and each
    row's ``log_z_se``, which shifts every point alike."""
    if not first.test_points or len(first.test_points) != len(second.test_points):
        raise ValueError(f"{first.model!r} and {second.model!r} lack paired test points")
    diff = np.asarray(first.test_points) - np.asarray(second.test_points)
    se = math.sqrt(diff.var(ddof=1) / diff.size + first.log_z_se**2 + second.log_z_se**2)
    return float(diff.mean()), se


def fit_baselines(
    train: np.ndarray,
    validation: np.ndarray,
    test: np.ndarray,
    *,
    seed: int,
    flows: bool = True,
    quick: bool = False,
    log_jacobian: tuple[np.ndarray, np.ndarray] | None = None,
    augment=None,
) -> list[Row]:
    """Fit every baseline on ``train``, choose its settings on ``validation``, score ``test``.

    Args:
        train, validation, test: Float arrays ``(n, D)``, standardised and continuous.
        seed: Seeds the mixture's initialisation and the flows' keys.
        flows: Also fit the flowjax flows (``maf``, ``rqs``).
        quick: Sweep one small flow with few steps (a smoke test).
        log_jacobian: ``(validation, test)`` per-point log-Jacobians of the map from the
            reported units to the arrays given, added to every model's log-densities (the
            same for every model and setting, so the choices on validation do not change).
        augment: ``augment(key, points)`` applied to every training batch of the flows (new
            dequantization noise, as the EBM gets it: ``tables.redequantizer``); the
            Gaussian, the mixture and the KDE are fitted to the rows as given.

    Returns:
        One ``Row`` per model, in the order gaussian, gmm, kde, maf, rqs.
    """
    train, validation, test = (np.asarray(a, dtype=np.float64) for a in (train, validation, test))
    if log_jacobian is None:
        log_jacobian = (np.zeros(len(validation)), np.zeros(len(test)))
    jac = tuple(np.asarray(a, dtype=np.float64) for a in log_jacobian)
    rows = [
        _gaussian(train, validation, test, jac),
        _gmm(train, validation, test, seed, jac),
        _kde(train, validation, test, jac),
    ]
    if flows:
        import jax.random as jr

        maf_key, rqs_key = jr.split(jr.key(seed))
        rows.append(_flow("maf", train, validation, test, maf_key, quick, jac, augment))
        rows.append(_flow("rqs", train, validation, test, rqs_key, quick, jac, augment))
    return rows


def _row(model, test_lls, validation_ll, chosen, start, jac) -> Row:
    test_lls = np.asarray(test_lls, dtype=np.float64) + jac[1]
    return Row(
        model=model,
        test_ll=float(test_lls.mean()),
        test_se=float(test_lls.std(ddof=1) / math.sqrt(test_lls.size)),
        validation_ll=float(validation_ll) + float(jac[0].mean()),
        chosen=chosen,
        seconds=time.perf_counter() - start,
        test_points=tuple(test_lls.tolist()),
    )


def _sweep(settings, fit, score):
    """Fit each setting, return ``(validation_ll, setting, model)`` of the best one."""
    best = None
    for setting in settings:
        try:
            model = fit(setting)
            ll = float(np.mean(score(model)))
        except (ValueError, np.linalg.LinAlgError):
            continue
        if np.isfinite(ll) and (best is None or ll > best[0]):
            best = (ll, setting, model)
    if best is None:
        raise RuntimeError("every setting of the sweep failed")
    return best


def _edge(setting, grid) -> str:
    return " (grid edge)" if len(grid) > 1 and setting in (grid[0], grid[-1]) else ""


def _gaussian(train, validation, test, jac) -> Row:
    from scipy.stats import multivariate_normal

    start = time.perf_counter()
    cov = np.cov(train, rowvar=False) + 1e-6 * np.eye(train.shape[1])
    dist = multivariate_normal(train.mean(0), cov)
    return _row("gaussian", dist.logpdf(test), dist.logpdf(validation).mean(), "ML fit", start, jac)


def _gmm(train, validation, test, seed, jac) -> Row:
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    start = time.perf_counter()
    n, dim = train.shape
    grid = [k for k in GMM_COMPONENTS if k == 1 or n / k >= dim + 2]

    def fit(k):
        gmm = GaussianMixture(
            k, covariance_type="full", reg_covar=1e-4, max_iter=500, random_state=seed
        )
        return gmm.fit(train)

    # One thread: on a busy CPU (JAX running beside it) OpenMP/BLAS threads made the fits ~40x
    # slower, and these matrices are too small to gain from more.
    with threadpool_limits(limits=1):
        ll, k, gmm = _sweep(grid, fit, lambda gmm: gmm.score_samples(validation))
    return _row("gmm", gmm.score_samples(test), ll, f"k={k}{_edge(k, grid)}", start, jac)


def _kde(train, validation, test, jac) -> Row:
    from sklearn.neighbors import KernelDensity

    start = time.perf_counter()
    n, dim = train.shape
    scott = n ** (-1.0 / (dim + 4))
    grid = list(np.geomspace(0.05, 2.0, 20) * scott)

    def fit(bandwidth):
        return KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(train)

    ll, h, kde = _sweep(grid, fit, lambda kde: kde.score_samples(validation))
    chosen = f"bandwidth={h:.3g} ({h / scott:.2g}x Scott){_edge(h, grid)}"
    return _row("kde", kde.score_samples(test), ll, chosen, start, jac)


def _flow_grid(kind: str, quick: bool) -> tuple[list[tuple[int, int]], int]:
    """``(nn_width, flow_layers)`` settings and the step limit of each fit."""
    if quick:
        return [(32, 2)], 200
    if kind == "maf":
        return [(width, layers) for width in (32, 128) for layers in (4, 8)], 3000
    return [(32, 4), (128, 4)], 3000  # spline steps cost 3-5x more: a smaller sweep


def _make_flow(kind, key, dim, width, layers):
    import jax.numpy as jnp
    from flowjax.bijections import RationalQuadraticSpline
    from flowjax.distributions import Normal
    from flowjax.flows import masked_autoregressive_flow

    spline = RationalQuadraticSpline(knots=RQS_KNOTS, interval=RQS_INTERVAL)
    return masked_autoregressive_flow(
        key,
        base_dist=Normal(jnp.zeros(dim)),
        transformer=spline if kind == "rqs" else None,  # None: flowjax's affine
        flow_layers=layers,
        nn_width=width,
    )


def _flow(kind, train, validation, test, key, quick, jac, augment=None) -> Row:
    import jax.random as jr

    start = time.perf_counter()
    grid, max_steps = _flow_grid(kind, quick)
    keys = iter(jr.split(key, 2 * len(grid)))

    def fit(setting):
        width, layers = setting
        flow = _make_flow(kind, next(keys), train.shape[1], width, layers)
        return _train_flow(flow, train, validation, test, next(keys), max_steps, augment)

    ll, (width, layers), (_, test_lls, steps) = _sweep(grid, fit, lambda fitted: fitted[0])
    name = "MAF" if kind == "maf" else f"MAF-RQS ({RQS_KNOTS} knots)"
    chosen = f"{name} {width} wide, {layers} layers, {steps} steps"
    return _row(kind, test_lls, ll, chosen, start, jac)


def _train_flow(flow, train, validation, test, key, max_steps, augment=None):
    """Adam on the mean negative log-likelihood, early-stopped on ``validation`` (each batch
    through ``augment(key, batch)`` when given).

    Returns ``(validation_lls, test_lls, steps)``: the per-point log-densities under the
    parameters with the best mean validation log-likelihood, and the step they were reached at.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import optax
    import paramax

    params, static = eqx.partition(
        flow, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable)
    )
    optimizer = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(LEARNING_RATE))
    x_train = jnp.asarray(train, dtype=jnp.float32)
    # One array, so validation and test share one compiled log-density; test values only
    # leave this function for the parameters chosen on validation.
    x_eval = jnp.asarray(np.concatenate([validation, test]), dtype=jnp.float32)
    n_val = validation.shape[0]
    batch = min(BATCH, x_train.shape[0])

    def log_prob(params, x):
        return paramax.unwrap(eqx.combine(params, static)).log_prob(x)

    def loss(params, x):
        return -log_prob(params, x).mean()

    @jax.jit
    def run(params, opt_state, x, key):
        def step(carry, key):
            params, opt_state = carry
            if augment is None:  # the key as before session 20: the same runs
                points = x[jr.choice(key, x.shape[0], (batch,), replace=False)]
            else:
                k_rows, k_augment = jr.split(key)
                rows = jr.choice(k_rows, x.shape[0], (batch,), replace=False)
                points = augment(k_augment, x[rows])
            grads = jax.grad(loss)(params, points)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), jr.split(key, EVAL_EVERY))
        return params, opt_state

    evaluate = jax.jit(log_prob)
    opt_state = optimizer.init(params)
    lls = np.asarray(evaluate(params, x_eval), dtype=np.float64)
    best = (lls[:n_val].mean(), lls, 0)
    for i, chunk_key in enumerate(jr.split(key, max_steps // EVAL_EVERY), start=1):
        params, opt_state = run(params, opt_state, x_train, chunk_key)
        lls = np.asarray(evaluate(params, x_eval), dtype=np.float64)
        score = lls[:n_val].mean()
        if not np.isfinite(score):
            break
        if score > best[0]:
            best = (score, lls, i * EVAL_EVERY)
        elif i * EVAL_EVERY - best[2] >= PATIENCE:
            break
    _, lls, steps = best
    return lls[:n_val], lls[n_val:], steps


def _load(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train, validation, test, std)``: standardised splits and the train std used."""
    if name == "digits":
        from numpyro_ebm.datasets import digits

        data = digits()
        x = np.asarray(data.train, dtype=np.float64)
        n_val = x.shape[0] // 5
        train, validation, test = x[:-n_val], x[-n_val:], np.asarray(data.test, np.float64)
    else:
        from sklearn import datasets

        x = getattr(datasets, f"load_{name}")().data.astype(np.float64)
        rng = np.random.default_rng(seed)
        integer = np.all(x == np.round(x), axis=0)
        x[:, integer] += rng.random((x.shape[0], int(integer.sum())))
        perm = rng.permutation(x.shape[0])
        n_train, n_val = round(0.6 * x.shape[0]), round(0.2 * x.shape[0])
        train, validation, test = np.split(x[perm], [n_train, n_train + n_val])
    mean, std = train.mean(0), train.std(0)
    train, validation, test = ((a - mean) / std for a in (train, validation, test))
    return train, validation, test, std


def _table(rows: list[Row]) -> str:
    lines = [
        "| model | test LL ± se | validation LL | chosen | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.test_ll:.2f} ± {r.test_se:.2f} | {r.validation_ll:.2f} "
            f"| {r.chosen} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("wine", "breast_cancer", "digits"), required=True)
    parser.add_argument("--quick", action="store_true", help="one small flow, few steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flows", dest="flows", action="store_false")
    args = parser.parse_args()

    train, validation, test, std = _load(args.data, args.seed)
    print(
        f"{args.data}: train {train.shape}, validation {validation.shape}, test {test.shape}; "
        "nats per point in the standardised space"
    )
    start = time.perf_counter()
    rows = fit_baselines(
        train, validation, test, seed=args.seed, flows=args.flows, quick=args.quick
    )
    print(_table(rows))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.data == "digits":
        print(
            f"add {-np.log(std).sum():.2f} for nats per image on the digits() (-1, 1) scale "
            f"(and then {64 * math.log(2 / 17):.2f} more for the [0, 17)^64 pixel scale)"
        )


if __name__ == "__main__":
    main()
