"""On PYTHONPATH in the end-to-end test only: each process appends every `pipeline` module it imports, with the stage
it works for, to $PIPELINE_IMPORT_LOG. The modules a stage's processes (its script, and its Ray workers, which
inherit PIPELINE_STAGE) really loaded are the oracle for the static closure of pipeline/fingerprint.py."""

import os
import sys

LOG = os.environ.get("PIPELINE_IMPORT_LOG")


def _stage() -> str:
    if os.environ.get("PIPELINE_STAGE"):
        return os.environ["PIPELINE_STAGE"]
    argv = sys.orig_argv[1:]  # sys.argv[0] is "-m" while `python -m MODULE` is still importing MODULE's packages
    if len(argv) >= 2 and argv[0] == "-m":
        package, _, name = argv[1].rpartition(".")
        return name if package == "stages" else f"other:{argv[1]}"
    script = sys.argv[0] if sys.argv else ""
    parent, name = os.path.split(script)
    return name[:-3] if os.path.basename(parent) == "stages" and name.endswith(".py") else f"other:{name}"


class _Recorder:
    """A finder that finds nothing: it only sees each first import go by."""

    def find_spec(self, name, path=None, target=None):
        if name == "pipeline" or name.startswith("pipeline."):
            fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{_stage()}\t{os.getpid()}\t{name}\n".encode())
            finally:
                os.close(fd)
        return None


if LOG:
    sys.meta_path.insert(0, _Recorder())
