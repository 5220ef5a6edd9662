"""State tracking: holds, tokens, change maps and their persistence."""
