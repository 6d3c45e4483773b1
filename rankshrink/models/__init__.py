"""Model adapters: what a model is made of (its Linear sites, layouts), and its saved form."""
