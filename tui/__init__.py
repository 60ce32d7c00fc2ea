"""kedit's fronts: the click CLI, the prompt-toolkit REPL and the Textual app."""
