"""Commands that use a finished run: BN folding, the throughput benchmark."""
