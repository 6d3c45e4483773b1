"""Files in and out: checkpoints, data, Hugging Face folders, atomic output writing."""
