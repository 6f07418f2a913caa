"""simple-rlhf: the library that sft.py, reward.py, ppo.py and the other scripts share, one job per module."""
