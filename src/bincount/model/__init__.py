"""The model, apart from training: the zoo of architectures and starting weights, the one preprocessing of a
photo, and the exported model that evaluate, serve and the audit load."""
