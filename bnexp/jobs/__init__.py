"""Sweeps: run folders, skip and resume, locks, launcher placement, the sweep's progress."""
