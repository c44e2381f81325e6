"""Imported by every Python process the tests start (tests/conftest.py puts this directory on
PYTHONPATH): installs the test-only hooks of ``vllm_omni.testing.hooks``."""

try:
    from vllm_omni.testing import hooks
except ImportError:  # a Python without vllm_omni (none of ours)
    pass
else:
    hooks.install()
