"""nnunetv2_bcp: Bidirectional Copy-Paste semi-supervised training for nnU-Net v2."""
__version__ = "0.1.0"
