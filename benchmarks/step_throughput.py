"""Training-step time of `fit` against a hand-written JAX PCD + MALA loop doing the same work.

    python benchmarks/step_throughput.py                      # 8gaussians, 1000 steps, 3 repeats
    python benchmarks/step_throughput.py --dim 64 --hidden 512 512

Both sides train the same MLPEnergy on the same data with 1024 persistent chains (10% restarted
at data points per step), 20 MALA steps per update, batches of 1024 (rows drawn with
replacement), Adam (β₁ = 0.5, clipping at 1, cosine decay), the energy L2 term, a parameter
moving average, a Robbins-Monro step-size update and log Z learned by noise-contrastive
estimation (the negatives against 1024 draws of a Gaussian fitted to the data, under the
averaged energy, Adam on log Z), 100 steps per compiled `lax.scan` call. The hand-written
loop writes MALA out by hand (no BlackJAX) and has no non-finite guard, no chain recording
and no per-step history: those are what the library adds. A second hand-written row leaves
out the learned log Z, to show what that part of the work costs.

Each side is compiled by a warm-up run first; the timed runs are interleaved and repeated, and
the table shows the median time per step.
"""

from __future__ import annotations

import argparse
import math
import platform

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from timing import interleaved, print_table

import numpyro_ebm as ebm

NUM_MCMC_STEPS, BATCH, STEPS_PER_CALL = 20, 1024, 100


def hand_written(
    energy, data, key, optimizer, num_chains=1024, learn_log_z=True, schedule_steps=1000
):
    """PCD + MALA (+ NCE log Z) in plain JAX: the loop a user would write without the library.
    Returns ``run(num_steps)``; the compiled call is built once and reused."""
    params, static = eqx.partition(energy, eqx.is_inexact_array)
    dim = data.shape[1]
    mean = jnp.mean(data, axis=0)
    cov = jnp.cov(data.T) + 1e-3 * jnp.mean(jnp.diag(jnp.cov(data.T))) * jnp.eye(dim)
    chol = jnp.linalg.cholesky(cov)
    white = jnp.linalg.inv(chol)
    log_norm = 0.5 * dim * math.log(2 * math.pi) + jnp.sum(jnp.log(jnp.diag(chol)))
    log_z_optimizer = optax.adam(0.01)

    def log_q(x):  # the Gaussian noise of the NCE
        return -0.5 * jnp.sum(((x - mean) @ white.T) ** 2, axis=1) - log_norm

    def e(p, x):
        return eqx.combine(p, static)(x)

    def mala(p, x, h, key):
        def logp_and_grad(x):
            value, grad = jax.vmap(jax.value_and_grad(lambda z: -e(p, z)))(x)
            return value, grad

        def one(carry, k):
            x, lp, g = carry
            k_noise, k_accept = jax.random.split(k)
            prop = x + h * g + jnp.sqrt(2 * h) * jax.random.normal(k_noise, x.shape)
            lp_prop, g_prop = logp_and_grad(prop)

            def log_q(to, frm, g_frm):  # log density of proposing `to` from `frm`
                return -jnp.sum((to - frm - h * g_frm) ** 2, axis=1) / (4 * h)

            log_ratio = lp_prop - lp + log_q(x, prop, g_prop) - log_q(prop, x, g)
            accept = jnp.log(jax.random.uniform(k_accept, lp.shape)) < log_ratio
            x = jnp.where(accept[:, None], prop, x)
            lp = jnp.where(accept, lp_prop, lp)
            g = jnp.where(accept[:, None], g_prop, g)
            return (x, lp, g), jnp.mean(jnp.minimum(1.0, jnp.exp(log_ratio)))

        lp, g = logp_and_grad(x)
        (x, _, _), acc = jax.lax.scan(one, (x, lp, g), jax.random.split(key, NUM_MCMC_STEPS))
        return x, jnp.mean(acc)

    def nce_loss(log_z, avg, negatives, noise):
        def logit(x):
            return -jax.vmap(lambda z: e(avg, z))(x) - log_z - log_q(x)

        return jnp.mean(jax.nn.softplus(-logit(negatives))) + jnp.mean(
            jax.nn.softplus(logit(noise))
        )

    def step(carry, _):
        p, avg, opt_state, bank, h, t, log_z, avg_log_z, z_state = carry
        k = jax.random.fold_in(key, t)
        k_rows, k_fresh, k_mask, k_mcmc, k_noise = jax.random.split(k, 5)
        batch = data[jax.random.randint(k_rows, (BATCH,), 0, data.shape[0])]
        fresh = batch[jax.random.randint(k_fresh, (num_chains,), 0, BATCH)]
        restart = jax.random.uniform(k_mask, (num_chains, 1)) < 0.1
        starts = jnp.where(restart, fresh, bank)
        negatives, acceptance = mala(p, starts, h, k_mcmc)
        negatives = jax.lax.stop_gradient(negatives)

        def loss(p):
            e_data = jax.vmap(lambda x: e(p, x))(batch)
            e_neg = jax.vmap(lambda x: e(p, x))(negatives)
            # fit's default energy_l2: 0.01, decayed to 10% over the schedule (cosine)
            cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t / schedule_steps, 1.0)))
            weight = 0.01 * (0.1 + 0.9 * cosine)
            l2 = weight * (jnp.mean(e_data**2) + jnp.mean(e_neg**2))
            return jnp.mean(e_data) - jnp.mean(e_neg) + l2

        grads = jax.grad(loss)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        decay = jnp.minimum(0.995, (1.0 + t) / (10.0 + t))
        avg = jax.tree.map(lambda a, q: decay * a + (1 - decay) * q, avg, p)
        if learn_log_z:
            noise = mean + jax.random.normal(k_noise, (num_chains, dim)) @ chol.T
            z_grad = jax.grad(nce_loss)(log_z, avg, negatives, noise)
            z_update, z_state = log_z_optimizer.update(z_grad, z_state)
            log_z = log_z + z_update
            avg_log_z = decay * avg_log_z + (1 - decay) * log_z
        log_h = jnp.log(h) + 0.2 * (acceptance - 0.574)
        h = jnp.exp(jnp.clip(log_h, math.log(1e-6), math.log(10.0)))
        return (p, avg, opt_state, negatives, h, t + 1, log_z, avg_log_z, z_state), None

    @jax.jit
    def call(carry):
        return jax.lax.scan(step, carry, None, length=STEPS_PER_CALL)[0]

    def run(num_steps):
        rows = jax.random.randint(jax.random.fold_in(key, 2**31), (num_chains,), 0, len(data))
        log_z = jnp.asarray(log_norm, jnp.float32)
        carry = (
            params, params, optimizer.init(params), data[rows], jnp.float32(0.05), 0.0,
            log_z, log_z, log_z_optimizer.init(log_z),
        )  # fmt: skip
        carry = jax.tree.map(jnp.asarray, carry)
        for _ in range(num_steps // STEPS_PER_CALL):
            carry = call(carry)
        return jax.block_until_ready(carry)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2, help="2: 8gaussians; else digits-like")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128, 128])
    parser.add_argument("--chains", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.dim == 2:
        data = ebm.datasets.toy("8gaussians").sample(jax.random.key(0), 50_000)
    else:
        data = jax.random.normal(jax.random.key(0), (50_000, args.dim))
    energy = ebm.energies.MLPEnergy(args.dim, hidden=tuple(args.hidden), key=jax.random.key(1))
    optimizer = ebm.training.default_optimizer(args.steps)

    def run_fit():
        res = ebm.fit(
            energy, data, key=jax.random.key(2), num_steps=args.steps, optimizer=optimizer,
            num_chains=args.chains,
            progress_bar=False,
        )  # fmt: skip
        jax.block_until_ready(res.state)

    key = jax.random.key(2)
    hand_run = hand_written(energy, data, key, optimizer, args.chains, schedule_steps=args.steps)
    hand_no_log_z = hand_written(
        energy, data, key, optimizer, args.chains, learn_log_z=False, schedule_steps=args.steps
    )
    rows = {
        "fit": run_fit,
        "hand-written JAX": lambda: hand_run(args.steps),
        "hand-written JAX without learned log Z": lambda: hand_no_log_z(args.steps),
    }
    times = interleaved(rows, args.repeats, args.steps)
    print(
        f"# step time, dim {args.dim}, MLP {tuple(args.hidden)}, {args.chains} chains × "
        f"{NUM_MCMC_STEPS} MALA steps, batch {BATCH}, {args.steps} steps × {args.repeats}; "
        f"{jax.devices()[0].platform} ({platform.machine()}), jax {jax.__version__}, float32"
    )
    print_table(
        times, "loop", "hand-written JAX", lambda m, b: f"{m / b:.3f}", "ratio to hand-written"
    )


if __name__ == "__main__":
    main()
