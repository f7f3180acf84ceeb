"""`hotswap`: the command line for publishing weight versions to InferencePools and watching them."""
