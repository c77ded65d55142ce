"""The lowest layer: facts about the host and helpers every other package may use (it imports none of them)."""
