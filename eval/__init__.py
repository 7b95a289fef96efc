"""Classification protocols on frozen or fine-tuned backbones: kNN, linear probe, semi-supervised."""
