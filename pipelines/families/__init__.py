"""One module per model family: what the family is and its generate loop."""
