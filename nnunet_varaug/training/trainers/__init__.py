"""Small mixins over nnUNetTrainer, one per suffix of the trainer-name grammar (see ``registry``)."""
