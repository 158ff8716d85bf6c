"""Recipes: the settings, their files, and the batch arithmetic."""
