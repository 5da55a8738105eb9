"""The BCP method as pure tensor functions (box masks, mixing, pseudo-labels, weighted loss, EMA)."""
from nnunetv2_bcp.bcp.box_mask import box_size, downsample_mask, random_box_mask, render_box_mask, sample_box_starts
from nnunetv2_bcp.bcp.ema import ema_update_, is_compiled, unwrap_network
from nnunetv2_bcp.bcp.loss import BCPLoss, bcp_total
from nnunetv2_bcp.bcp.mixing import copy_paste, inward_directions, labeled_origin, labeled_partner, mix_by_origin
from nnunetv2_bcp.bcp.pseudo_labels import keep_largest_component, pseudo_labels, single_component_share
