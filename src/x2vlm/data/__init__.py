"""Data pre-processing shared by pre-training and fine-tuning: readers, text, image/box transforms, MLM masking, video frames."""
