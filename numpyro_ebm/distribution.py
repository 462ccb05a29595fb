"""``EnergyDistribution``: an energy-based model as a NumPyro distribution.

``p(x) = exp(−E(x) − log Z)`` where ``E`` is a callable pytree (an equinox module, or
``jax.tree_util.Partial(fn, params)``) evaluated on ONE event, and ``log Z`` is given (learned
or estimated, see ``numpyro_ebm.logz``, for neural energies) or, when not given, read from an
energy that knows its own (the closed-form energies' exact ``energy.log_z``). With a
wrong ``log_z`` the density is still correct up to a constant, which is all that MCMC over the
distribution's value needs, but not what a likelihood comparison needs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.batch_util import _default_vmap_over, vmap_over
from numpyro.distributions.util import validate_sample

from numpyro_ebm import samplers as _samplers
from numpyro_ebm.validation import validate_event_shape

__all__ = ["EnergyDistribution"]


def check_energy(
    energy: Callable, event_shape: tuple[int, ...], condition_shape: tuple[int, ...] | None = None
) -> None:
    """Raise a clear error unless ``energy`` maps one event of ``event_shape`` (and, for a
    conditional energy, one condition of ``condition_shape``) to a real scalar.

    Uses ``jax.eval_shape``: nothing is computed, so it is safe on traced parameters.
    """
    if not callable(energy):
        raise TypeError(f"energy must be callable (one event -> scalar), got {type(energy)}")
    probes = [jax.ShapeDtypeStruct(event_shape, jnp.result_type(float))]
    if condition_shape is not None:
        probes.append(jax.ShapeDtypeStruct(condition_shape, jnp.result_type(float)))
    try:
        out = jax.eval_shape(energy, *probes)
    except Exception as err:  # surfaced with context: the user's energy failed on one event
        what = "" if condition_shape is None else f" and ONE condition of shape {condition_shape}"
        raise ValueError(
            f"energy could not be evaluated on ONE event of shape {event_shape}{what}: "
            f"{type(err).__name__}: {err}. The energy must take a single event (no batch axis); "
            "check event_shape."
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"energy must return a scalar for one event of shape {event_shape}, got {shape}. "
            "Reduce the output (e.g. sum) or, for a vector-valued network, select one unit."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"energy must return a floating-point scalar, got dtype {out.dtype}")


class _Split:
    """A callable pytree (the energy, the initializer) as a pytree node whose children are its
    traceable leaves (arrays and numbers) and whose aux data holds the rest; unflattening
    returns the callable itself."""

    def __init__(self, fn):
        self.fn = fn


_TRACED = "<traced leaf>"  # marks the positions of the children among the callable's leaves


def _split_flatten(split: _Split):
    leaves, treedef = jax.tree_util.tree_flatten(split.fn)
    children = [leaf for leaf in leaves if eqx.is_array_like(leaf)]
    static = tuple(_TRACED if eqx.is_array_like(leaf) else leaf for leaf in leaves)
    return children, (treedef, static)


def _split_unflatten(aux, children):
    treedef, static = aux
    children = iter(children)
    return jax.tree_util.tree_unflatten(
        treedef, [next(children) if s is _TRACED else s for s in static]
    )


jax.tree_util.register_pytree_node(_Split, _split_flatten, _split_unflatten)


def _leaf_axes(fn, axis):
    """``vmap_over``'s axis spec for a callable pytree: an int ``axis`` applies to each of its
    traced leaves (its other leaves are kept, as ``_Split`` keeps them in aux data)."""
    if fn is None or not isinstance(axis, int):
        return axis
    return jax.tree.map(lambda leaf: axis if eqx.is_array_like(leaf) else leaf, fn)


class EnergyDistribution(dist.Distribution):
    """Unnormalised density ``p(x) ∝ exp(−E(x))`` as a NumPyro distribution.

    ``log_prob(x) = −energy(x) − log_z``: exact when ``log_z`` is the true log partition
    function, otherwise correct up to a constant. ``sample`` draws APPROXIMATE samples by running
    BlackJAX chains (MALA by default: the step size is tuned during the first half of the
    warm-up and held fixed from then on); configure the kernel with ``sampler`` and the warm-up,
    thinning and number of chains with ``draws``. The distribution has no reparametrised
    sampler (``has_rsample`` is False).

    ``log_z`` when not given (``None``): an energy with a ``log_z`` attribute (the closed-form
    ``energies.GaussianEnergy`` and ``energies.GaussianMixtureEnergy`` and the quadrature-exact
    ``energies.SeparableEnergy``, whose ``log_z`` follows their traced parameters) supplies it,
    so ``log_prob`` is the normalised density and ``numpyro.infer.log_likelihood`` /
    ``az.loo`` see the true likelihood. Any other energy
    gets 0 (the density is then correct up to a constant). A conditional distribution never
    reads ``energy.log_z``: its log Z depends on the condition, so pass ``log_z`` per condition
    (default 0). An explicit ``log_z`` always wins.

    Args:
        energy: callable pytree, ``energy(x) -> scalar`` for one event ``x`` of shape
            ``event_shape`` (an equinox module or ``jax.tree_util.Partial``). Its array leaves
            are traced, so a distribution built inside ``jit`` or a NumPyro model compiles once.
        event_shape: shape of one event, e.g. ``(2,)``.
        log_z: log partition function, scalar or an array whose shape becomes the
            distribution's ``batch_shape`` (the same energy with per-batch normalisers).
            ``None`` (default): the energy's own exact ``log_z`` where it has one, else 0
            (see above).
        sampler: ``numpyro_ebm.samplers.Sampler`` (or a kernel name): the kernel ``sample``
            runs; ``"initializer"``: ``sample`` returns the initializer's draws as they are, no
            MCMC (fast; exact only as far as the initializer matches the model; not with a
            ``condition``, which the initializer does not see).
        draws: ``numpyro_ebm.samplers.DrawSettings``: how ``sample`` draws (``num_warmup``,
            ``thinning``, ``num_chains``, ``init_scale``); default ``DrawSettings()``.
        initializer: where ``sample``'s chains start: a callable pytree ``(key, n) -> (n,
            *event_shape)``, e.g. a trained ``numpyro_ebm.generator.Generator``
            (``FitResult.distribution()`` passes its generator). Default: ``Normal(0,
            draws.init_scale²)``. Chains started near the model need less warm-up.
        condition: makes the distribution CONDITIONAL, ``p(x | c) ∝ exp(−E(x, c))``: an
            array ``(*batch_shape, condition_size)`` of conditions, one vector per batch
            element (scalars as ``(n, 1)``). ``energy(x, c)`` then takes one event and one
            condition vector; ``log_z`` (if not 0) is per condition. ``sample`` runs
            ``draws.num_chains`` chains per condition (default: one per draw), the chains
            of each condition with their own step-size warm-up.
        validate_args: NumPyro argument/sample validation (as for any NumPyro distribution).

    Shapes:
        ``log_prob(value)``: value ``sample_shape + batch_shape + event_shape`` (any leading
        shape broadcasting against ``batch_shape``) → ``sample_shape + batch_shape``.
        ``sample(key, sample_shape)`` → ``sample_shape + batch_shape + event_shape``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro_ebm as ebm
        >>> energy = ebm.energies.GaussianEnergy(jnp.zeros(2))
        >>> d = ebm.EnergyDistribution(energy, event_shape=(2,))   # log_z = energy.log_z
        >>> float(d.log_prob(jnp.zeros(2)))   # = log N(0; 0, I) = -log(2π)
        -1.8378...
        >>> d.sample(jax.random.key(0), (3,)).shape
        (3, 2)
    """

    arg_constraints: ClassVar[dict] = {"log_z": constraints.real}
    reparametrized_params: ClassVar[list] = []
    pytree_data_fields = ("energy", "log_z", "initializer", "condition")
    pytree_aux_fields = ("sampler", "draws")

    def tree_flatten(self):
        # the energy's and the initializer's non-traceable leaves (an eqx.nn.MLP's activation,
        # a plain function) go into aux data (``_Split``), so jit neither fails on them nor
        # re-traces
        values, aux = super().tree_flatten()
        fields = type(self).gather_pytree_data_fields()
        values = tuple(
            _Split(v) if f in ("energy", "initializer") and v is not None else v
            for f, v in zip(fields, values, strict=True)
        )
        return values, aux

    def __init__(
        self,
        energy: Callable,
        event_shape: tuple[int, ...] | int,
        log_z=None,
        *,
        sampler: _samplers.Sampler | str | None = None,
        draws: _samplers.DrawSettings | None = None,
        initializer: Callable | None = None,
        condition=None,
        validate_args: bool | None = None,
    ):
        event_shape = validate_event_shape(event_shape)
        if condition is not None:
            condition = jnp.asarray(condition, dtype=jnp.result_type(float))
            if condition.ndim < 1:
                raise ValueError(
                    "condition must have shape (*batch_shape, condition_size); pass scalar "
                    "conditions as (n, 1)"
                )
            if not isinstance(condition, jax.core.Tracer) and not bool(
                jnp.all(jnp.isfinite(condition))
            ):
                raise ValueError("condition contains NaN or inf values")
            if sampler == "initializer":
                raise ValueError(
                    'sampler="initializer" cannot draw from a conditional distribution: the '
                    "initializer (key, n) does not see the condition. Use an MCMC sampler (e.g. "
                    '"mala"; the initializer still starts its chains).'
                )
        check_energy(energy, event_shape, None if condition is None else condition.shape[-1:])
        if initializer is not None:
            _check_initializer(initializer, event_shape)
        elif sampler == "initializer":
            raise ValueError('sampler="initializer" needs an initializer (e.g. a Generator)')
        if log_z is None:
            log_z = _exact_log_z(energy) if condition is None else 0.0
        self.energy = energy
        self.log_z = jnp.asarray(log_z, dtype=jnp.result_type(float))
        self.initializer = initializer
        self.condition = condition
        self.sampler = sampler if sampler == "initializer" else _samplers.get_sampler(sampler)
        self.draws = _draw_settings(draws)
        batch_shape = jnp.shape(self.log_z)
        if condition is not None:
            batch_shape = jnp.broadcast_shapes(batch_shape, condition.shape[:-1])
        super().__init__(
            batch_shape=batch_shape,
            event_shape=event_shape,
            validate_args=validate_args,
        )

    @property
    def support(self):
        if not self.event_shape:
            return constraints.real
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def has_rsample(self) -> bool:
        return False

    def _flatten_events(self, value: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        value = jnp.asarray(value)
        event_ndim = len(self.event_shape)
        lead_ndim = value.ndim - event_ndim
        if lead_ndim < 0 or value.shape[lead_ndim:] != self.event_shape:
            raise ValueError(
                f"value of shape {value.shape} does not end with event_shape {self.event_shape}"
            )
        lead_shape = value.shape[:lead_ndim]
        return value.reshape((math.prod(lead_shape), *self.event_shape)), lead_shape

    def energy_of(self, value) -> jax.Array:
        """``energy(value)`` for any leading shape: ``(*lead, *event_shape) -> lead`` (a
        conditional energy: ``-> broadcast_shapes(lead, batch_shape)``, each event with its
        condition)."""
        flat, lead_shape = self._flatten_events(value)
        if self.condition is None:
            return jax.vmap(self.energy)(flat).reshape(lead_shape)
        shape = jnp.broadcast_shapes(lead_shape, self.batch_shape)
        if shape != lead_shape:
            flat, _ = self._flatten_events(jnp.broadcast_to(value, (*shape, *self.event_shape)))
        return jax.vmap(self.energy)(flat, self.conditions_for(shape)).reshape(shape)

    def conditions_for(self, lead_shape) -> jax.Array:
        """``(prod(lead_shape), condition_size)``: the condition of every event."""
        size = self.condition.shape[-1]
        full = jnp.broadcast_to(self.condition, (*lead_shape, size))
        return full.reshape(-1, size)

    def unnormalized_log_prob(self, value) -> jax.Array:
        """``−energy(value)``, without ``log_z``: ``(*lead, *event_shape) -> lead`` (see
        ``energy_of``)."""
        return -self.energy_of(value)

    @validate_sample
    def log_prob(self, value) -> jax.Array:
        return self.unnormalized_log_prob(value) - self.log_z

    def sample(self, key, sample_shape=()):
        """Approximate samples from BlackJAX chains (see ``numpyro_ebm.samplers.Sampler``).

        Runs ``draws.num_chains`` chains of ``sampler`` (default: one per draw; a conditional
        distribution runs them per condition) from the ``initializer`` (default ``Normal(0,
        draws.init_scale²)``), ``draws.num_warmup`` warm-up steps (the first half tunes the step
        size by dual averaging, the second half runs with it fixed, so no draw comes from an
        adapting kernel), then records every ``draws.thinning``-th step. Each draw, even a
        single one, follows the target as far as the warm-up has converged; check them with
        ``sample_with_trace`` and ``numpyro_ebm.diagnostics`` when it matters. With
        ``sampler="initializer"`` the initializer's draws are returned as they are.
        """
        return self.sample_with_trace(key, sample_shape)[0]

    def sample_with_trace(self, key, sample_shape=()):
        """``sample``, also returning the chains it ran, for diagnostics.

        Returns:
            ``(samples, draws)``: ``samples`` as from ``sample``; ``draws`` a
            ``numpyro_ebm.samplers.Draws`` with every chain's draws ``(num_chains,
            draws_per_chain, *event_shape)`` and per-draw sampler statistics (``None`` with
            ``sampler="initializer"``, which runs no chains). Pass it to
            ``numpyro_ebm.diagnostics.to_datatree`` or ``diagnose``. The samples are the
            draws in draw-major order (every chain's first draw, then every chain's second
            draw, ...), cut to the number asked for. A conditional distribution's ``draws``
            have ``batch_shape`` in front of every field (``positions`` ``(*batch_shape,
            num_chains, draws_per_chain, *event_shape)``, ``step`` ``(*batch_shape,
            draws_per_chain)``): ``jax.tree.map(lambda a: a[i], draws)`` is condition ``i``'s.

        Example:
            >>> import jax, jax.numpy as jnp, numpyro_ebm as ebm
            >>> d = ebm.EnergyDistribution(ebm.energies.GaussianEnergy(jnp.zeros(2)), (2,),
            ...     draws=ebm.samplers.DrawSettings(num_chains=4, num_warmup=200))
            >>> x, draws = d.sample_with_trace(jax.random.key(0), (400,))
            >>> x.shape, draws.positions.shape
            ((400, 2), (4, 100, 2))
        """
        shape = tuple(sample_shape) + self.batch_shape
        num_draws = math.prod(shape)
        dtype = self.log_z.dtype
        if num_draws == 0:
            return jnp.zeros((*shape, *self.event_shape), dtype), None
        if self.sampler == "initializer":
            draws = self.initializer(key, num_draws).astype(dtype)
            return draws.reshape(*shape, *self.event_shape), None
        if self.condition is not None:
            return self._sample_conditional(key, tuple(sample_shape))
        logdensity = _samplers.flat_logdensity(self.energy, self.event_shape)
        samples, draws = self._run_chains(key, logdensity, num_draws)
        return samples.reshape(*shape, *self.event_shape), draws

    def _run_chains(self, key, logdensity, num_draws: int):
        """``num_draws`` draws of ``logdensity`` from ``draws.num_chains`` chains (default one
        per draw): ``(samples (num_draws, dim), Draws)``."""
        settings = self.draws
        dim = math.prod(self.event_shape)
        dtype = self.log_z.dtype
        num_chains = settings.num_chains or num_draws
        draws_per_chain = -(-num_draws // num_chains)
        key_init, key_chains = jax.random.split(key)
        if self.initializer is None:
            positions = settings.init_scale * jax.random.normal(key_init, (num_chains, dim), dtype)
        else:
            positions = self.initializer(key_init, num_chains).reshape(num_chains, dim)
            positions = positions.astype(dtype)
        draws, _ = _samplers.sample_chains(
            key_chains,
            self.sampler,
            logdensity,
            positions,
            draws_per_chain,
            draws=settings,
            event_shape=self.event_shape,
        )
        # draw-major flattening: consecutive samples come from different chains
        samples = jnp.swapaxes(draws.positions, 0, 1).reshape(-1, dim)[:num_draws]
        return samples, draws

    def _sample_conditional(self, key, sample_shape):
        """``prod(sample_shape)`` draws per condition, each condition with its own chains."""
        num_draws = math.prod(sample_shape)
        num_conditions = math.prod(self.batch_shape)
        conditions = self.conditions_for(self.batch_shape)

        def one(k, c):
            logdensity = _samplers.flat_logdensity(lambda x: self.energy(x, c), self.event_shape)
            return self._run_chains(k, logdensity, num_draws)

        samples, draws = jax.vmap(one)(jax.random.split(key, num_conditions), conditions)
        # (condition, draw, ...) -> (*sample_shape, *batch_shape, *event_shape)
        samples = jnp.swapaxes(samples, 0, 1).reshape(
            *sample_shape, *self.batch_shape, *self.event_shape
        )
        draws = jax.tree.map(lambda a: a.reshape(*self.batch_shape, *a.shape[1:]), draws)
        return samples, draws

    def __repr__(self) -> str:
        return (
            f"EnergyDistribution(energy={type(self.energy).__name__}, "
            f"batch_shape={self.batch_shape}, event_shape={self.event_shape})"
        )


def _exact_log_z(energy: Callable):
    """The energy's own log partition function (``energy.log_z``, a number or array), else 0."""
    log_z = getattr(energy, "log_z", None)
    if isinstance(log_z, jax.Array | np.ndarray | numbers.Real) and not isinstance(log_z, bool):
        return log_z
    return 0.0


def _draw_settings(draws) -> _samplers.DrawSettings:
    """``draws`` checked (``None``: the defaults)."""
    if draws is None:
        return _samplers.DrawSettings()
    if not isinstance(draws, _samplers.DrawSettings):
        raise TypeError(
            f"draws must be a numpyro_ebm.samplers.DrawSettings (warm-up, thinning, chains), "
            f"got {draws!r}"
        )
    return draws


def _check_initializer(initializer: Callable, event_shape: tuple[int, ...]) -> None:
    if not callable(initializer):
        raise TypeError(
            f"initializer must be callable (key, n) -> (n, *event_shape), got {initializer!r}"
        )
    # shape probe only: eval_shape computes nothing, no randomness is drawn from this key
    out = jax.eval_shape(lambda key: initializer(key, 2), jax.random.key(0))
    if getattr(out, "shape", None) != (2, *event_shape):
        raise ValueError(
            f"initializer(key, n) must return (n, *event_shape) = (n, {event_shape}); for n = 2 "
            f"it returned {getattr(out, 'shape', type(out).__name__)}"
        )


@vmap_over.register
def _vmap_over_energy_distribution(
    d: EnergyDistribution, energy=None, log_z=None, initializer=None, condition=None
):
    return _default_vmap_over(
        d,
        energy=_leaf_axes(d.energy, energy),
        log_z=log_z,
        initializer=_leaf_axes(d.initializer, initializer),
        condition=condition,
    )
