"""Train or score an unlearning run from a YAML config:

    python train.py fit --config configs/tiny.yaml
    python train.py validate --config configs/tiny.yaml --ckpt_path runs/tiny/.../last.ckpt
    python train.py fit --config configs/tiny.yaml --print_config
"""

import sys

try:
    from cfg_unlearn.cli import train_main
except KeyboardInterrupt:  # importing Lightning takes seconds: one line, not a traceback
    # (written out: the package may be half imported, cfg_unlearn.console.NOT_STARTED with it)
    fit = sys.argv[1:2] == ["fit"]
    sys.stderr.write("train.py: interrupted" + ("; it had not started training, so no checkpoint was saved" if fit
                                                 else "") + "\n")
    raise SystemExit(130)

if __name__ == "__main__":
    train_main()
