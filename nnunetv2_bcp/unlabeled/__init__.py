"""Unlabeled images for BCP: raw layout, preprocessing with nnU-Net's plans, label subsets, the data stream."""
