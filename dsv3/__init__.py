"""dsv3: DeepSeek-V3 in PyTorch."""
