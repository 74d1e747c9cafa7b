"""Models: the ViT encoders, the MLP classifier, training steps and MAE pretraining."""
