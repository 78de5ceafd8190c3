"""The built-in dataset: seeded synthetic card transactions written as time-partitioned parquet.

Rows are generated and written one file at a time, so memory stays bounded by `rows_per_file`
plus the card and merchant tables, whatever the total size. Entity attributes come from one seeded
stream; file `i` draws from `np.random.default_rng([seed, i])`, so any file can be regenerated on
its own and the output depends only on the parameters recorded in `_generator.json`.

Fraud follows a logistic model over the patterns listed in `_FRAUD_WEIGHTS`, its intercept
calibrated on a seeded pilot sample so that about `FRAUD_RATE` of rows are positive.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

# Bump whenever the same parameters would produce different bytes: the manifest check relies on it.
SCHEMA_VERSION = 1
MANIFEST = "_generator.json"
START = np.datetime64("2026-01-01T00:00:00", "us")
SPAN_DAYS = 90
FRAUD_RATE = 0.01
COMPRESSION = "zstd"

SCHEMA = pa.schema(
    [
        ("transaction_id", pa.int64()),
        ("card_id", pa.int64()),
        ("merchant_id", pa.int64()),
        ("mcc", pa.int32()),
        ("amount", pa.float64()),
        ("timestamp", pa.timestamp("us")),
        ("channel", pa.string()),
        ("country", pa.string()),
        ("customer_age", pa.float64()),
        ("is_fraud", pa.int8()),
    ]
)

CHANNELS = ("chip", "swipe", "online", "contactless")
_ONLINE = CHANNELS.index("online")
# Split of card-present transactions among the other three channels (chip, swipe, contactless).
_PRESENT_SPLIT = (0.45, 0.15, 0.40)
COUNTRIES = ("US", "GB", "DE", "FR", "CA", "MX", "BR", "IN")
_COUNTRY_WEIGHTS = (0.42, 0.10, 0.09, 0.08, 0.08, 0.07, 0.07, 0.09)

# (mcc, share of merchants, median amount in USD, log-amount sigma, online share, risky)
_MCC_TABLE: tuple[tuple[int, float, float, float, float, bool], ...] = (
    (5411, 0.14, 45.0, 0.70, 0.05, False),  # grocery stores
    (5812, 0.11, 32.0, 0.60, 0.05, False),  # restaurants
    (5814, 0.10, 12.0, 0.50, 0.10, False),  # fast food
    (5541, 0.07, 40.0, 0.50, 0.02, False),  # service stations
    (5542, 0.04, 50.0, 0.40, 0.00, False),  # automated fuel dispensers
    (5311, 0.04, 70.0, 0.80, 0.20, False),  # department stores
    (5310, 0.04, 35.0, 0.70, 0.15, False),  # discount stores
    (5912, 0.04, 25.0, 0.70, 0.10, False),  # drug stores
    (5999, 0.05, 40.0, 0.90, 0.40, False),  # miscellaneous retail
    (5732, 0.02, 220.0, 0.90, 0.45, False),  # electronics
    (5651, 0.03, 60.0, 0.70, 0.30, False),  # family clothing
    (5691, 0.02, 80.0, 0.70, 0.35, False),  # men's and women's clothing
    (5942, 0.01, 25.0, 0.60, 0.50, False),  # book stores
    (5945, 0.01, 35.0, 0.70, 0.30, False),  # toy and hobby shops
    (5200, 0.02, 90.0, 0.90, 0.10, False),  # home supply warehouses
    (5712, 0.01, 400.0, 0.90, 0.20, False),  # furniture
    (4111, 0.03, 6.0, 0.50, 0.10, False),  # commuter transport
    (4121, 0.03, 18.0, 0.60, 0.60, False),  # taxis and rideshare
    (4511, 0.01, 350.0, 0.70, 0.85, False),  # airlines
    (7011, 0.01, 220.0, 0.70, 0.50, False),  # hotels
    (5813, 0.03, 25.0, 0.60, 0.00, False),  # bars
    (5921, 0.01, 30.0, 0.60, 0.05, False),  # liquor stores
    (4814, 0.02, 60.0, 0.50, 0.70, False),  # telecom services
    (4899, 0.02, 15.0, 0.40, 0.95, False),  # cable and streaming
    (5818, 0.02, 10.0, 0.80, 0.95, False),  # digital goods
    (8062, 0.005, 300.0, 1.00, 0.10, False),  # hospitals
    (7832, 0.01, 20.0, 0.40, 0.30, False),  # cinemas
    (6011, 0.03, 100.0, 0.60, 0.00, False),  # ATM cash
    (5967, 0.01, 50.0, 0.80, 0.90, True),  # direct marketing, inbound telemarketing
    (7995, 0.005, 80.0, 1.00, 0.70, True),  # gambling
    (4829, 0.005, 300.0, 1.00, 0.70, True),  # wire transfers and money orders
    (6051, 0.005, 200.0, 1.00, 0.80, True),  # quasi-cash, crypto
)
MCC_CODES = tuple(m[0] for m in _MCC_TABLE)
_MCC_CODE = np.array(MCC_CODES, dtype=np.int32)
_MCC_SHARE = np.array([m[1] for m in _MCC_TABLE]) / sum(m[1] for m in _MCC_TABLE)
_MCC_LOG_MEDIAN = np.log([m[2] for m in _MCC_TABLE])
_MCC_SIGMA = np.array([m[3] for m in _MCC_TABLE])
_MCC_ONLINE = np.array([m[4] for m in _MCC_TABLE])
_MCC_RISKY = np.array([m[5] for m in _MCC_TABLE])

# Relative transaction volume by hour of day and by weekday (Monday first).
_HOURLY = np.array(
    [
        *(0.25, 0.15, 0.10, 0.08, 0.08, 0.15, 0.35, 0.60, 0.85, 1.00, 1.10, 1.25),
        *(1.40, 1.30, 1.20, 1.20, 1.30, 1.45, 1.50, 1.40, 1.20, 0.95, 0.70, 0.45),
    ]
)
_WEEKDAY = np.array([0.95, 0.95, 0.97, 1.00, 1.10, 1.15, 0.90])
NIGHT_HOURS = range(0, 6)

# Logit contributions of the fraud patterns; the intercept is calibrated, not fixed.
_FRAUD_WEIGHTS = {
    "amount_excess": 2.5,  # per unit of log(amount / card's typical amount at this MCC) over 0.5
    "night": 2.2,
    "burst": 3.0,  # several transactions of one card within minutes, at night
    "risky_merchant": 2.5,
    "risky_mcc": 1.8,
    "online": 1.2,
    "foreign": 2.2,
    "compromised_card": 3.0,
    "elderly": 0.6,
}
_SPIKE_RATE = 0.015  # share of rows far above the card's usual amount, fraud or not
_BURST_START_RATE = 0.01  # per night-time row
_MISSING = {"amount": 0.005, "channel": 0.01, "customer_age": 0.02}

_US_PER_HOUR = 3_600_000_000
_US_PER_DAY = 24 * _US_PER_HOUR
_START_US = int(START.astype(np.int64))
_SPAN_US = SPAN_DAYS * _US_PER_DAY
# SeedSequence spawn keys: streams apart from the files' default_rng([seed, index]).
_ENTITY_STREAM = 1
_PILOT_STREAM = 2
_PILOT_ROWS = 100_000
_ACTIVITY_TIERS = 16

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def default_entity_counts(rows: int) -> tuple[int, int]:
    """Number of cards (~rows/50) and merchants (~rows/500) for a dataset of `rows` rows."""
    n_cards = min(max(rows // 50, 100), 5_000_000)
    n_merchants = min(max(rows // 500, 50), 200_000)
    return n_cards, n_merchants


@dataclass(frozen=True)
class _ActivitySampler:
    """Draws entities with skewed activity in O(1) per draw.

    Entities fall into tiers that each receive an equal share of the draws; tier sizes grow
    geometrically, so members of small tiers are drawn often and members of large ones rarely.
    """

    order: npt.NDArray[np.int32]  # entity indices, grouped by tier
    tier_start: IntArray
    tier_size: IntArray

    @classmethod
    def build(cls, rng: np.random.Generator, n: int) -> _ActivitySampler:
        tiers = min(_ACTIVITY_TIERS, n)
        growth = 1.25 ** np.arange(tiers)
        extra = np.floor((n - tiers) * growth / growth.sum()).astype(np.int64)
        sizes = 1 + extra
        sizes[-1] += n - sizes.sum()
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return cls(rng.permutation(n).astype(np.int32), starts, sizes)

    def draw(self, u: FloatArray) -> IntArray:
        """Map uniforms in [0, 1) to entity indices."""
        x = u * len(self.tier_size)
        tier = np.minimum(x.astype(np.int64), len(self.tier_size) - 1)
        size = self.tier_size[tier]
        pos = np.minimum(((x - tier) * size).astype(np.int64), size - 1)
        return self.order[self.tier_start[tier] + pos].astype(np.int64)


@dataclass(frozen=True)
class _Entities:
    """Per-card and per-merchant attributes, identical for every file of one dataset."""

    cards: _ActivitySampler
    card_home: npt.NDArray[np.int8]  # index into COUNTRIES
    card_level: npt.NDArray[np.float32]  # log spending level relative to the MCC's median
    card_age: npt.NDArray[np.float32]
    card_compromised: BoolArray
    merchants: _ActivitySampler
    merchant_mcc: npt.NDArray[np.int8]  # index into _MCC_TABLE
    merchant_online: npt.NDArray[np.float32]  # probability that a transaction is online
    merchant_risky: BoolArray


def _build_entities(seed: int, n_cards: int, n_merchants: int) -> _Entities:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_ENTITY_STREAM,)))
    cards = _ActivitySampler.build(rng, n_cards)
    home = rng.choice(len(COUNTRIES), size=n_cards, p=_COUNTRY_WEIGHTS).astype(np.int8)
    level = rng.normal(0.0, 0.5, n_cards).astype(np.float32)
    age = np.clip(np.round(rng.normal(45.0, 16.0, n_cards)), 18, 90).astype(np.float32)
    compromised = rng.random(n_cards) < 0.005
    merchants = _ActivitySampler.build(rng, n_merchants)
    mcc = rng.choice(len(_MCC_TABLE), size=n_merchants, p=_MCC_SHARE).astype(np.int8)
    online = np.clip(_MCC_ONLINE[mcc] + rng.normal(0.0, 0.1, n_merchants), 0.0, 1.0)
    online[_MCC_ONLINE[mcc] == 0.0] = 0.0  # fuel pumps and ATMs are never online
    risky = rng.random(n_merchants) < 0.03
    return _Entities(
        cards, home, level, age, compromised, merchants, mcc, online.astype(np.float32), risky
    )


def _timestamps(rng: np.random.Generator, n: int, t0: int, t1: int) -> IntArray:
    """`n` sorted microsecond timestamps in [t0, t1), denser by day and on weekends."""
    first_hour, last_hour = t0 // _US_PER_HOUR, (t1 - 1) // _US_PER_HOUR + 1
    hours = np.arange(first_hour, last_hour, dtype=np.int64)
    edges = np.clip(np.append(hours, last_hour) * _US_PER_HOUR, t0, t1)
    widths = np.diff(edges).astype(np.float64)
    weekday = (hours // 24 + 3) % 7  # 1970-01-01 was a Thursday
    mass = widths * _HOURLY[hours % 24] * _WEEKDAY[weekday]
    cum = np.concatenate([[0.0], np.cumsum(mass)])
    # Normalised cumulative sums of exponentials are sorted uniforms, without a sort.
    spacings = np.cumsum(rng.standard_exponential(n + 1))
    target = spacings[:n] * (cum[-1] / spacings[n])
    k = np.clip(np.searchsorted(cum, target, side="right") - 1, 0, len(mass) - 1)
    t = edges[k] + (target - cum[k]) / mass[k] * widths[k]
    return np.clip(t.astype(np.int64), t0, t1 - 1)


@dataclass(frozen=True)
class _Draw:
    """One batch of transactions before labelling and masking, plus its fraud logit."""

    t_us: IntArray
    card: IntArray
    merchant: IntArray
    mcc: npt.NDArray[np.int8]
    amount: FloatArray
    channel: npt.NDArray[np.int8]
    country: npt.NDArray[np.int8]
    age: npt.NDArray[np.float32]
    score: FloatArray  # fraud logit without the intercept


def _draw(rng: np.random.Generator, n: int, t0: int, t1: int, ent: _Entities) -> _Draw:
    t_us = _timestamps(rng, n, t0, t1)
    night = (t_us // _US_PER_HOUR) % 24 < NIGHT_HOURS.stop

    # Bursts: a card used several times in a row (rows are time-sorted, so within minutes).
    card = ent.cards.draw(rng.random(n))
    starts = np.flatnonzero(night & (rng.random(n) < _BURST_START_RATE))
    lengths = rng.integers(2, 7, size=len(starts))
    burst = np.zeros(n, dtype=bool)
    burst[starts] = True
    for step in range(1, 6):
        src = starts[lengths > step]
        src = src[src + step < n]
        card[src + step] = card[src]
        burst[src + step] = True

    merchant = ent.merchants.draw(rng.random(n))
    mcc = ent.merchant_mcc[merchant]

    online = burst | (rng.random(n) < ent.merchant_online[merchant])
    present = np.searchsorted(np.cumsum(_PRESENT_SPLIT), rng.random(n) * sum(_PRESENT_SPLIT))
    channel = np.array([0, 1, 3], dtype=np.int8)[np.minimum(present, 2)]
    channel[online] = _ONLINE

    home = ent.card_home[card]
    foreign = rng.random(n) < np.where(online, 0.08, 0.02)
    shift = rng.integers(1, len(COUNTRIES), size=n, dtype=np.int8)
    country = np.where(foreign, (home + shift) % len(COUNTRIES), home).astype(np.int8)

    # log(amount) = MCC median + card level + noise; rare spikes far above the card's usual.
    excess = _MCC_SIGMA[mcc] * rng.standard_normal(n)
    spiked = rng.random(n) < _SPIKE_RATE
    excess[spiked] += rng.uniform(1.0, 3.0, size=int(spiked.sum()))
    log_amount = _MCC_LOG_MEDIAN[mcc] + ent.card_level[card] + excess
    amount = np.maximum(np.round(np.exp(log_amount), 2), 0.01)

    age = ent.card_age[card]
    w = _FRAUD_WEIGHTS
    score = w["amount_excess"] * np.clip(excess - 0.5, 0.0, 3.5)
    score += w["night"] * night
    score += w["burst"] * burst
    score += w["risky_merchant"] * ent.merchant_risky[merchant]
    score += w["risky_mcc"] * _MCC_RISKY[mcc]
    score += w["online"] * online
    score += w["foreign"] * foreign
    score += w["compromised_card"] * ent.card_compromised[card]
    score += w["elderly"] * (age >= 75)
    return _Draw(t_us, card, merchant, mcc, amount, channel, country, age, score)


def _calibrate_intercept(score: FloatArray, rate: float) -> float:
    """The intercept b with mean(sigmoid(b + score)) == rate (bisection; the mean is monotone)."""
    lo, hi = -30.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(mid + score)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _pilot_intercept(seed: int, ent: _Entities) -> float:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PILOT_STREAM,)))
    pilot = _draw(rng, _PILOT_ROWS, _START_US, _START_US + _SPAN_US, ent)
    return _calibrate_intercept(pilot.score, FRAUD_RATE)


def _file_table(
    seed: int, index: int, row0: int, row1: int, rows: int, ent: _Entities, intercept: float
) -> pa.Table:
    """Rows [row0, row1) of the dataset: file `index`, covering its share of the time span."""
    n = row1 - row0
    rng = np.random.default_rng([seed, index])
    t0 = _START_US + _SPAN_US * row0 // rows
    t1 = _START_US + _SPAN_US * row1 // rows
    d = _draw(rng, n, t0, t1, ent)

    is_fraud = (rng.random(n) < 1.0 / (1.0 + np.exp(-(intercept + d.score)))).astype(np.int8)
    amount = np.where(rng.random(n) < _MISSING["amount"], np.nan, d.amount)
    age = np.where(rng.random(n) < _MISSING["customer_age"], np.nan, d.age.astype(np.float64))
    channel_missing = rng.random(n) < _MISSING["channel"]

    channels = pa.array(CHANNELS, type=pa.string())
    countries = pa.array(COUNTRIES, type=pa.string())
    columns = [
        pa.array(np.arange(row0 + 1, row1 + 1, dtype=np.int64)),
        pa.array(d.card + 1),
        pa.array(d.merchant + 1),
        pa.array(_MCC_CODE[d.mcc]),
        pa.array(amount),
        pa.array(d.t_us, type=pa.timestamp("us")),
        channels.take(pa.array(d.channel, mask=channel_missing)),
        countries.take(pa.array(d.country)),
        pa.array(age),
        pa.array(is_fraud),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; move it onto `path` once the block succeeds."""
    # The temporary name matches neither part-*.parquet nor *.parquet, so readers never see it.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": str(path)}
    return loaded if isinstance(loaded, dict) else {"unreadable": str(path)}


def _has_rows(path: Path, n: int) -> bool:
    try:
        return bool(pq.read_metadata(path).num_rows == n)
    except (OSError, pa.ArrowException):
        return False


def generate_transactions(
    rows: int,
    out_dir: Path,
    *,
    seed: int = 0,
    rows_per_file: int = 1_000_000,
    n_cards: int | None = None,
    n_merchants: int | None = None,
    on_file_written: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write `rows` synthetic card transactions to `out_dir/part-NNNNN.parquet`, file by file.

    Files are time-ordered (file i covers a later window of the 90 days from START than file
    i-1) and written atomically. A directory already holding the same dataset, as recorded in
    `_generator.json`, is returned as is; missing files of it are regenerated.

    Args:
        rows: total number of transactions, >= 1.
        out_dir: created if needed.
        seed: the whole dataset is a deterministic function of the parameters.
        rows_per_file: rows in each file but the last.
        n_cards, n_merchants: entity counts; `default_entity_counts(rows)` when None.
        on_file_written: called as (files_done, rows_done) after each file is in place.

    Returns:
        The part files, in time order.

    Raises:
        ValueError: invalid arguments, or `out_dir` holds part files of other parameters.
    """
    for name, value in (("rows", rows), ("rows_per_file", rows_per_file)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    # Below 2**63 a seed spans fewer SeedSequence words than the padded entity/pilot entropy.
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    default_cards, default_merchants = default_entity_counts(rows)
    n_cards = default_cards if n_cards is None else n_cards
    n_merchants = default_merchants if n_merchants is None else n_merchants
    for name, value in (("n_cards", n_cards), ("n_merchants", n_merchants)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    params: dict[str, Any] = {
        "rows": rows,
        "seed": seed,
        "rows_per_file": rows_per_file,
        "n_cards": n_cards,
        "n_merchants": n_merchants,
        "schema_version": SCHEMA_VERSION,
    }
    out_dir = Path(out_dir)
    n_files = math.ceil(rows / rows_per_file)
    width = max(5, len(str(n_files - 1)))
    paths = [out_dir / f"part-{i:0{width}d}.parquet" for i in range(n_files)]

    manifest = out_dir / MANIFEST
    previous = _read_manifest(manifest)
    existing = sorted(out_dir.glob("part-*.parquet")) if out_dir.is_dir() else []
    if existing and previous != params:
        origin = f"no {MANIFEST}" if previous is None else f"{MANIFEST} records {previous}"
        raise ValueError(
            f"{out_dir}: already holds {len(existing)} part files not written with these "
            f"parameters ({origin}; requested {params}); use another directory or empty it"
        )
    strays = sorted(set(existing) - set(paths))
    if strays:
        raise ValueError(f"{out_dir}: holds part files this dataset does not have: {strays[:3]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if previous != params:
        with _atomic_target(manifest) as tmp:
            tmp.write_text(json.dumps(params, indent=2) + "\n")

    ent: _Entities | None = None
    intercept = 0.0
    for index, path in enumerate(paths):
        row0, row1 = index * rows_per_file, min((index + 1) * rows_per_file, rows)
        if not _has_rows(path, row1 - row0):
            if ent is None:  # built lazily: an already complete dataset costs nothing
                ent = _build_entities(seed, n_cards, n_merchants)
                intercept = _pilot_intercept(seed, ent)
            table = _file_table(seed, index, row0, row1, rows, ent, intercept)
            with _atomic_target(path) as tmp:
                pq.write_table(table, tmp, compression=COMPRESSION)
        if on_file_written is not None:
            on_file_written(index + 1, row1)
    return paths
