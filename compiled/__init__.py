"""The back end: flat-buffer layout, lowering of bound graphs to one step function, and fusion."""
