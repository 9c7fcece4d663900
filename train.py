"""Train or score an unlearning run from a YAML config:

    python train.py fit --config configs/tiny.yaml
    python train.py validate --config configs/tiny.yaml --ckpt_path runs/tiny/.../last.ckpt
    python train.py fit --config configs/tiny.yaml --print_config
"""

import sys

# a light import: Lightning's, which takes seconds, happens inside, where Ctrl-C is one line
from cfg_unlearn.console import trainer_command

if __name__ == "__main__":
    trainer_command(sys.argv[1:], prog="train.py")
