"""Weight quantization features (``--quantization fp8``)."""
