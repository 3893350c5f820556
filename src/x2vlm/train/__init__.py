"""Training infrastructure shared by pre-training and fine-tuning: optimiser, schedule, distributed
set-up, checkpoints that resume exactly, metrics."""
