"""Model definitions (HF architectures by name: ``registry``), their layers, weight loading and updates by HF names, and the kernels layers call (``backends``, ``forward_context``)."""
