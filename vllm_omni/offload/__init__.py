"""Offload: model weights kept off the compute device until they run (``--enable-cpu-offload``,
``--enable-layerwise-offload``)."""
