"""torch modules: factorized, indexed and low-rank layers, the encoders rankshrink builds."""
