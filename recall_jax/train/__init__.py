"""Training: GradCache gradients, optimizer, the contrastive / generative step and the trainer loop."""
