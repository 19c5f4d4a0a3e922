"""Questions over the shop database, made from templates, with a train split and a disjoint held-out split.

Each template belongs to a family (what the SQL needs) and has several phrasings of one question with slots
(``{city}``, ``{year}``...) and the reference SQL with the same slots:

=============  ==============================================================================================
``filter``     one table, a WHERE clause: "Which customers live in Rome?"
``aggregate``  COUNT / AVG / MAX / SUM over one table: "How many orders were placed in 2022?"
``group``      GROUP BY with a filter: "How many customers older than 40 live in each city?"
``join``       two or three tables joined on their ids: "How many orders did Maria place?"
``order``      ORDER BY with LIMIT: "What are the 3 most expensive products?"
=============  ==============================================================================================

The split is fixed by a seed and keeps the two sets of questions apart: every pool of slot values (cities,
categories, customers, products, years, thresholds) is cut in two, the held-out part never appears in training,
and one phrasing of every template is kept for held-out questions only (which use all phrasings). Every template
has a slot, so no held-out question text is ever a training question. Questions cycle through the families
(single-table ones twice as often) and within a family through its templates; a longer list starts with the
shorter one.

The reference SQL is for the reward only: the service compares result sets; the model never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

from examples import templates
from examples.text2sql import db

Split = templates.Split
SPLITS = templates.SPLITS
FAMILIES = ("filter", "aggregate", "group", "join", "order")
# The order questions cycle through families: single-table questions twice as often, as they are the ones a small
# model solves now and then before learning (so rewards vary), while every family stays in the mix.
FAMILY_CYCLE = ("filter", "aggregate", "group", "filter", "aggregate", "join", "order")
DEFAULT_SEED = 0

# Slot -> every value it may take. Thresholds are chosen so that every question has a non-empty answer.
VALUES: dict[str, tuple[object, ...]] = {
    "city": db.CITIES,
    "category": db.CATEGORIES,
    "customer": db.CUSTOMERS,
    "product": db.PRODUCT_NAMES,
    "year": db.YEARS,
    "price": tuple(range(20, 200, 10)),
    "age": tuple(range(25, 61)),
    "k": (2, 3, 4, 5, 6),
    "quantity": (2, 3, 4, 5),
}


@dataclass(frozen=True)
class Template:
    """One kind of question: its phrasings and reference SQL share the slots named in braces."""

    name: str
    family: str
    sql: str
    phrasings: tuple[str, ...]

    @property
    def slots(self) -> tuple[str, ...]:
        return templates.slots(self.sql)


@dataclass(frozen=True)
class Task:
    """One question to answer; ``sql`` is the reference the reward compares against, never shown to the model."""

    id: str
    question: str
    sql: str
    family: str
    template: str
    split: Split

    @property
    def ordered(self) -> bool:
        """Whether the row order of the answer matters (the reference sorts)."""
        return "ORDER BY" in self.sql.upper()


CUSTOMER_JOIN = "orders JOIN customers ON orders.customer_id = customers.id"
PRODUCT_JOIN = "orders JOIN products ON orders.product_id = products.id"

TEMPLATES: tuple[Template, ...] = (
    # -- filter ----------------------------------------------------------------------------------------------
    Template(
        "customers_in_city",
        "filter",
        "SELECT name FROM customers WHERE city = '{city}'",
        (
            "Which customers live in {city}?",
            "List the names of the customers from {city}.",
            "Give me the names of all customers living in {city}.",
        ),
    ),
    Template(
        "products_in_category",
        "filter",
        "SELECT name FROM products WHERE category = '{category}'",
        (
            "Which products are in the {category} category?",
            "List the names of all {category} products.",
            "Show the products whose category is {category}.",
        ),
    ),
    Template(
        "products_over_price",
        "filter",
        "SELECT name FROM products WHERE price > {price}",
        (
            "Which products cost more than {price} dollars?",
            "List the names of products with a price above {price}.",
            "Show the products priced over {price}.",
        ),
    ),
    Template(
        "customers_older_than",
        "filter",
        "SELECT name FROM customers WHERE age > {age}",
        (
            "Which customers are older than {age}?",
            "List the names of customers over {age} years old.",
            "Show the customers whose age is greater than {age}.",
        ),
    ),
    Template(
        "city_of_customer",
        "filter",
        "SELECT city FROM customers WHERE name = '{customer}'",
        (
            "Which city does {customer} live in?",
            "What city is the customer {customer} from?",
            "Show the city of the customer named {customer}.",
        ),
    ),
    # -- aggregate -------------------------------------------------------------------------------------------
    Template(
        "count_customers_in_city",
        "aggregate",
        "SELECT COUNT(*) FROM customers WHERE city = '{city}'",
        (
            "How many customers live in {city}?",
            "Count the customers from {city}.",
            "What is the number of customers in {city}?",
        ),
    ),
    Template(
        "count_orders_in_year",
        "aggregate",
        "SELECT COUNT(*) FROM orders WHERE year = {year}",
        (
            "How many orders were placed in {year}?",
            "Count the orders from the year {year}.",
            "What is the number of orders made in {year}?",
        ),
    ),
    Template(
        "average_price_in_category",
        "aggregate",
        "SELECT AVG(price) FROM products WHERE category = '{category}'",
        (
            "What is the average price of {category} products?",
            "Give the mean price of the products in the {category} category.",
            "On average, how much does a {category} product cost?",
        ),
    ),
    Template(
        "top_price_in_category",
        "aggregate",
        "SELECT MAX(price) FROM products WHERE category = '{category}'",
        (
            "What is the highest price of a {category} product?",
            "Find the maximum price among {category} products.",
            "How much does the most expensive {category} product cost?",
        ),
    ),
    Template(
        "total_quantity_in_year",
        "aggregate",
        "SELECT SUM(quantity) FROM orders WHERE year = {year}",
        (
            "What is the total quantity of all orders placed in {year}?",
            "Sum the quantity of the orders from {year}.",
            "How many items were ordered in total in {year}?",
        ),
    ),
    # -- group -----------------------------------------------------------------------------------------------
    Template(
        "older_customers_per_city",
        "group",
        "SELECT city, COUNT(*) FROM customers WHERE age > {age} GROUP BY city",
        (
            "For each city, how many customers are older than {age}?",
            "Count the customers over {age} years old in each city.",
            "How many customers older than {age} live in each city?",
        ),
    ),
    Template(
        "pricey_products_per_category",
        "group",
        "SELECT category, COUNT(*) FROM products WHERE price > {price} GROUP BY category",
        (
            "For each category, how many products cost more than {price}?",
            "Count the products priced above {price} in each category.",
            "How many products with a price over {price} does each category have?",
        ),
    ),
    Template(
        "large_orders_per_year",
        "group",
        "SELECT year, COUNT(*) FROM orders WHERE quantity >= {quantity} GROUP BY year",
        (
            "For each year, how many orders have a quantity of at least {quantity}?",
            "Count the orders with quantity {quantity} or more in each year.",
            "How many orders of at least {quantity} items were placed each year?",
        ),
    ),
    Template(
        "cheapest_per_category_above",
        "group",
        "SELECT category, MIN(price) FROM products WHERE price > {price} GROUP BY category",
        (
            "For each category, what is the lowest price above {price}?",
            "Show the minimum price over {price} in each category.",
            "Among products that cost more than {price}, what is the cheapest price per category?",
        ),
    ),
    # -- join ------------------------------------------------------------------------------------------------
    Template(
        "orders_of_customer",
        "join",
        f"SELECT COUNT(*) FROM {CUSTOMER_JOIN} WHERE customers.name = '{{customer}}'",
        (
            "How many orders did {customer} place?",
            "Count the orders placed by the customer {customer}.",
            "What is the number of orders made by {customer}?",
        ),
    ),
    Template(
        "quantity_of_product",
        "join",
        f"SELECT SUM(orders.quantity) FROM {PRODUCT_JOIN} WHERE products.name = '{{product}}'",
        (
            "What is the total quantity ordered of the {product}?",
            "How many units of {product} were ordered in total?",
            "Sum the order quantities for the product {product}.",
        ),
    ),
    Template(
        "orders_from_city",
        "join",
        f"SELECT COUNT(*) FROM {CUSTOMER_JOIN} WHERE customers.city = '{{city}}'",
        (
            "How many orders were placed by customers from {city}?",
            "Count the orders of customers who live in {city}.",
            "What is the number of orders made by customers in {city}?",
        ),
    ),
    Template(
        "products_bought_by",
        "join",
        f"SELECT DISTINCT products.name FROM {PRODUCT_JOIN} JOIN customers ON orders.customer_id = customers.id"
        " WHERE customers.name = '{customer}'",
        (
            "Which products did {customer} order?",
            "List the names of the products bought by {customer}.",
            "Show every product that the customer {customer} ordered.",
        ),
    ),
    # -- order -----------------------------------------------------------------------------------------------
    Template(
        "most_expensive_products",
        "order",
        "SELECT name FROM products ORDER BY price DESC LIMIT {k}",
        (
            "What are the {k} most expensive products?",
            "List the {k} products with the highest prices, most expensive first.",
            "Show the top {k} products by price.",
        ),
    ),
    Template(
        "youngest_customers",
        "order",
        "SELECT name FROM customers ORDER BY age LIMIT {k}",
        (
            "Who are the {k} youngest customers?",
            "List the {k} customers with the lowest age, youngest first.",
            "Show the {k} youngest customers.",
        ),
    ),
    Template(
        "cheapest_in_category",
        "order",
        "SELECT name FROM products WHERE category = '{category}' ORDER BY price LIMIT 1",
        (
            "What is the cheapest product in the {category} category?",
            "Which {category} product has the lowest price?",
            "Name the least expensive {category} product.",
        ),
    ),
    Template(
        "oldest_in_city",
        "order",
        "SELECT name FROM customers WHERE city = '{city}' ORDER BY age DESC LIMIT 1",
        (
            "Who is the oldest customer in {city}?",
            "Which customer from {city} has the highest age?",
            "Name the oldest customer living in {city}.",
        ),
    ),
)


GENERATOR = templates.Generator("text2sql", TEMPLATES, FAMILY_CYCLE, VALUES)


def value_pools(split: Split, seed: int = DEFAULT_SEED) -> dict[str, tuple[object, ...]]:
    """The values each slot takes in ``split``: about a third of every pool is held out, the rest is training's."""
    return GENERATOR.pools(split, seed)


def phrasings(template: Template, split: Split, seed: int = DEFAULT_SEED) -> tuple[str, ...]:
    """The phrasings ``split`` uses: training lacks one (chosen by the seed), held out uses all."""
    return GENERATOR.phrasings(template, split, seed)


def questions(split: Split, n: int, seed: int = DEFAULT_SEED) -> list[Task]:
    """``n`` questions of ``split``, cycling through :data:`FAMILY_CYCLE` and, within a family, its templates."""
    return [
        Task(f"{split}-{i}", question, template.sql.format(**values), template.family, template.name, split)
        for i, (template, values, question) in enumerate(GENERATOR.draw(split, n, seed))
    ]


def find(question: str) -> Task | None:
    """The task a question text was made from (its template and slot values), or None: how a judge that sees only
    the recorded call (a reward hook) recovers the reference query. Works for both splits, any seed."""
    found = GENERATOR.match(question)
    if found is None:
        return None
    template, values, split = found
    task_id = f"{template.name}:" + ",".join(f"{s}={v}" for s, v in values.items())
    return Task(task_id, question, template.sql.format(**values), template.family, template.name, split)
