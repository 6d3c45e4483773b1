"""Pure math: index maps (P, Q), the RaRe loss terms, spectra (SVD, Marchenko–Pastur)."""
