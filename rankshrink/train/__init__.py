"""Fine-tuning: the training loop and its phases."""
