"""The thing under study: normalization layers (BN and its variants, GN, LN, PN, noise injection) and the small CNNs."""
