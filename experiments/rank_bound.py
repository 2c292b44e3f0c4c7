"""Experiment 4: COLA against LoRA where rank is the bottleneck (the ``rankbound`` package).

Run (from the repository root; ``--help`` for every flag):
    python experiments/rank_bound.py --estimate-only       # time a few steps, print the budget
    nohup nice -n 10 python experiments/rank_bound.py --threads 1 > rank_bound.log 2>&1 &
    python experiments/rank_bound.py --tiny --out /tmp/rb  # tiny random Llama, a few seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rankbound import main

if __name__ == "__main__":
    main()
