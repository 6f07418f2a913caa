"""Charts of finished steps: `python plots.py out/demo/sft out/demo/reward out/demo/ppo` writes each folder's PNG.

The drawing lives in simple_rlhf/plots.py; sft.py, reward.py and ppo.py call it at the end of a run.
"""

import sys

from simple_rlhf import plots

if __name__ == "__main__":
    plots.main(sys.argv[1:])
