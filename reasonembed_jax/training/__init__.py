"""Training: configuration, the jitted step (plain and GradCache), checkpoints and the loop."""
