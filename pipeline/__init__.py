"""DiT (Peebles & Xie, 2023) as a reproducible DVC pipeline. See docs/architecture.md for the module map."""
