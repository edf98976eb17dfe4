"""The paradigm demo: the alignment paradigms run on the Shapes world and their report."""
