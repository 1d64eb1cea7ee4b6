import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def pytest_addoption(parser):
    # the tiny-model tests (helpers.tiny) run on this device; CI uses the CPU, a GPU machine passes --device cuda
    parser.addoption(
        "--device", default="cpu", help="torch device for the tiny models of the tests (cpu, cuda, cuda:1)"
    )


def pytest_configure(config):
    device = torch.device(config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device} asked for, but this torch sees no CUDA device")
    if device.type == "cpu":
        # Triton kernels (CUDA statistics) are tested on the CPU in Triton's interpreter, which Triton reads
        # when it is first imported (its own reductions are jit functions too; transformers' imports pull
        # Triton in through torch._dynamo, hence before helpers)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import helpers

    helpers.DEVICE = device


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
