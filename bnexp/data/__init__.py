"""Images in memory as uint8 tensors, the dataset files and their checks, batched augmentation, batch samplers."""
