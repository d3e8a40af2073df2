"""One module per artifact format: its name and version, its writer and its reader. A stage that reads an artifact
imports its format module only, never the machinery that made it, so its import closure (and dvc.yaml deps) stay
small. docs/architecture.md has the table of formats, writers, readers and consumers."""
