"""The methods' surgery on a model: RaRe factorization and fusion, low-rank, layer sparsity."""
