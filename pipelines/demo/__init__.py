"""Embedded demo models: synthetic scenes, training, prompt-adherence scoring."""
