"""What BN does, measured: test-time statistic modes, precise BN passes, probes during training."""
