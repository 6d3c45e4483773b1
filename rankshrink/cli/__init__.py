"""Presentation: the command line, terminal rendering, plots."""
