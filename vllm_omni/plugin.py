"""vLLM ``general_plugins`` entry point: runs in every vLLM process.

It only makes sure the torchvision fix is active (see ``platform_fixes``); everything else in
vllm_omni is reached through the ``--omni`` CLI hook, so plain ``vllm serve`` is untouched.
"""


def register() -> None:
    from vllm_omni.platform_fixes import install_torchvision_hook

    install_torchvision_hook()
