"""bincount on Kubernetes: resource builders (the one source of every manifest) and the launchers."""
