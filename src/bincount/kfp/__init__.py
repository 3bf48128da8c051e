"""The Kubeflow pipeline: its steps as KFP components, the pipeline, and how it is compiled, run and submitted."""
