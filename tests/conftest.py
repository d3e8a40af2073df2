import os
import secrets

import pytest
import torch

# Belt and braces for runs that bypass `make test`: no hub lookups, Ray locked by a token, no DVC analytics. Set
# before anything imports ray, which reads its auth mode once. The token lives in this process's environment for
# the session (inherited by the Rays the tests start and by `dvc repro`'s stages), so tests leave no token file.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "token",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(key, value)
if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`). The test
    machine has 2 shared cores: intra-op threads on small tensors mostly spin against other jobs (up to 30x slower),
    and bit-for-bit comparisons need the same kernels in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
