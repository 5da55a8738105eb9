"""nnU-Net restricted to the labeled cases of a label subset (``nnUNetv2_bcp_label_subset``): the labeled-only
baseline of BCP, and the mixin that BCP shares with it."""
from batchgenerators.utilities.file_and_folder_operations import isfile
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_bcp.training.checkpoint import load_checkpoint, save_nnunet_checkpoint_with
from nnunetv2_bcp.training.start_from_model import ContinueOnlyWhereStartedFromModel
from nnunetv2_bcp.unlabeled.label_subset import fold_subset, label_subset_path, load_label_subset
from nnunetv2_bcp.unlabeled.raw import UnlabeledDataError


class LabelSubsetMixin:
    """Restricts a trainer's labeled training cases to the fold's entry of ``bcp_label_subset.json`` where the trainer
    opts in (``uses_label_subset``: the trainers named for it, e.g. ``nnUNetTrainerLabelSubset``,
    ``nnUNetTrainerBCP_labelSubset``); nnU-Net's split and validation cases stay as they are. A subset in effect is
    said in the log at every start and recorded (``label_subset_in_use``; BCP writes it into ``bcp_settings.json``
    and its checkpoints); a trainer that does not opt in says that it leaves the file unused. A file left from an
    experiment would otherwise turn every later training on the dataset into a label-scarce one."""
    uses_label_subset = True
    label_subset_in_use = None
    label_subset_of_checkpoint = None  # what a resumed run started with, where its checkpoint records it
    labeled_training_identifiers = None

    def unused_label_subset(self):
        """The path of a label subset file this trainer leaves unused (it does not opt in), else None."""
        path = label_subset_path(self.preprocessed_dataset_folder_base)
        return path if not self.uses_label_subset and isfile(path) else None

    def _label_subset_of_fold(self):
        """The fold's entry of the label subset where this trainer opts in (None where it does not); a trainer that
        opts in refuses to train without one, since its results folder would say label subset over every label."""
        path = label_subset_path(self.preprocessed_dataset_folder_base)
        if not self.uses_label_subset:
            return None
        if not isfile(path):
            raise UnlabeledDataError(
                f"this trainer trains on the labeled cases of a label subset and {path} does not "
                f"exist: create it with 'nnUNetv2_bcp_label_subset -d {self.plans_manager.dataset_name} -k K' (or "
                f"--cases), or train on every label (-tr nnUNetTrainerBCP, or nnUNetTrainer)")
        ids = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
        return fold_subset(load_label_subset(self.preprocessed_dataset_folder_base, ids), self.fold, path)

    def get_tr_and_val_datasets(self):
        """nnU-Net's split; with a label subset only the fold's labeled cases stay in the labeled dataset. A missing or
        wrong subset file stops the training with a message naming the file."""
        try:
            return self._restricted_to_label_subset(*super().get_tr_and_val_datasets())
        except UnlabeledDataError as e:
            raise SystemExit(f"ERROR ({self.__class__.__name__}): {e}")

    def _restricted_to_label_subset(self, dataset_tr, dataset_val):
        subset = self._label_subset_of_fold()
        path = label_subset_path(self.preprocessed_dataset_folder_base)
        if self.unused_label_subset():
            self.print_to_log_file(
                f"{self.__class__.__name__} trains on every label and leaves the label subset {path} unused; "
                f"trainers that opt in train on its labeled cases: -tr nnUNetTrainerBCP_labelSubset (BCP), "
                f"nnUNetTrainerLabelSubset (nnU-Net), or a subclass with uses_label_subset = True")
        self.labeled_training_identifiers = list(dataset_tr.identifiers) if subset is None else list(subset["labeled"])
        if subset is not None:
            outside = sorted(set(subset["labeled"]) - set(dataset_tr.identifiers))
            if outside:
                raise UnlabeledDataError(f"{label_subset_path(self.preprocessed_dataset_folder_base)}: labeled "
                                         f"cases {outside[:5]} are not training cases of fold {self.fold}")
            dataset_tr = self.dataset_class(self.preprocessed_dataset_folder, list(subset["labeled"]),
                                            self.folder_with_segs_from_previous_stage)
            self.label_subset_in_use = {"file": path, "fold": str(self.fold), "labeled": list(subset["labeled"]),
                                        "num_label_dropped": len(subset["unlabeled"])}
            started = self.label_subset_of_checkpoint
            if started is not None and (sorted(started["labeled"]), started["num_label_dropped"]) != \
                    (sorted(subset["labeled"]), len(subset["unlabeled"])):
                raise UnlabeledDataError(
                    f"{path}: this run started with the labeled cases {started['labeled']} "
                    f"({started['num_label_dropped']} label-dropped) and the file now names {subset['labeled']} "
                    f"({len(subset['unlabeled'])} label-dropped): restore it, or start a new training without --c")
            self.print_to_log_file(
                f"WARNING: label subset in effect ({path}): {len(subset['labeled'])} labeled training cases, "
                f"{len(subset['unlabeled'])} training cases with their labels dropped. To train on every label, "
                f"remove it: nnUNetv2_bcp_label_subset -d {self.plans_manager.dataset_name} --remove")
        return dataset_tr, dataset_val


class nnUNetTrainerLabelSubset(ContinueOnlyWhereStartedFromModel, LabelSubsetMixin, nnUNetTrainer):
    """Plain nnU-Net trained only on the labeled cases of the label subset: the labeled-only baseline of BCP. Its
    checkpoints record the subset (a ``label_subset`` entry beside nnU-Net's, written atomically), so that a run
    resumed after the file changed is refused."""

    def save_checkpoint(self, filename: str) -> None:
        save_nnunet_checkpoint_with(super().save_checkpoint, filename, {'label_subset': self.label_subset_in_use})

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, str):
            # nnU-Net has just unpickled this file: reading it again as it does needs no newer torch
            recorded = load_checkpoint(filename_or_checkpoint, mmap=True)  # the weights stay on disk
            self.label_subset_of_checkpoint = recorded.get('label_subset')
