"""The reward-model refresh: live preference pairs -> fine-tune -> publish (see worker.py)."""
