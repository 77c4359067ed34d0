"""agiqa-pipeline: cached frozen-model features and light quality heads for AI-generated images."""

__version__ = "0.1.0"
