"""longtrain: PyTorch-native training of long-context models on a 4D parallel mesh."""
__version__ = "0.1.0"
