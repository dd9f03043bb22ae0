"""End-to-end pipelines (fit/train, evaluate, predict, demo) used by the CLI and experiments."""
