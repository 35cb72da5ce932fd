"""dvtorch: DeepVariant Inception-v3 in PyTorch."""
