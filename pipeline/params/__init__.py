"""The params.yaml schema: one frozen dataclass per section, and the strict loader that checks a section against it."""
