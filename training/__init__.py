"""Training, evaluation and ONNX export of ggo-cli's GGO segmentation networks.

Runs from the checkout (``python -m training ...``); not part of the installed wheel. Importing
the package imports nothing heavy: each submodule pulls in what it needs (``loop`` needs only
torch, numpy, tqdm and the pure-numpy ``ggo_cli.analysis.preprocessing``).
"""
