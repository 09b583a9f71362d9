"""Stage: train the backbone + embedding on the pseudo-labels with the partial margin-softmax
head, over torch.distributed; checkpoints resume exactly."""
