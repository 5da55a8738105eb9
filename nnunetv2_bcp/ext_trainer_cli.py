"""nnUNetv2_bcp_ext_trainer_dir: print the folder that nnU-Net's ``nnUNet_extTrainer`` must list to find the BCP
trainers. A console command (rather than ``python -c``) names the folder of the environment it was installed into,
whatever ``python`` is first on PATH. Add it to a value that may already be set:

    export nnUNet_extTrainer="$(nnUNetv2_bcp_ext_trainer_dir)${nnUNet_extTrainer:+:$nnUNet_extTrainer}"
"""
import argparse

from nnunetv2_bcp import ext_trainer_dir


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(ext_trainer_dir())


if __name__ == "__main__":
    main()
