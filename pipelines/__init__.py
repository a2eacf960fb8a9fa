"""Prism pipelines: models, precisions, generation, engines. No UI code lives here."""
