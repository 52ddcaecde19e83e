#!/usr/bin/env python
"""sd-scripts-style PaRa training: `accelerate launch train_para.py --config_file presets/quickstart.toml`.

The arguments are sd-scripts' train_network.py arguments; see README.md. The logic is in para_trainer/training/train.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # networks.* and para_trainer from this checkout

from para_trainer.training.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
