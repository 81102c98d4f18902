"""What every trainer's loop needs besides its math: the loop, checkpoints, validation images."""
