"""Reading models and inputs, writing results: the edges of normsurgeon."""
