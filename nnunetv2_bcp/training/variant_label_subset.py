"""BCP on a simulated label-scarce dataset: the opt-in to ``nnUNetv2_bcp_label_subset``'s subset. The name is in the
results folder (``nnUNetTrainerBCP_labelSubset__<plans>__<configuration>``), so that such a model is never taken for
one trained on every label."""
from nnunetv2_bcp.training.nnUNetTrainerBCP import nnUNetTrainerBCP


class nnUNetTrainerBCP_labelSubset(nnUNetTrainerBCP):
    """BCP on the labeled cases of the fold's label subset; its label-dropped training cases join the unlabeled
    stream (their labels are never opened)."""
    uses_label_subset = True
