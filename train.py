#!/usr/bin/env python
"""flowlab's one training entry point.

    python train.py --config configs/quickstart.yaml [key=value ...]
    accelerate launch train.py --config configs/quickstart.yaml

The config's ``recipe:`` picks the training method.
"""
import sys

try:
    from flowlab.cli import train_main
except ImportError:  # running from a checkout without `pip install -e .`
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from flowlab.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
