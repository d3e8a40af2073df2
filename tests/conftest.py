import os

import pytest
import torch

# Belt and braces for runs that bypass `make test`: no hub lookups, no Ray auth warning, no DVC analytics.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`). The test
    machine has 2 shared cores: intra-op threads on small tensors mostly spin against other jobs (up to 30x slower),
    and bit-for-bit comparisons need the same kernels in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
