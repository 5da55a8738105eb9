"""The BCP trainer and its nnU-Net-style variants."""
