"""One run from config to records: assemble its parts, fit, checkpoint and resume, fine-tune,
progress bars and loggers."""
