"""Hand-written kernels. Each has a torch reference elsewhere in the package that it is tested against."""
