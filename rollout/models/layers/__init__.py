"""Building blocks of the model implementations; parameters carry their own weight loaders."""
