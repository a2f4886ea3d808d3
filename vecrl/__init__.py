"""vecrl: many-seed model-based off-policy RL on the accelerator."""
