"""mxcube-autocenter: optical crystal centring for MXCuBE with a neural network."""

__version__ = "0.1.0"
