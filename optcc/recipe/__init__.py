"""Recipes: the YAML a user writes, validated into a Plan before any work starts."""

from optcc.recipe.loader import Plan, PlannedPass, load_recipe, suggest
from optcc.recipe.schema import SCHEMA_VERSION, RecipeModel, json_schema

__all__ = ["SCHEMA_VERSION", "Plan", "PlannedPass", "RecipeModel", "json_schema", "load_recipe", "suggest"]
