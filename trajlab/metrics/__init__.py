"""Sample-quality and diversity metrics (numpy in, numbers out). Submodules import lazily."""
