"""Train or score an unlearning run from a YAML config:

    python train.py fit --config configs/tiny.yaml
    python train.py validate --config configs/tiny.yaml --ckpt_path runs/tiny/.../last.ckpt
    python train.py fit --config configs/tiny.yaml --print_config
"""

from cfg_unlearn.cli import train_main

if __name__ == "__main__":
    train_main()
