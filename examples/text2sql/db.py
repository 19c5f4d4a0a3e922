"""The example's SQLite database: a small shop (customers, products, orders), generated from a seed.

The names (customers, products, cities, categories, years) are fixed constants, so that questions can be written
against them without opening the file; the seed decides everything else: where each customer lives and how old
they are, what each product costs, and who ordered what, when. The same seed always gives the same file, byte for
byte. A few properties hold for every seed, so that every question the templates can ask has an answer:

* ages are distinct and prices are distinct, so "the oldest", "the 3 cheapest" have no ties;
* every city has the same number of customers (five);
* every customer, every product and every (city, year) pair has at least one order.

Build it with ``python -m examples.text2sql.db --out shop.sqlite [--seed 0]``.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SEED = 0

CITIES = ("Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Dublin", "Oslo")
YEARS = (2020, 2021, 2022, 2023, 2024)
CUSTOMERS = (
    "Alice", "Bruno", "Chloe", "Daniel", "Emma", "Felix", "Grace", "Hugo", "Irene", "Jonas",
    "Karen", "Liam", "Maria", "Nora", "Oscar", "Paula", "Quentin", "Rosa", "Samuel", "Tina",
    "Ulrich", "Vera", "Walter", "Xenia", "Yusuf", "Zoe", "Adrian", "Bianca", "Carlos", "Diana",
    "Erik", "Fiona", "Georg", "Helena", "Ivan", "Julia", "Kevin", "Laura", "Marco", "Nina",
)  # fmt: skip
PRODUCTS = {
    "Books": ("Atlas", "Cookbook", "Novel", "Poetry Book"),
    "Games": ("Chess Set", "Puzzle", "Card Game", "Board Game"),
    "Garden": ("Shovel", "Watering Can", "Flower Pot", "Hose"),
    "Kitchen": ("Kettle", "Chef Knife", "Frying Pan", "Teapot"),
    "Music": ("Guitar", "Drum", "Flute", "Violin"),
    "Sports": ("Football", "Tennis Racket", "Yoga Mat", "Bicycle"),
}
CATEGORIES = tuple(PRODUCTS)
PRODUCT_NAMES = tuple(name for names in PRODUCTS.values() for name in names)

MIN_AGE, MAX_AGE = 18, 79
MIN_PRICE, MAX_PRICE = 5, 300  # whole dollars; each price gets distinct cents
ORDERS = 400
MAX_QUANTITY = 5

SCHEMA = """\
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, age INTEGER NOT NULL);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, price REAL NOT NULL);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    product_id INTEGER NOT NULL REFERENCES products(id),
    quantity INTEGER NOT NULL,
    year INTEGER NOT NULL
);
"""


def rows(seed: int = DEFAULT_SEED) -> dict[str, Sequence[tuple[object, ...]]]:
    """Every table's rows for ``seed``, in insertion order."""
    rng = random.Random(f"text2sql-db:{seed}")
    cities = [CITIES[i % len(CITIES)] for i in range(len(CUSTOMERS))]
    rng.shuffle(cities)
    ages = rng.sample(range(MIN_AGE, MAX_AGE + 1), len(CUSTOMERS))
    customers = [(i + 1, name, cities[i], ages[i]) for i, name in enumerate(CUSTOMERS)]

    cents = rng.sample(range(MIN_PRICE * 100, MAX_PRICE * 100), len(PRODUCT_NAMES))
    categories = [category for category, names in PRODUCTS.items() for _ in names]
    products = [(i + 1, name, categories[i], round(cents[i] / 100, 2)) for i, name in enumerate(PRODUCT_NAMES)]

    by_city: dict[str, list[int]] = {}
    for customer_id, _, city, _ in customers:
        by_city.setdefault(city, []).append(customer_id)
    wanted: list[tuple[int, int | None, int | None]] = []  # (customer, product or any, year or any)
    wanted += [(c, None, None) for c, *_ in customers]
    wanted += [(rng.choice(customers)[0], p, None) for p, *_ in products]
    wanted += [(rng.choice(by_city[city]), None, year) for city in CITIES for year in YEARS]
    while len(wanted) < ORDERS:
        wanted.append((rng.choice(customers)[0], None, None))
    rng.shuffle(wanted)
    orders = [
        (
            i + 1,
            customer,
            product if product is not None else rng.choice(products)[0],
            rng.randint(1, MAX_QUANTITY),
            year if year is not None else rng.choice(YEARS),
        )
        for i, (customer, product, year) in enumerate(wanted)
    ]
    return {"customers": customers, "products": products, "orders": orders}


def build(path: Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the database for ``seed`` to ``path`` (replaced atomically if it exists) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with sqlite3.connect(staging) as con:
            con.executescript(SCHEMA)
            for table, table_rows in rows(seed).items():
                marks = ", ".join("?" * len(table_rows[0]))
                con.executemany(f"INSERT INTO {table} VALUES ({marks})", table_rows)
        con.close()
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def ensure(path: Path, seed: int = DEFAULT_SEED) -> Path:
    """``path``, built first if it does not exist yet."""
    return path if path.exists() else build(path, seed)


def default_path(seed: int = DEFAULT_SEED) -> Path:
    """Where the service keeps the database for ``seed`` unless told otherwise."""
    return Path(tempfile.gettempdir()) / f"lightwire-text2sql-{seed}.sqlite"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the text-to-SQL example's SQLite database.")
    parser.add_argument("--out", type=Path, required=True, help="file to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the generated data")
    args = parser.parse_args(argv)
    build(args.out, args.seed)
    counts = {table: len(table_rows) for table, table_rows in rows(args.seed).items()}
    print(f"wrote {args.out}: " + ", ".join(f"{n} {table}" for table, n in counts.items()))


if __name__ == "__main__":
    main()
