"""Shipped recipes, installed as the package `deltacli.recipes` (see pyproject.toml)."""
