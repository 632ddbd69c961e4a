"""Model passes: each takes an ``nn.Module`` (and example inputs) and returns a Report."""
