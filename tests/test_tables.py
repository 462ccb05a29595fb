"""``tables``: grid detection, uniform dequantization, standardization and their units."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from scipy import stats

from numpyro_ebm import datasets
from numpyro_ebm.tables import (
    TableTransform,
    column_statistics,
    default_noise,
    default_weight_decay,
    quantum,
    snap_to_grid,
    with_noise,
)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3.0, 17.0, 4.0], 1.0),
        ([5.1, 3.5, 1.4], 0.1),
        ([0.25, 0.5], 0.01),
        ([1e-6, 3e-6], 1e-6),
        ([0.1234567, 1.0], 0.0),  # 7 decimals: continuous
        ([np.pi, 1.0], 0.0),
        ([1e-300, 2e-300], 0.0),  # within rounding of 0, but not whole numbers
        ([1e-9, 3e-9], 0.0),
        ([7.0, 7.0], 1.0),  # a constant column on a grid is one cell wide
    ],
)
def test_quantum_is_the_coarsest_power_of_ten_grid(values, expected):
    assert quantum(np.array(values)) == expected


def test_quantum_reads_float32_columns_in_their_own_precision():
    assert quantum(np.float32([17.99, 0.01, 1234.56])) == 0.01
    # the same float32 values widened to float64 are not on the grid at float64 precision
    assert quantum(np.float32([17.99, 0.01]).astype(np.float64)) == 0.0


def test_dequantized_training_columns_have_the_transforms_mean_and_std():
    """The mean and std are the exact expectations over the dequantization noise: the
    dequantized columns match them within Monte Carlo error (n·repeats draws)."""
    rng = np.random.default_rng(0)
    train = np.column_stack([rng.integers(0, 4, 500), np.round(rng.normal(size=500), 1)])
    transform = TableTransform.fit(train)
    assert transform.quantum.tolist() == [1.0, 0.1]
    keys = jax.random.split(jax.random.key(1), 20)
    z = np.concatenate([transform.to_model(train, key=k) for k in keys])
    # the noise is the only randomness: the mean of z over the repeats is 0 within its SE
    se = transform.quantum / math.sqrt(12) / transform.std / math.sqrt(len(z))
    np.testing.assert_array_less(np.abs(z.mean(0)), 5 * se)
    # E var(z) = 1 exactly; the noise's contribution to the spread of var(z) is small
    np.testing.assert_allclose(z.var(0), 1.0, atol=0.01)
    # each entry lies in its cell [v, v + q)
    back = transform.to_original(z[: len(train)])
    assert np.all((back >= train - 1e-5) & (back < train + transform.quantum + 1e-5))


def test_continuous_columns_are_standardized_and_not_perturbed():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(200, 2))
    transform = TableTransform.fit(x)
    assert not transform.quantized.any()
    z = transform.to_model(x, key=jax.random.key(0))
    np.testing.assert_allclose(z, (x - x.mean(0)) / x.std(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(transform.to_original(z), x, rtol=1e-5, atol=1e-5)


def test_units_a_standard_normal_on_z_is_the_gaussian_of_the_original_units():
    """``log p_model(z) + log_jacobian`` is the log-density of the original values."""
    rng = np.random.default_rng(2)
    x = rng.normal([1.0, -2.0], [3.0, 0.5], size=(300, 2))
    transform = TableTransform.fit(x)
    z = transform.to_model(x, key=jax.random.key(0))
    model = stats.norm.logpdf(z).sum(1) + transform.log_jacobian
    direct = stats.norm(transform.mean, transform.std).logpdf(x).sum(1)
    np.testing.assert_allclose(model, direct, rtol=1e-5)


def test_log_cell_volume_is_the_sum_of_the_quantized_columns_log_quanta():
    train = np.column_stack([np.arange(10.0), np.arange(10.0) / 10, np.linspace(0, np.pi, 10)])
    transform = TableTransform.fit(train)
    assert transform.quantum.tolist() == [1.0, 0.1, 0.0]
    assert transform.log_cell_volume == pytest.approx(math.log(0.1))


def test_a_constant_quantized_column_is_one_cell_wide_a_constant_continuous_one_is_refused():
    ones = np.column_stack([np.ones(10), np.arange(10.0)])
    assert TableTransform.fit(ones).std[0] == pytest.approx(math.sqrt(1 / 12))
    with pytest.raises(ValueError, match="do not vary"):
        TableTransform.fit(np.column_stack([np.full(10, np.pi), np.arange(10.0)]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        TableTransform.fit(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="shape"):
        TableTransform.fit(np.ones(5))


def test_description_round_trip():
    transform = TableTransform.fit(datasets.table("iris").train)
    again = TableTransform.from_description(transform.describe())
    for name in ("quantum", "mean", "std"):
        np.testing.assert_array_equal(getattr(again, name), getattr(transform, name))


@pytest.mark.parametrize("name", datasets.TABLE_NAMES)
def test_tables_split_60_20_20_without_overlap(name):
    from sklearn import datasets as sk

    table = datasets.table(name)
    rows = np.concatenate([table.train, table.validation, table.test])
    original = getattr(sk, f"load_{name}")().data
    assert len(table.test) == len(table.validation) == round(0.2 * len(original))
    # every original row exactly once
    np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(original, axis=0))
    assert len(rows) == len(original)
    assert table.train.shape[1] == len(table.columns)
    again = datasets.table(name)
    np.testing.assert_array_equal(again.test, table.test)
    with pytest.raises(ValueError, match="unknown table"):
        datasets.table("titanic")


def test_rows_of_another_shape_or_with_nan_are_refused():
    transform = TableTransform.fit(np.arange(12.0).reshape(6, 2))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        transform.to_model(np.ones((3, 3)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="NaN or infinite"):
        transform.standardize(np.array([[1.0, np.nan]]))


@pytest.mark.parametrize("exponent", [-1000, -500, 500, 1000])
def test_statistics_at_a_power_of_two_scale_are_exact(exponent):
    # scaling by 2**e is exact in float64: so must the statistics be, bit for bit
    x = np.random.default_rng(3).normal(size=(300, 2))
    scale = 2.0**exponent
    mean, std = column_statistics(x * scale)
    np.testing.assert_array_equal(mean, x.mean(axis=0) * scale)
    np.testing.assert_array_equal(std, x.std(axis=0) * scale)


def test_a_continuous_column_of_tiny_values_is_standardized_exactly():
    # its squares underflow: a plain variance is 0 and the column would be refused as constant
    x = np.random.default_rng(4).normal(size=(200, 2))
    transform = TableTransform.fit(x * 2.0**-1000)
    np.testing.assert_array_equal(transform.std, x.std(axis=0) * 2.0**-1000)
    z = transform.to_model(x * 2.0**-1000, key=jax.random.key(0))
    np.testing.assert_allclose(z, (x - x.mean(0)) / x.std(0), rtol=1e-5, atol=1e-5)


def test_samples_go_back_on_the_recorded_grid():
    rng = np.random.default_rng(5)
    train = np.column_stack([rng.integers(0, 9, 300), np.round(rng.normal(size=300), 1)])
    train = np.column_stack([train, rng.normal(size=300)])
    transform = TableTransform.fit(train)
    z = transform.to_model(train, key=jax.random.key(1))
    back = transform.to_original(z, on_grid=True)
    np.testing.assert_array_equal(back[:, :2], train[:, :2])  # the recorded values, exactly
    np.testing.assert_allclose(back[:, 2], train[:, 2], rtol=1e-5, atol=1e-5)
    assert snap_to_grid(np.array([[0.30000000000000004]]), [0.1])[0, 0] == 0.3


def test_a_column_whose_spread_overflows_float64_is_refused_by_index():
    # most values near +1.7e308, every fifth near -1.7e308: x − mean overflows float64
    big = np.column_stack([np.arange(10.0), np.where(np.arange(10) % 5, 1.7e308, -1.7e308)])
    with pytest.raises(ValueError, match=r"column\(s\) \[1\] spread beyond float64"):
        TableTransform.fit(big)


def test_fresh_dequantization_moves_each_entry_uniformly_within_its_own_cell():
    rng = np.random.default_rng(5)
    recorded = np.column_stack(
        [rng.integers(0, 9, 400), np.round(rng.normal(50.0, 3.0, 400), 2), rng.normal(size=400)]
    )
    transform = TableTransform.fit(recorded)
    assert transform.quantum[:2].tolist() == [1.0, 0.01] and transform.quantum[2] == 0.0
    z = transform.to_model(recorded, key=jax.random.key(0))
    fresh = jax.jit(transform.redequantizer())
    moved = np.asarray(fresh(jax.random.key(1), z))
    again = np.asarray(fresh(jax.random.key(2), z))
    before, after = transform.to_original(z), transform.to_original(moved)
    for j, q in enumerate(transform.quantum[:2]):
        # the recorded value's cell, a new place in it (float32 keeps ~1e-5 of a cell here)
        position = after[:, j] / q - recorded[:, j] / q
        assert np.all((position > -1e-4) & (position < 1 + 1e-4))
        assert stats.kstest(np.clip(position, 0, 1), "uniform").pvalue > 1e-3
        assert np.corrcoef(position, before[:, j] / q - recorded[:, j] / q)[0, 1] < 0.2
    np.testing.assert_array_equal(moved[:, 2], z[:, 2])  # continuous: left as given
    assert not np.array_equal(moved, again)  # each key its own noise


def test_a_float16_columns_cells_are_those_of_its_recorded_values():
    """float16 holds 1.3 as 1.2998046875 and 1.9 as 1.900390625: the dequantized entries and
    their fresh moves stay in the cells [1.3, 1.4) and [1.9, 2.0) all the same."""
    recorded = np.round(np.random.default_rng(6).uniform(0, 2, (2000, 1)), 1)
    stored = recorded.astype(np.float16)
    transform = TableTransform.fit(stored)
    assert transform.quantum.tolist() == [0.1]
    z = transform.to_model(stored, key=jax.random.key(0))
    moved = np.asarray(jax.jit(transform.redequantizer())(jax.random.key(1), z))
    for points in (transform.to_original(z), transform.to_original(moved)):
        position = (points - recorded) / 0.1  # float32 keeps ~1e-6 of a cell here
        assert np.all((position > -1e-4) & (position < 1 + 1e-4))


@pytest.mark.parametrize("default", [default_noise, default_weight_decay])
def test_noise_and_weight_decay_by_default_on_tables_of_under_100_rows_per_column(default):
    assert default(341, 30) == default(199, 2) == default(1197, 64) == 0.1
    assert default(200, 2) == default(50_000, 2) == 0.0
    for rows, columns in [(0, 3), (10, 0)]:
        with pytest.raises(ValueError, match="need rows and columns"):
            default(rows, columns)


def test_with_noise_adds_gaussian_noise_of_its_scale_after_the_augment():
    """The noise's mean and standard deviation against 0 and ``scale`` within five standard
    errors; the augment runs first (a shift of 5 stays); float32 stays float32; one key gives
    one draw, another key another."""

    def shift(key, points):
        return points + 5.0

    noisy = with_noise(shift, 0.3)
    points = jax.numpy.zeros((40_000, 3), jax.numpy.float32)
    moved = noisy(jax.random.key(0), points)
    assert moved.dtype == points.dtype
    noise = np.asarray(moved, np.float64) - 5.0
    n = noise.size
    assert abs(noise.mean()) < 5 * 0.3 / math.sqrt(n)
    assert abs(noise.std() - 0.3) < 5 * 0.3 / math.sqrt(2 * n)
    assert np.array_equal(moved, noisy(jax.random.key(0), points))
    assert not np.array_equal(moved, noisy(jax.random.key(1), points))
    assert jax.jit(noisy)(jax.random.key(0), points).shape == points.shape


@pytest.mark.parametrize("scale", [-0.1, math.nan, math.inf, True, "0.1"])
def test_with_noise_refuses_a_scale_that_is_not_a_standard_deviation(scale):
    with pytest.raises(ValueError, match="noise"):
        with_noise(None, scale)


def test_with_noise_of_zero_is_the_augment_itself():
    def augment(key, points):
        return points

    assert with_noise(augment, 0.0) is augment and with_noise(None, 0) is None


def test_on_grid_values_snap_to_themselves_and_values_inside_a_cell_to_its_lower_end():
    assert snap_to_grid([[0.3, 0.07], [0.6, 0.29]], [0.1, 0.01]).tolist() == [
        [0.3, 0.07],
        [0.6, 0.29],
    ]
    for q, decimals in ((0.1, 1), (0.01, 2), (1e-6, 6)):
        recorded = np.round(np.arange(-1000, 1000) * q, decimals)
        for given in (recorded, recorded.astype(np.float32)):
            np.testing.assert_array_equal(snap_to_grid(given[:, None], [q])[:, 0], recorded)
        for inside in (0.001, 0.5, 0.999):
            snapped = snap_to_grid((recorded + inside * q)[:, None], [q])[:, 0]
            np.testing.assert_array_equal(snapped, recorded)
        below = snap_to_grid((recorded - 0.001 * q)[:, None], [q])[:, 0]
        np.testing.assert_array_equal(below, np.round(recorded - q, decimals))
    # a rounding of a cell or more counts for a tenth of a cell at most
    assert snap_to_grid([[0.38, 0.395]], [0.1, 0.1], rounding=1.0).tolist() == [[0.3, 0.4]]


def test_standardized_recorded_values_go_back_to_themselves_on_the_grid():
    """A recorded value is its cell's lower edge (noise u = 0): through float32 model
    coordinates and back it stays in its own cell."""
    uniform = np.random.default_rng(7).uniform(-50, 50, (2000, 2))
    recorded = np.column_stack([np.round(uniform[:, 0], 1), np.round(uniform[:, 1], 2)])
    transform = TableTransform.fit(recorded)
    assert transform.quantum.tolist() == [0.1, 0.01]
    back = transform.to_original(transform.standardize(recorded), on_grid=True)
    np.testing.assert_array_equal(back, recorded)


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        (np.random.default_rng(0).uniform(1.1e4, 1.3e4, 500).astype(np.float32), 0.0),
        (np.round(np.random.default_rng(1).uniform(1.1e4, 1.3e4, 500), 3).astype(np.float32), 0.0),
        (np.round(np.random.default_rng(2).uniform(1.1e4, 1.3e4, 500), 1).astype(np.float32), 0.1),
        (np.random.default_rng(3).uniform(2, 10, 50).astype(np.float32), 0.0),
        (np.random.default_rng(4).normal(size=50) * 1e12, 0.0),
        (np.array([1e15, 1e15 + 2]), 0.0),  # float64 holds 1e15 to 0.125: 4 roundings of 1
        (np.float32([0.0, 1.0, 2e5]), 1.0),  # 4 float32 roundings of 2e5: 0.095 of 1
        (np.float32([0.0, 1.0, 2.2e5]), 0.0),  # 0.105 of 1
        (np.float16([0.5, 1.5, 0.1]), 0.1),  # float16 is judged in float16
    ],
)
def test_quantum_refuses_grids_finer_than_a_few_roundings_of_the_values(column, expected):
    assert quantum(column) == expected
