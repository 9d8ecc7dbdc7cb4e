"""The streamed training loop and its collaborators: checkpoints, DDP, stop signals."""
