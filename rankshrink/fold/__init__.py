"""Folding: factorized models into the plain, smaller modules that are exported."""
